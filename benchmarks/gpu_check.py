"""Every GPU question of the README ("not measured yet") in one short run on a CUDA machine with 1+ GPUs.

    bash benchmarks/gpu_check.sh [--model smollm2-135m | FOLDER | HUB_ID] [--steps 60] [--out DIR]

Writes DIR/gpu_check.json (default benchmarks/results/):
- `kernels`: every fused path at (2, 2048, 4096) bf16 against HF's eager RMSNorm and a plain copy timed in the same
  rounds (CUDA events after an L2 flush), with each one's share of the copy's and of the card's specified bandwidth;
- `distill`: the committed SmolLM2 recipe (anchored DyISRU, LoRA) in bf16 for a fixed budget of steps of 8 x 1024
  tokens, on one GPU, then DDP and FSDP2 over every visible GPU (FSDP on one GPU where there is only one):
  tokens/s (in all and per GPU), peak GPU memory, the held-out perplexity ratio, and FSDP's sharding.
A model whose weights are not here runs as a random SmolLM2-shaped model (`random_weights: true`): its speed and
memory are real, its ratios mean nothing. Sized to finish in under 8 minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def kernels() -> dict:
    from run import bench_ops, peak_memory_bandwidth_gb_per_s

    rows = bench_ops([(2, 2048, 4096)], [torch.bfloat16], repeats=20, compile_ops=False, device="cuda")
    peak = peak_memory_bandwidth_gb_per_s(torch.cuda.get_device_properties(0))
    for row in rows:
        row["forward_share_of_peak"] = row["forward_gb_per_s"] / peak if peak else None
        row["forward_backward_share_of_peak"] = row["forward_backward_gb_per_s"] / peak if peak else None
    return {"device_peak_gb_per_s": peak, "ops": rows}


def model_folder(name: str, scratch: Path) -> tuple[str, bool]:
    """(a model to distil, whether its weights are random): the named one when it loads here, else a random model
    of SmolLM2-135M's shape with the embedded tokenizer's files when those are here."""
    import hf_dynorm

    try:
        hf_dynorm.load_tokenizer(name)
        return name, False
    except Exception as error:  # no assets, no Hub: measure speed and memory on random weights
        print(f"gpu_check: {name} is not available here ({type(error).__name__}: {error}); using random weights")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0)
    folder = scratch / "random-smollm2"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(49152)} | {"<unk>": 0}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(folder)
    return str(folder), True


def distill(model: str, data: str, steps: int, scratch: Path, launch: list[str], label: str) -> dict:
    out = scratch / label
    command = launch + ["--config", str(ROOT / "recipes" / "smollm2-135m" / "dyisru.yaml"), "--model", model,
                        "--data", data, "--mixed_precision", "bf16", "--max_steps", str(steps), "--seq_len", "1024",
                        "--batch_size", "8", "--eval_every", str(10 * steps), "--eval_windows", "8",
                        "--eval_window", "1024", "--save_every", str(10 * steps), "--calibration_windows", "16",
                        "--output_dir", str(out), "--report_to", "none", "--progress", "false"]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    row = {"label": label, "seconds": time.perf_counter() - started, "returncode": run.returncode}
    if run.returncode != 0:
        return {**row, "stderr": run.stderr[-3000:]}
    found = json.loads((out / "final" / "results.json").read_text())
    keys = ("world_size", "distributed_type", "mixed_precision", "tokens", "train_seconds", "tokens_per_second",
            "tokens_per_second_per_process", "train_peak_gpu_gb", "start_perplexity_ratio", "final_perplexity_ratio",
            "teacher_perplexity", "sharding", "skipped_steps")
    return {**row, **{key: found.get(key) for key in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="wiki-sample")
    parser.add_argument("--steps", type=int, default=60, help="distillation steps of 8 x 1024 tokens per process")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--skip", default="", help="kernels,distill")
    parser.add_argument("--plumbing-on-cpu", action="store_true",
                        help="no GPU: run the distillation launches on the CPU (tiny --steps) to check this script")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.plumbing_on_cpu:
        sys.exit("gpu_check needs a CUDA GPU (this machine has none): nothing measured")
    import tempfile

    gpus = max(torch.cuda.device_count(), 1)
    results = {"torch": torch.__version__, "gpus": gpus, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (plumbing on CPU)"}
    skip = set(args.skip.split(",")) | ({"kernels"} if args.plumbing_on_cpu else set())
    if "kernels" not in skip:
        results["kernels"] = kernels()
    if "distill" not in skip:
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            model, random_weights = model_folder(args.model, scratch)
            data = args.data
            if random_weights:  # a word-level text the random tokenizer knows
                (scratch / "words.txt").write_text(" ".join(f"w{i % 49151 + 1}" for i in range(600_000)))
                data = str(scratch / "words.txt")
            results["distill"] = {"model": args.model, "random_weights": random_weights, "runs": []}
            accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
            launches = [("single GPU", [sys.executable, "-m", "hf_dynorm.distill"])]
            if gpus > 1:
                launches.append((f"DDP x{gpus}", accelerate + ["--multi_gpu", "-m", "hf_dynorm.distill"]))
            launches.append((f"FSDP x{gpus}", accelerate + ["--config_file", str(ROOT / "recipes" / "accelerate" /
                                                                                  "fsdp.yaml"),
                                                            "-m", "hf_dynorm.distill"]))
            for label, launch in launches:
                results["distill"]["runs"].append(distill(model, data, args.steps, scratch, launch,
                                                          label.replace(" ", "_")))
                print(f"gpu_check: {results['distill']['runs'][-1]}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    target = Path(args.out) / "gpu_check.json"
    target.write_text(json.dumps(results, indent=2, default=str))
    print(f"gpu_check: wrote {target}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
