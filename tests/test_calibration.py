"""Calibration: estimators on synthetic activations, streaming statistics, sinks, records, bad input."""

import math

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import hf_dynorm
from hf_dynorm.architectures import RMS, NormSite
from hf_dynorm.calibration import ESTIMATORS, Reservoir, SiteStatistics, _finalise, calibrate
from tiny import VOCAB, tiny_model

C = 256


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = LlamaRMSNorm(C, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)


def synthetic_site(s: float, batches: int = 8, sink: float | None = None, rows: int = 1024):
    holder = Holder()
    site = NormSite("norm", "final", RMS, C, 1e-6, None)
    stats = SiteStatistics(site, rows=rows, tokens=1 << 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    for _ in range(batches):
        x = torch.randn(4, 64, C, generator=generator) * s
        if sink:
            x[:, 0, 7] = sink
        stats.update(x)
    return _finalise(holder, stats, sink_ratio=8.0), stats


@pytest.mark.parametrize("estimator", ["median", "mean", "geomean"])
def test_estimators_recover_the_theory_on_gaussian_activations(estimator):
    s = 3.0
    calibration, _ = synthetic_site(s)
    kappa = calibration.parameter("dyisru", estimator, [])
    alpha = calibration.parameter("dyt", estimator, [])
    # per-token mean square of C gaussians: relative spread sqrt(2/C) ~ 9%; estimates land within a few %
    assert kappa == pytest.approx(C * s ** 2, rel=0.03)
    assert alpha == pytest.approx(1 / (math.sqrt(C) * s), rel=0.03)


@pytest.mark.parametrize("norm", ["dyisru", "dyt"])
def test_fit_never_does_worse_than_median_on_its_objective(norm):
    calibration, _ = synthetic_site(2.0)
    median = calibration.parameter(norm, "median", [])
    fitted = calibration.parameter(norm, "fit", [])
    assert calibration.error(norm, fitted, []) <= calibration.error(norm, median, [])


def test_streaming_statistics_equal_exact_ones_and_memory_is_bounded():
    _, stats = synthetic_site(1.5, batches=6, rows=10_000)
    generator = torch.Generator().manual_seed(1)
    exact = torch.cat([torch.randn(4, 64, C, generator=generator).mul(1.5).reshape(-1, C) for _ in range(6)])
    torch.testing.assert_close(stats.channel_absmax, exact.abs().amax(0))
    torch.testing.assert_close(stats.rows.rows, exact)  # under capacity the reservoir is the whole stream
    reservoir = Reservoir(100, torch.Generator().manual_seed(0))
    for _ in range(50):
        reservoir.add(torch.randn(64, 3))
    assert reservoir.rows.shape == (100, 3) and reservoir.seen == 3200


def test_reservoir_is_uniform_over_the_stream():
    reservoir = Reservoir(2000, torch.Generator().manual_seed(0))
    for start in range(0, 100_000, 1000):
        reservoir.add(torch.arange(start, start + 1000, dtype=torch.float32)[:, None])
    # a uniform sample of 0..99999 has mean ~50000 (standard error ~650)
    assert abs(float(reservoir.rows.mean()) - 50_000) < 3_000


def test_reservoir_replays_sequential_algorithm_r_with_the_same_draws():
    """Rows drawn into the same slot in one batch: the later one wins, as in the one-row-at-a-time algorithm."""
    def sequential(capacity, batches, seed):
        generator, kept, seen = torch.Generator().manual_seed(seed), [], 0
        for rows in batches:
            room = max(0, capacity - len(kept))
            kept += list(rows[:room])
            if len(rows) > room:
                index = torch.arange(seen + room, seen + len(rows), dtype=torch.float64) + 1
                slots = (torch.rand(len(rows) - room, generator=generator, dtype=torch.float64) * index).long()
                for row, slot in zip(rows[room:], slots.tolist()):
                    if slot < capacity:
                        kept[slot] = row
            seen += len(rows)
        return torch.stack(kept)

    # rows as wide as SmolLM2's: there the former indexed copy kept other rows than the later ones (narrow rows hid it)
    batches = [torch.arange(start, start + 4096, dtype=torch.float32)[:, None].expand(-1, 576)
               for start in range(0, 4 * 4096, 4096)]
    for seed in range(3):
        reservoir = Reservoir(1024, torch.Generator().manual_seed(seed))
        for rows in batches:
            reservoir.add(rows)
        torch.testing.assert_close(reservoir.rows, sequential(1024, batches, seed), rtol=0, atol=0)


def test_sinks_are_detected_kept_apart_and_anchored():
    calibration, _ = synthetic_site(1.0, sink=500.0)
    report = calibration.sink_report()
    assert report["sink_share_at_position_0"] == 1.0
    assert report["sink_fraction"] == pytest.approx(1 / 64, rel=0.2)
    assert calibration.anchors(1) == [7]
    assert calibration.kappa("median", []) == pytest.approx(C, rel=0.05)  # the sinks do not inflate kappa


def test_sink_detection_on_a_model_with_a_massive_activation_at_position_0():
    model = tiny_model("llama")

    def plant(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, 0, 5] += 1000.0
        return output

    model.model.layers[0].register_forward_hook(plant)
    ids = torch.randint(3, VOCAB, (4096,), generator=torch.Generator().manual_seed(0))
    calibration = calibrate(model, ids, window=32, max_windows=64, progress=False)
    site = calibration.sites["model.layers.1.input_layernorm"]
    assert site.sink_report()["sink_share_at_position_0"] == 1.0
    assert site.anchors(1) == [5]
    assert calibration.sites["model.layers.0.input_layernorm"].sink_report()["sink_fraction"] == 0.0


def test_autocast_calibration_runs_the_matmuls_in_bf16_and_keeps_the_estimates():
    model = tiny_model("qwen3")  # q_norm/k_norm sites see matmul outputs directly, not the fp32 residual stream
    ids = torch.randint(3, VOCAB, (2048,), generator=torch.Generator().manual_seed(0))
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    exact = calibrate(model, ids, window=32, progress=False)
    fast = calibrate(model, ids, window=32, autocast=torch.bfloat16, progress=False)
    assert seen[0] == torch.float32 and set(seen[len(seen) // 2:]) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")
    for norm in ("dyisru", "dyt"):
        values, fast_values = exact.parameters(norm)[0], fast.parameters(norm)[0]
        assert values.keys() == fast_values.keys()
        for name, value in values.items():
            assert fast_values[name] == pytest.approx(value, rel=0.01), name  # 0.13% at most in practice
    with pytest.raises(ValueError, match="autocast must be torch.bfloat16, torch.float16 or None"):
        calibrate(model, ids, window=32, autocast=torch.float32)


def test_calibration_record_survives_save_and_reload(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (2048,), generator=torch.Generator().manual_seed(0))
    hf_dynorm.convert(model, "dyisru", calibration=ids, window=32, anchors=2, estimator="fit", progress=False)
    record = model.config.dynorm
    assert record["calibration"]["estimator"] == "fit" and record["parameters"]["kappa"] == "calibration (fit)"
    site = record["calibration"]["sites"]["model.norm"]
    kappa = float(model.model.norm.kappa.detach())
    assert len(site["anchors"]) == 2 and site["kappa"] == pytest.approx(kappa, rel=1e-5)
    model.save_pretrained(tmp_path)
    assert hf_dynorm.load_model(tmp_path).config.dynorm == record


def test_every_estimator_converts(tmp_path):
    ids = torch.randint(3, VOCAB, (1024,), generator=torch.Generator().manual_seed(0))
    calibration = calibrate(tiny_model("gpt2"), ids, window=32, progress=False)
    for estimator in ESTIMATORS:
        for norm in ("dyisru", "dyt"):
            model = hf_dynorm.convert(tiny_model("gpt2"), norm, calibration=calibration, estimator=estimator)
            assert torch.isfinite(model(ids[:32][None]).logits).all()


def test_bad_calibration_input():
    model = tiny_model("llama")

    class Tokenizer:
        def __call__(self, text, **kwargs):
            return {"input_ids": [1] * 10}

    with pytest.raises(ValueError, match="the text is empty"):
        calibrate(model, ["", "  "], tokenizer=Tokenizer())
    with pytest.raises(ValueError, match="fewer than one window of 512"):
        calibrate(model, ["short"], tokenizer=Tokenizer())
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        calibrate(model, torch.full((1024,), VOCAB + 5), window=32)
    with pytest.raises(ValueError, match="estimator must be one of"):
        hf_dynorm.convert(model, calibration=torch.randint(3, VOCAB, (256,)), window=32, estimator="mode",
                          progress=False)
    assert getattr(model.config, "dynorm", None) is None
