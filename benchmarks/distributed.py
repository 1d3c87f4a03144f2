"""One process against two: the SmolLM2 recipe on this CPU for a few steps with the same global batch.

    python benchmarks/distributed.py [--steps 20] [--topologies one,ddp,fsdp] [--out benchmarks/results]

Runs `recipes/smollm2-135m/dyisru.yaml` (anchored DyISRU, LoRA) for --steps steps of 2 x 256 tokens: on one process
(batch 2), and on two (batch 1 each: the same global batch) with DDP and with FSDP2 (gloo). Writes distributed.json
(and .md): each run's held-out perplexity ratio on the same 4 windows, its training tokens/s in all and per process,
and the ratio of each two-process result to the one-process one. On 2 cores two processes share the cores one
process had, so tokens/s per process measures the overhead of the second process, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_dynorm.reports import markdown_table  # noqa: E402

CONFIGS = ROOT / "recipes" / "accelerate"
LAUNCHERS = {
    "one": ([sys.executable, "-m", "hf_dynorm.distill"], 2),
    "ddp": ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml"),
             "-m", "hf_dynorm.distill"], 1),
    "fsdp": ([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(CONFIGS / "fsdp_cpu_2proc.yaml"), "-m", "hf_dynorm.distill"], 1),
}


def run(topology: str, steps: int, scratch: Path) -> dict:
    launch, batch = LAUNCHERS[topology]
    out = scratch / topology
    command = launch + ["--config", str(ROOT / "recipes" / "smollm2-135m" / "dyisru.yaml"), "--max_steps", str(steps),
                        "--batch_size", str(batch), "--eval_every", str(10 * steps), "--eval_windows", "4",
                        "--save_every", str(10 * steps), "--output_dir", str(out), "--report_to", "none",
                        "--progress", "false"]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if process.returncode != 0:
        raise RuntimeError(f"{topology}: {process.stderr[-3000:]}")
    found = json.loads((out / "final" / "results.json").read_text())
    return {"topology": topology, "wall_seconds": time.perf_counter() - started,
            **{key: found[key] for key in ("world_size", "distributed_type", "tokens", "train_seconds",
                                           "tokens_per_second", "tokens_per_second_per_process",
                                           "start_perplexity_ratio", "final_perplexity_ratio", "train_peak_rss_gb")},
            "final_loss": found["history"][-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--topologies", default="one,ddp,fsdp")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        rows = [run(topology, args.steps, Path(scratch)) for topology in args.topologies.split(",")]
    one = next((r for r in rows if r["topology"] == "one"), None)
    for row in rows:
        print(f"  {row}", flush=True)
        if one is not None:
            row["ratio_vs_one_process"] = row["final_perplexity_ratio"] / one["final_perplexity_ratio"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps({"steps": args.steps, "runs": rows}, indent=2))
    (out / "distributed.md").write_text(markdown_table(
        ["topology", "processes", "held-out ratio", "vs one process", "final loss", "tokens/s", "tokens/s per process",
         "peak RSS GB (main)"],
        [[r["topology"], r["world_size"], r["final_perplexity_ratio"], r.get("ratio_vs_one_process", ""),
          r["final_loss"], r["tokens_per_second"], r["tokens_per_second_per_process"], r["train_peak_rss_gb"]]
         for r in rows]))
    print((out / "distributed.md").read_text())


if __name__ == "__main__":
    main()
