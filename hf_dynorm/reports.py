"""Result folders: `results.json` plus a markdown `report.md`, and the markdown they are written in."""

from __future__ import annotations

import json
import math
from pathlib import Path


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}" if math.isfinite(value) else str(value)
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out, results: dict, report: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    (out / "report.md").write_text(report, encoding="utf-8")
    return out


def write_eval_report(results: dict, out) -> Path:
    rows = []
    for key in ("model", "reference"):
        if key in results:
            r = results[key]
            rows.append([results.get(f"{key}_id") or key, r["perplexity"], r["mean_nll"], r["tokens"], r["windows"],
                         r["window_nll_percentiles"]["p100"], r["token_nll_percentiles"]["p99"],
                         r["tokens_per_second"]])
    report = f"# Perplexity on {results.get('data')} ({results.get('split')})\n\n" + markdown_table(
        ["model", "perplexity", "mean NLL", "tokens", "windows", "worst window NLL", "p99 token NLL", "tokens/s"],
        rows)
    if "perplexity_ratio" in results:
        report += f"\nPerplexity ratio (model / reference): **{results['perplexity_ratio']:.4g}**\n"
    if "tasks" in results:
        rows = [[task, metric, scores["model"][metric], scores.get("reference", {}).get(metric, "")]
                for task, scores in results["tasks"].items() for metric in scores["model"]]
        report += "\n## Downstream tasks (lm-evaluation-harness)\n\n" + markdown_table(
            ["task", "metric", results.get("model_id") or "model", results.get("reference_id") or "reference"], rows)
    if "chat" in results:
        def cell(text):
            return text.replace("\n", " ").replace("|", "/")

        report += "\n## Chat (greedy answers to the shipped prompts)\n\n" + markdown_table(
            ["prompt", results.get("model_id") or "model", results.get("reference_id") or "reference"],
            [[cell(c["prompt"]), cell(c["model"]), cell(c["reference"])] for c in results["chat"]])
    if "agreement" in results:
        agree = results["agreement"]
        report += ("\n## Agreement with the reference\n\n" + markdown_table(
            ["top-1 next token", "KL(reference || model), nats per token", "the worst window's KL",
             "greedy continuation tokens"],
            [[agree["top1"], agree["kl"], agree["worst_window_kl"], agree["greedy"]]]))
    worst = results["model"]["worst_windows"]
    if worst:
        report += "\n## Worst windows of the model\n\n" + markdown_table(
            ["window", "mean NLL", "text (start)"],
            [[w["index"], w["mean_nll"], (w["text"] or "")[:120].replace("\n", " ").replace("|", "/")]
             for w in worst])
    if "fidelity" in results:
        fidelity = results["fidelity"]
        rows = [[role, label, *(metrics[label][f"relative_l2_{k}"] for k in ("all", "outlier_elements",
                                                                               "outlier_tokens", "saturated")),
                 metrics[label]["sign_agreement"]]
                for role, metrics in fidelity["by_role"].items() for label in fidelity["candidates"]]
        report += (f"\n## Outlier fidelity ({fidelity['tokens']} tokens; relative L2 error against the norm)\n\n"
                   + markdown_table(["role", "candidate", "all", "outlier elements", "outlier tokens", "saturated",
                                     "sign agreement"], rows))
    return write_results(out, results, report)
