"""The zero-shot sweep of `hf-dynorm calibrate`: every norm kind, estimator, anchor count and bound swapped at every
site without training, then each site alone and sites swapped cumulatively."""

from __future__ import annotations

import copy
import time

from .calibration import ESTIMATORS, calibrate
from .conversion import convert
from .data import token_stream
from .evaluation import exp_nll, perplexity
from .reports import markdown_table, write_results

# DyT paper baselines (arXiv 2503.10622): its default alpha, and its LLaMA-7B per-role values (other roles: 0.2).
DYT_PAPER_ALPHA = 0.5
DYT_LLAMA_ALPHA = {"attn_input": 0.8, "mlp_input": 0.2, "final": 0.2, "q_norm": 0.2, "k_norm": 0.2,
                   "embedding": 0.2, "post_attn": 0.2, "post_mlp": 0.2}
ANCHOR_COUNTS = (0, 1, 2, 4, 8)
BOUNDS = (2.0, 1.0, 0.5)  # pure DyT/DyISRU saturating at b x token rms (conversion.bounded)


def _swap_ratio(model, original_nll: float, ids, window: int, **convert_options) -> float:
    """Perplexity ratio of a converted copy of `model` against the original on the same tokens."""
    candidate = convert(copy.deepcopy(model), **convert_options)
    nll = perplexity(candidate, ids, window=window, progress=False).mean_nll
    return exp_nll(nll - original_nll)


def zero_shot_report(model_id, data, out, *, windows: int = 64, eval_windows: int = 4, window: int = 512,
                     sensitivity: bool = True) -> dict:
    """Every norm kind x estimator x anchor count swapped at all sites without training; then, for pure
    median-calibrated DyISRU, each site alone and sites swapped cumulatively in sensitivity order."""
    from . import load_model, load_tokenizer

    model, tokenizer = load_model(model_id), load_tokenizer(model_id)
    ids = token_stream(data, tokenizer, "test")[: eval_windows * window]
    original = perplexity(model, ids, window=window, progress=False)
    started = time.perf_counter()
    cal = calibrate(model, data, tokenizer=tokenizer, split="train", window=window, max_windows=windows)
    calibration_seconds = time.perf_counter() - started

    configurations = [("dyt", f"paper alpha {DYT_PAPER_ALPHA}", 0, {"alpha": DYT_PAPER_ALPHA}),
                      ("dyt", "paper LLaMA-7B per role", 0, {"alpha": DYT_LLAMA_ALPHA})]
    configurations += [("dyt", estimator, 0, {"calibration": cal, "estimator": estimator})
                       for estimator in ESTIMATORS]
    configurations += [("dyisru", estimator, k, {"calibration": cal, "estimator": estimator,
                                                 "anchors": k or None})
                       for k in ANCHOR_COUNTS for estimator in ESTIMATORS]
    configurations += [("dyisru", "median, kappa from bulk channels", 4,
                        {"calibration": cal, "anchors": 4, "kappa_from": "bulk"})]
    configurations += [(norm, f"median, bound {bound}", 0, {"calibration": cal, "bound": bound})
                       for norm in ("dyt", "dyisru") for bound in BOUNDS]
    all_sites = []
    for norm, label, k, options in configurations:
        ratio = _swap_ratio(model, original.mean_nll, ids, window, norm=norm, **options)
        all_sites.append({"norm": norm, "estimator": label, "anchors": k, "perplexity_ratio": ratio})
        print(f"  {norm:6} {label:32} anchors={k}: perplexity ratio {ratio:.4g}", flush=True)

    results = {"model": str(model_id), "data": str(data), "original_perplexity": original.perplexity,
               "eval_tokens": int(ids.numel()), "calibration_tokens": cal.tokens,
               "calibration_seconds": calibration_seconds, "all_sites": all_sites}
    report = (f"# Zero-shot swap of {model_id}\n\nOriginal perplexity {original.perplexity:.4g} on "
              f"{ids.numel()} held-out tokens of {data}; calibration on {cal.tokens} tokens "
              f"({calibration_seconds:.0f} s).\n\n## All sites swapped\n\n")
    report += markdown_table(["norm", "estimator", "anchors", "perplexity ratio"],
                             [[r["norm"], r["estimator"], r["anchors"], r["perplexity_ratio"]] for r in all_sites])
    if sensitivity:
        ranking = [(name, _swap_ratio(model, original.mean_nll, ids, window, norm="dyisru", calibration=cal,
                                      sites=[f"^{name}$"]))
                   for name in cal.sites]
        ranking.sort(key=lambda item: item[1])
        cumulative = []
        for count in sorted({*(2 ** i for i in range(len(ranking).bit_length())), len(ranking)}):
            names = [f"^{name}$" for name, _ in ranking[:count]]
            cumulative.append({"sites": count, "perplexity_ratio": _swap_ratio(
                model, original.mean_nll, ids, window, norm="dyisru", calibration=cal, sites=names)})
        results["sensitivity"] = [{"site": name, "perplexity_ratio": ratio} for name, ratio in ranking]
        results["cumulative"] = cumulative
        report += "\n## Pure DyISRU (median), one site at a time (least sensitive first)\n\n" + markdown_table(
            ["site", "perplexity ratio"], [[name, ratio] for name, ratio in ranking])
        report += "\n## Sites swapped cumulatively in that order\n\n" + markdown_table(
            ["sites swapped", "perplexity ratio"], [[c["sites"], c["perplexity_ratio"]] for c in cumulative])
    write_results(out, results, report)
    return results
