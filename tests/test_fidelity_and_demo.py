"""Outlier fidelity and the paper's numerical demonstration."""

import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

import hf_dynorm
from hf_dynorm.calibration import calibrate
from hf_dynorm.data import token_stream
from hf_dynorm.fidelity import SiteFidelity, _top_overlap, outlier_fidelity, plot_fidelity
from hf_dynorm.modeling_dynorm import dyisru, dyt
from hf_dynorm.paper_demo import FUNCTIONS, demonstration, fit, run_paper_demo
from tiny import VOCAB, hand_mean_nll, tiny_model


def ids(n=2048):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(0))


def test_a_candidate_ten_percent_off_the_norm_scores_a_relative_error_of_one_tenth():
    model = tiny_model("llama")
    reference = tiny_model("llama")
    hf_dynorm.convert(model, "dyisru", sites=["final"])

    class TenPercentMore(torch.nn.Module):  # 1.1 x the reference's norm: relative L2 error 0.1 by hand, same signs
        def forward(self, x):
            return 1.1 * reference.model.norm(x)

    model.model.norm = TenPercentMore()
    results = outlier_fidelity(model, ids(), reference=reference, window=32, progress=False)
    metrics = results["sites"]["model.norm"]["converted"]
    assert metrics["relative_l2_all"] == pytest.approx(0.1, rel=1e-5)
    assert metrics["relative_l2_outlier_tokens"] in (None, pytest.approx(0.1, rel=1e-5))
    assert metrics["sign_agreement"] == 1.0 and metrics["top8_agreement"] == 1.0


def test_dyisru_beats_dyt_on_a_planted_outlier():
    torch.manual_seed(0)
    C = 64
    x = torch.randn(256, C)
    x[:, 0] = torch.linspace(20, 200, 256)  # one channel grows far beyond the rest
    reference = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # RMSNorm, weight 1
    bulk = float(x[:, 1:].pow(2).sum(-1).median())  # the outlier's K_i: the squares of the other channels
    gamma = torch.full((C,), C ** 0.5)
    fidelity = SiteFidelity(element_k=4.0, token_m=4.0, topk=4, keep_points=10)
    fidelity.update(x, reference, {"dyisru": dyisru(x, torch.tensor([bulk]), gamma),
                                   "dyt": dyt(x, torch.tensor([bulk ** -0.5]), gamma)})
    assert fidelity.metrics("dyisru")["relative_l2_outlier_elements"] < \
        fidelity.metrics("dyt")["relative_l2_outlier_elements"]


def _direct_metrics(batches, label, element_k=4.0, token_m=4.0, topk=4):
    """SiteFidelity's metrics written out from their definitions: masks, Python sets, signbit."""
    sums = defaultdict(float)
    for x, reference, outputs in batches:
        output = outputs[label]
        rms = x.pow(2).mean(-1, keepdim=True).sqrt()
        masks = {"all": torch.ones_like(x, dtype=torch.bool), "outlier_elements": x.abs() > element_k * rms,
                 "outlier_tokens": (rms > token_m * rms.median()).expand_as(x),
                 "saturated": reference.abs() > 0.5 * reference.abs().amax(-1, keepdim=True)}
        for kind, mask in masks.items():
            sums[kind] += float((output - reference)[mask].double().square().sum())
            sums[kind, "reference"] += float(reference[mask].double().square().sum())
        sums["sign"] += int((torch.signbit(output) == torch.signbit(reference)).sum())
        tops = [(set(o.abs().topk(topk).indices.tolist()), set(r.abs().topk(topk).indices.tolist()))
                for o, r in zip(output, reference)]
        sums["top"] += sum(len(a & b) / topk for a, b in tops)
        sums["elements"] += x.numel()
        sums["tokens"] += x.shape[0]
    return {**{f"relative_l2_{kind}": (sums[kind] / sums[kind, "reference"]) ** 0.5
               for kind in ("all", "outlier_elements", "outlier_tokens", "saturated")},
            "sign_agreement": sums["sign"] / sums["elements"], f"top{topk}_agreement": sums["top"] / sums["tokens"]}


def test_site_fidelity_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    batches = []
    for rows in (96, 64):  # two batches: the sums stream
        x = torch.randn(rows, 48, generator=generator)
        x[::7, 3] *= 30  # outlier elements
        x[::16] *= 20  # outlier tokens
        reference = x / x.pow(2).mean(-1, keepdim=True).sqrt()
        dyisru_output = dyisru(x, torch.tensor([40.0]), torch.full((48,), 48 ** 0.5))
        dyisru_output[0, :5] = -0.0 * torch.sign(reference[0, :5])  # zeros of the other sign: signbit tells them
        batches.append((x, reference, {"dyisru": dyisru_output,
                                       "dyt": dyt(x, torch.tensor([0.3]), torch.ones(48)) - 0.1}))
    fidelity = SiteFidelity(element_k=4.0, token_m=4.0, topk=4, keep_points=15)
    for x, reference, outputs in batches:
        fidelity.update(x, reference, outputs)
    for label in ("dyisru", "dyt"):
        assert fidelity.metrics(label) == pytest.approx(_direct_metrics(batches, label), rel=1e-5)
    # the first outlier elements in order, across the batches, up to keep_points
    outliers = [x.abs() > 4.0 * x.pow(2).mean(-1, keepdim=True).sqrt() for x, _, _ in batches]
    assert sum(int(mask.sum()) for mask in outliers) > 15 > int(outliers[0].sum())
    kept = fidelity.kept_points()
    assert torch.equal(kept["reference"], torch.cat([r[m] for (_, r, _), m in zip(batches, outliers)])[:15])
    assert torch.equal(kept["dyt"], torch.cat([o["dyt"][m] for (_, _, o), m in zip(batches, outliers)])[:15])


def test_top_overlap_counts_what_sets_of_topk_count_and_sends_only_unsettled_rows_to_topk(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(60, 40, generator=generator)
    output = reference * torch.rand(60, 1, generator=generator)  # same order as the reference: settled without topk
    output[::3] = torch.randn(20, 40, generator=generator)  # unrelated rows
    output[1, 3] = output[4, 0] = float("nan")  # NaN rows go to topk (it ranks NaN first)
    output[7] = output[7].abs().max()  # a row of ties
    reference_top = reference.abs().topk(6, -1).indices
    in_reference_top = torch.zeros_like(reference, dtype=torch.bool).scatter_(-1, reference_top, True)
    expected = sum(len(set(o.abs().topk(6).indices.tolist()) & set(r.tolist())) for o, r in zip(output, reference_top))
    ranked_rows, topk = [], torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda rows, *args: ranked_rows.append(len(rows)) or topk(rows, *args))
    assert _top_overlap(output, reference_top, in_reference_top) == expected
    assert ranked_rows == [20 + 3]  # the unrelated rows, the two NaN rows and the row of ties


def test_what_if_on_an_unconverted_model_with_plots(tmp_path):
    model = tiny_model("gpt2")
    calibration = calibrate(model, ids(), window=32, max_windows=8, progress=False)
    results = outlier_fidelity(model, ids(), calibration=calibration, window=32, progress=False)
    assert results["candidates"] == ["dyisru", "dyisru_anchored4", "dyt"]
    assert set(results["by_role"]) == {"attn_input", "mlp_input", "final"}
    assert all(0 < s["dyt"]["relative_l2_all"] < 10 for s in results["sites"].values())
    assert plot_fidelity(results, tmp_path) and (tmp_path / "fidelity_by_depth.png").stat().st_size > 1000


def test_fidelity_errors():
    with pytest.raises(ValueError, match="pass reference="):
        outlier_fidelity(hf_dynorm.convert(tiny_model("llama"), "dyt"), ids(), window=32)
    with pytest.raises(ValueError, match="has no norm sites"):
        outlier_fidelity(NoNorms(), ids(), window=32)


class NoNorms(torch.nn.Module):
    """A 'model' with a config and a linear layer, but no norm."""

    config = type("Config", (), {"model_type": "no-norms", "dynorm": None})()

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)


def test_paper_demo_is_deterministic_and_dyisru_wins(tmp_path):
    first, second = demonstration(), demonstration()
    assert first == second
    assert first["dyisru"]["mean_abs_residual"] < 0.1 * first["dyt"]["mean_abs_residual"]
    # for RMSNorm the moving entry's K (the other squares) is constant: DyISRU is the generating function
    assert demonstration(100, "rms")["dyisru"]["mean_abs_residual"] < 1e-9
    results = run_paper_demo(tmp_path)
    assert (tmp_path / "paper_demo.png").exists() and json.loads((tmp_path / "results.json").read_text())
    assert len(results["sweep"]) == 25


@pytest.mark.parametrize("name", ["dyt", "dyisru"])
def test_fit_recovers_the_generating_parameter(name):
    function, _ = FUNCTIONS[name]
    x = np.linspace(-40, 40, 30)
    truth = 0.07 if name == "dyt" else 150.0
    value, residual = fit(function, x, function(x, 10.0, truth), 10.0)
    assert value == pytest.approx(truth, rel=1e-4) and residual < 1e-6


def test_metrics_load_through_evaluate():
    import evaluate

    from hf_dynorm import metrics
    from tiny import tiny_text, tiny_tokenizer

    tokenizer, texts = tiny_tokenizer(), tiny_text(60).splitlines()
    model = tiny_model("llama")
    metric = evaluate.load(metrics.path("dynorm_perplexity"))
    reference = tiny_model("llama", seed=1)
    scores = metric.compute(predictions=texts, model=model, tokenizer=tokenizer, reference=reference, window=32)
    tokens = token_stream(texts, tokenizer)
    expected = math.exp(hand_mean_nll(model, tokens, 32) - hand_mean_nll(reference, tokens, 32))
    assert scores["perplexity_ratio"] == pytest.approx(expected, rel=1e-6) and scores["tokens"] > 100
    converted = hf_dynorm.convert(tiny_model("llama"), "dyisru")
    fidelity = evaluate.load(metrics.path("dynorm_fidelity"))
    result = fidelity.compute(predictions=texts, model=converted, reference=model, tokenizer=tokenizer, window=32)
    assert 0 < result["relative_l2_all"] < 1 and set(result["by_role"]) == {"attn_input", "mlp_input", "final"}
