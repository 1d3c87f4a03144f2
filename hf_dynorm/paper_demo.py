"""The paper's numerical demonstration (arXiv 2503.21708): who follows a growing outlier, tanh or the ISRU?

C channels, x ~ N(0, 2^2) from numpy's legacy seed 1, sorted; the largest entry is pushed out by +5*S for
S = 1..9. The norm's output of that entry (with the mirrored negative points) is fitted by least squares with
bound * tanh(alpha x) (DyT) and bound * x / sqrt(beta + x^2) (DyISRU); bound is sqrt(C - 1) for LayerNorm and
sqrt(C) for RMSNorm. A sweep over C and the outlier size shows where each function breaks down.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .reports import markdown_table, write_results

SHIFTS = range(1, 10)


def outlier_points(channels: int = 100, flavour: str = "layer", step: float = 5.0, shifts=SHIFTS, seed: int = 1):
    """(x, y) of the shifted largest entry and its norm output, plus the mirrored negative points."""
    np.random.seed(seed)
    base = np.sort(np.random.randn(channels) * 2.0)
    xs, ys = [], []
    for s in shifts:
        x = base.copy()
        x[-1] += step * s
        if flavour == "layer":
            y = (x - x.mean()) / x.std()
        else:
            y = x / np.sqrt(np.mean(x ** 2))
        xs.append(x[-1])
        ys.append(y[-1])
    xs, ys = np.array(xs), np.array(ys)
    return np.concatenate([xs, -xs]), np.concatenate([ys, -ys])


def _dyt(x, bound, alpha):
    return bound * np.tanh(alpha * x)


def _dyisru(x, bound, beta):
    return bound * x / np.sqrt(beta + x * x)


FUNCTIONS = {"dyt": (_dyt, "alpha"), "dyisru": (_dyisru, "beta")}


def fit(function, x, y, bound) -> tuple[float, float]:
    """Least squares over the one parameter: a log grid, then golden-section refinement. Deterministic."""
    def loss(log_p):
        return float(np.sum((function(x, bound, math.exp(log_p)) - y) ** 2))

    grid = np.linspace(-12, 12, 481)
    best = grid[int(np.argmin([loss(g) for g in grid]))]
    low, high = best - 0.05, best + 0.05
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if loss(a) < loss(b) else (a, high)
    parameter = math.exp((low + high) / 2)
    return parameter, float(np.mean(np.abs(function(x, bound, parameter) - y)))


def demonstration(channels: int = 100, flavour: str = "layer", step: float = 5.0) -> dict:
    x, y = outlier_points(channels, flavour, step)
    bound = math.sqrt(channels - 1) if flavour == "layer" else math.sqrt(channels)
    result = {"channels": channels, "flavour": flavour, "bound": bound, "x": x.tolist(), "y": y.tolist()}
    for name, (function, parameter) in FUNCTIONS.items():
        value, residual = fit(function, x, y, bound)
        result[name] = {parameter: value, "mean_abs_residual": residual}
    return result


def sweep(channel_counts=(10, 30, 100, 300, 1000), steps=(1.0, 2.5, 5.0, 10.0, 20.0), flavour="layer") -> list:
    rows = []
    for channels in channel_counts:
        for step in steps:
            r = demonstration(channels, flavour, step)
            rows.append({"channels": channels, "step": step, "largest_outlier": max(r["x"]),
                         "dyt_residual": r["dyt"]["mean_abs_residual"],
                         "dyisru_residual": r["dyisru"]["mean_abs_residual"]})
    return rows


def run_paper_demo(out) -> dict:
    out = Path(out)
    results = {"layernorm": demonstration(100, "layer"), "rmsnorm": demonstration(100, "rms"),
               "sweep": sweep()}
    rows = [[name, r["bound"], r["dyt"]["alpha"], r["dyt"]["mean_abs_residual"], r["dyisru"]["beta"],
             r["dyisru"]["mean_abs_residual"]] for name, r in (("LayerNorm", results["layernorm"]),
                                                               ("RMSNorm", results["rmsnorm"]))]
    report = ("# The paper's numerical demonstration (C = 100, x ~ N(0, 4), seed 1, outlier +5S, S = 1..9)\n\n"
              + markdown_table(["norm", "bound", "DyT alpha", "DyT mean abs residual", "DyISRU beta",
                                "DyISRU mean abs residual"], rows)
              + "\n## Where each function breaks down (LayerNorm; mean abs residual of the fit)\n\n"
              + markdown_table(["C", "outlier step", "largest outlier", "DyT", "DyISRU"],
                               [[r["channels"], r["step"], r["largest_outlier"], r["dyt_residual"],
                                 r["dyisru_residual"]] for r in results["sweep"]]))
    write_results(out, results, report)
    _plot(results, out)
    return results


def _plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (title, r) in zip(axes, (("LayerNorm", results["layernorm"]), ("RMSNorm", results["rmsnorm"]))):
        x, y = np.array(r["x"]), np.array(r["y"])
        grid = np.linspace(x.min() * 1.1, x.max() * 1.1, 400)
        axis.scatter(x, y, color="black", s=18, label="norm output of the outlier", zorder=3)
        axis.plot(grid, _dyt(grid, r["bound"], r["dyt"]["alpha"]),
                  label=f"DyT fit (mean |res| {r['dyt']['mean_abs_residual']:.3f})")
        axis.plot(grid, _dyisru(grid, r["bound"], r["dyisru"]["beta"]),
                  label=f"DyISRU fit (mean |res| {r['dyisru']['mean_abs_residual']:.3f})")
        axis.axhline(r["bound"], color="grey", lw=0.6, ls="--")
        axis.axhline(-r["bound"], color="grey", lw=0.6, ls="--")
        axis.set(title=f"{title}, C = {r['channels']}", xlabel="input x of the outlier entry", ylabel="output")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "paper_demo.png", dpi=120)
    plt.close(figure)
