"""Every performance goal of hf_dynorm, measured side by side in one process; JSON plus a markdown table.

    python benchmarks/run.py [--quick] [--no-compile] [--skip model,pipeline,distill] [--out benchmarks/results]

Op level: HF's eager RMSNorm and nn.LayerNorm against DyT and DyISRU (reference, fused, torch.compile) and anchored
DyISRU (16 anchors; reference, fused), forward and forward+backward, three shapes and a decode step, fp32 and bf16,
with the fused paths' memory bandwidth against a plain copy timed in the same rounds. On a GPU the Triton kernels
join, timed with CUDA events after an L2 flush, and the card's specified bandwidth is reported too.
Model level: SmolLM2-135M original against converted as its recipes start (and an A/A copy of the original),
forward, a training step, generation, and the time of the norm layers (inside those passes, and called alone on
captured inputs).
Pipeline: calibration, evaluation against a plain forward loop, outlier-fidelity hook overhead. Distillation: a
step per mode, run first (subprocesses: each reports its own peak memory). Times are medians of repeats.
"""

from __future__ import annotations

import argparse
import copy
import functools
import itertools
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import hf_dynorm
from hf_dynorm.allocator import pin_malloc_thresholds
from hf_dynorm.architectures import observing_norm_inputs
from hf_dynorm.config import parse_config
from hf_dynorm.data import full_windows, token_stream
from hf_dynorm.distill import calibrate_as_recipe, convert_as_recipe
from hf_dynorm.modeling_dynorm import DyISRU, DyT
from hf_dynorm.reports import markdown_table

# the three shapes, then one decode step of SmolLM2 (a token at a time: per-call overhead is all there is)
DECODE_SHAPE = (1, 1, 576)
SHAPES = ((8, 512, 576), (4, 2048, 2048), (2, 2048, 4096), DECODE_SHAPE)


def host_timer(function) -> float:
    """Seconds one call of function takes, by the host's clock (CPU work)."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def cuda_timer(flush_bytes: int = 2**30):
    """Seconds one call takes on the GPU: events around the call, after a write of `flush_bytes` that evicts the
    inputs from the L2 cache (an H200 holds 60 MB: the issue's largest bf16 input, 34 MB, would otherwise be read
    from it) and keeps the GPU busy while the host queues the call, so that launch overhead stays out of a
    kernel's time (what triton.testing.do_bench does)."""
    flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(function) -> float:
        flush.zero_()
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return timed


def interleaved_times(functions: dict, repeats: int, warmup: int = 2, timer=host_timer) -> dict[str, list[float]]:
    """Seconds of each call of each function, timed round-robin (one call of each per round) so that a busy moment
    of the machine falls on all candidates alike instead of on whichever was being timed. Each round starts one
    candidate later than the one before, so that none always runs right after the same neighbour."""
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    order = list(functions.items())
    for round_ in range(repeats):
        shift = round_ % len(order)
        for name, function in order[shift:] + order[:shift]:
            times[name].append(timer(function))
    return times


def interleaved_medians(functions: dict, repeats: int, warmup: int = 2, timer=host_timer) -> dict[str, float]:
    return {name: statistics.median(values)
            for name, values in interleaved_times(functions, repeats, warmup, timer).items()}


def peak_memory_bandwidth_gb_per_s(properties) -> float | None:
    """The card's memory bandwidth by its specification: memory clock (kHz) x 2 (double data rate) x bus width
    (bits) / 8, e.g. 3352 GB/s for an H100 SXM (2619 MHz, 5120 bits); None where torch does not report them."""
    clock_khz, bus_bits = getattr(properties, "memory_clock_rate", 0), getattr(properties, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def paired_speedups(times: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round speed ratios baseline time / time (the rounds pair the candidates)."""
    ratios = [b / t for b, t in zip(baseline, times)]
    low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, low, high


# one compiled graph per shape x dtype x pass: lift dynamo's recompile limit, or later shapes silently run eager
torch._dynamo.config.recompile_limit = 256
torch._dynamo.config.accumulated_recompile_limit = 1024


def op_candidates(channels: int, compile_ops: bool, device: str) -> dict[str, nn.Module]:
    def variant(module, **attributes):
        module = copy.deepcopy(module)
        for name, value in attributes.items():
            setattr(module, name, value)
        return module

    dyisru_module, dyt_module = DyISRU(channels, kappa=float(channels)), DyT(channels, alpha=channels ** -0.5)
    candidates = {"rmsnorm_eager": LlamaRMSNorm(channels, eps=1e-5), "layernorm": nn.LayerNorm(channels),
                  "dyt_reference": variant(dyt_module, fused=False), "dyt_fused": variant(dyt_module, triton=False),
                  "dyisru_reference": variant(dyisru_module, fused=False),
                  "dyisru_fused": variant(dyisru_module, triton=False)}
    # anchored DyISRU as the SmolLM2 recipe ships it: 16 coupled channels
    anchored = DyISRU(channels, kappa=float(channels), anchors=torch.arange(0, channels, channels // 16)[:16])
    candidates.update(anchored16_reference=variant(anchored, fused=False),
                      anchored16_fused=variant(anchored, triton=False))
    if device == "cuda":  # the default fused path on a GPU: hf_dynorm's Triton kernels (anchored: forward only)
        candidates.update(dyt_triton=dyt_module, dyisru_triton=dyisru_module, anchored16_triton=anchored)
    if compile_ops:  # what torch.compile(model) makes of the default modules
        candidates.update(dyt_compiled=torch.compile(copy.deepcopy(dyt_module), dynamic=False),
                          dyisru_compiled=torch.compile(copy.deepcopy(dyisru_module), dynamic=False))
    return candidates


def bench_ops(shapes, dtypes, repeats: int, compile_ops: bool, device: str) -> list[dict]:
    """Each candidate's forward and forward+backward time per shape and dtype, with a copy of x into a tensor
    allocated once timed in the same rounds: the bandwidth a streaming op reaches on this device, the ceiling for
    the fused paths (which also allocate their outputs)."""
    timer = cuda_timer() if device == "cuda" else host_timer
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            x = torch.randn(shape, dtype=dtype, device=device) * 3
            grad = torch.randn(shape, dtype=dtype, device=device)
            inputs = x.clone().requires_grad_()
            calls = min(200, max(1, 2**20 // x.numel()))  # small shapes: time a batch of calls, not one
            passes = {}
            for name, module in op_candidates(shape[-1], compile_ops, device).items():
                module = module.to(dtype).to(device)

                def forward(module=module):
                    with torch.no_grad():
                        for _ in range(calls):
                            module(x)

                def forward_backward(module=module):
                    for _ in range(calls):
                        inputs.grad = None
                        module(inputs).backward(grad)

                passes[name, "forward"], passes[name, "forward_backward"] = forward, forward_backward

            copy_target = torch.empty_like(x)  # allocated once: the copy measures bandwidth, not page faults

            def copy_x():
                for _ in range(calls):
                    copy_target.copy_(x)

            passes["copy", "forward"] = copy_x
            seconds = interleaved_medians(passes, repeats, timer=timer)
            # the least memory traffic possible: x in and y out forward (as a copy); x, grad in and dx out backward
            size = x.numel() * x.element_size()
            copy_ms = 1e3 * seconds["copy", "forward"] / calls
            copy_gb_per_s = 2 * size / copy_ms / 1e6
            for name in dict.fromkeys(name for name, _ in passes if name != "copy"):
                row = {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "op": name,
                       "forward_ms": 1e3 * seconds[name, "forward"] / calls,
                       "forward_backward_ms": 1e3 * seconds[name, "forward_backward"] / calls,
                       "copy_ms": copy_ms, "copy_gb_per_s": copy_gb_per_s}
                for pass_, traffic in (("forward", 2 * size), ("forward_backward", 5 * size)):
                    row[f"{pass_}_gb_per_s"] = traffic / row[f"{pass_}_ms"] / 1e6
                    row[f"{pass_}_share_of_copy"] = row[f"{pass_}_gb_per_s"] / copy_gb_per_s
                rows.append(row)
                print(f"  op {row}", flush=True)
    for row in rows:  # ratios against HF's eager RMSNorm on the same shape and dtype
        base = next(r for r in rows if r["shape"] == row["shape"] and r["dtype"] == row["dtype"]
                    and r["op"] == "rmsnorm_eager")
        row["forward_ratio"] = row["forward_ms"] / base["forward_ms"]
        row["forward_backward_ratio"] = row["forward_backward_ms"] / base["forward_backward_ms"]
    return rows


def norm_inputs(model: nn.Module, ids: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Each norm site of `model` with the input it gets in a forward of ids, in call order."""
    captured = []
    observers = {site.name: lambda x, name=site.name: captured.append((name, x))
                 for site in hf_dynorm.find_norm_sites(model)}
    with torch.no_grad(), observing_norm_inputs(model, observers) as run:
        run(input_ids=ids)
    return captured


def bench_model_norms(models: dict, ids: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds that each model spends in its norm layers per forward of ids ("forward") and per decode step
    ("decode"): all of them called on the inputs they get in the original's forward, the models interleaved. A
    decode step's input is the last position of the first sequence (causal: what generation feeds that position).
    Measured apart, because inside the forward the other ~99% of the time drowns their difference in run-to-run
    noise."""
    captured = norm_inputs(models["original"], ids)
    steps = {"forward": captured, "decode": [(name, x[:1, -1:].contiguous()) for name, x in captured]}
    seconds = {step: interleaved_medians({name: norm_layer_calls(model, inputs) for name, model in models.items()},
                                         repeats) for step, inputs in steps.items()}
    return {name: {step: seconds[step][name] for step in steps} for name in models}


def norm_layer_calls(model: nn.Module, inputs: list[tuple[str, torch.Tensor]]):
    """A call of every norm layer of `model` on its input, without gradients."""
    modules = [(model.get_submodule(name), x) for name, x in inputs]

    def call():
        with torch.no_grad():
            for module, x in modules:
                module(x)

    return call


@contextmanager
def timing_norm_layers(models: dict, site_names: list[str]):
    """Within the block, hooks around every norm layer of each model add the seconds spent inside it to one
    counter; yields a timer for `interleaved_times` that gives a call's seconds inside the norm layers. This is what
    the real forward pays: each norm's input was just written by a residual add and the threads come back from a
    matmul, which a replay of captured inputs does not reproduce (on this CPU a (2, 256, 576) RMSNorm took 120-145 us
    alone and 370-470 us right after a matmul, DyISRU 130-145 and 260-360 us: benchmarks/README.md)."""
    spent, started = [0.0], {}

    def start(module, args):
        started[module] = time.perf_counter()

    def stop(module, args, output):
        spent[0] += time.perf_counter() - started[module]

    layers = [model.get_submodule(name) for model in models.values() for name in site_names]
    handles = [hook for layer in layers
               for hook in (layer.register_forward_pre_hook(start), layer.register_forward_hook(stop))]

    def norm_seconds(function) -> float:
        spent[0] = 0.0
        function()
        return spent[0]

    try:
        yield norm_seconds
    finally:
        for handle in handles:
            handle.remove()


RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m"
RECIPE_STARTS = {"dyisru": "dyisru-pure.yaml", "dyisru anchored k=16": "dyisru.yaml", "dyt": "dyt.yaml"}


def recipe_start(original: nn.Module, recipe: str) -> nn.Module:
    """A copy of `original` converted as the SmolLM2 recipe `recipe` starts its student: calibrated, bounded, and
    anchored where the recipe is. With default parameters every site swapped blows SmolLM2's activations up (README,
    zero-shot), and an anchored model's training step then ran 4.5-4.8x slower than the original's (10.5 against
    2.2 s): denormal numbers in its matmuls, a cost of the broken numbers and not of the norms."""
    config = parse_config(["--config", str(RECIPES / recipe)])
    model = copy.deepcopy(original)
    windows = training_windows(config.model, config.data, config.train_split, config.seq_len)
    parameters, _ = calibrate_as_recipe(model, config, windows)
    return convert_as_recipe(model, config, parameters)


@functools.cache
def training_windows(model: str, data: str, split: str, seq_len: int) -> torch.Tensor:
    """A recipe's training windows, tokenized once for all the recipes that share them."""
    tokenizer = hf_dynorm.load_tokenizer(model)
    return full_windows(token_stream(data, tokenizer, split), seq_len)


def bench_model(repeats: int) -> list[dict]:
    """Tokens/s of SmolLM2-135M original against converted (each as its recipe starts: `recipe_start`): a forward
    and a training step of 2 x 256 tokens, and greedy generation of 32 tokens after a 32-token prompt (decode: one
    token per forward, where per-call overhead counts). "original (copy)" is an A/A control: its spread is the noise
    floor of the ratios. The time each model spends in its norm layers is measured twice: inside the real forward
    and generate passes (timing_norm_layers), and called on captured inputs (bench_model_norms)."""
    # every model a deep copy, so that all hold their weights in memory allocated the same way
    original = copy.deepcopy(hf_dynorm.load_model("smollm2-135m"))
    models = {"original": original, "original (copy)": copy.deepcopy(original),
              **{name: recipe_start(original, recipe) for name, recipe in RECIPE_STARTS.items()}}
    ids = torch.randint(0, 49152, (2, 256), generator=torch.Generator().manual_seed(0))
    prompt, new_tokens = ids[:1, :32], 32
    passes = {}
    for name, model in models.items():
        model.eval()

        def forward(model=model):
            with torch.no_grad():
                model(input_ids=ids)

        def train_step(model=model):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()

        def generate(model=model):
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens)

        passes[name, "forward"], passes[name, "train_step"], passes[name, "generate"] = forward, train_step, generate
    times = interleaved_times(passes, repeats, warmup=1)
    tokens = {"forward": ids.numel(), "train_step": ids.numel(), "generate": new_tokens}
    norm_seconds = bench_model_norms(models, ids, 10 * repeats)
    with timing_norm_layers(models, [site.name for site in hf_dynorm.find_norm_sites(original)]) as norm_timer:
        in_situ = interleaved_times({key: passes[key] for key in passes if key[1] != "train_step"}, repeats,
                                    warmup=1, timer=norm_timer)
    in_situ = {name: {"forward": statistics.median(in_situ[name, "forward"]),
                      "decode": statistics.median(in_situ[name, "generate"]) / new_tokens} for name in models}
    # the original's time per forward and per decode step (a generated token, the prompt's prefill included)
    original = {"forward": statistics.median(times["original", "forward"]),
                "decode": statistics.median(times["original", "generate"]) / new_tokens}
    rows = []
    for name in models:
        row = {"model": name}
        for (step, seconds), (measure, norm_times) in itertools.product(
                original.items(), (("in_situ", in_situ), ("replayed", norm_seconds))):
            # the whole-model ratio that swapping the norm layers' time alone implies (above 1 is faster)
            norm_time, original_norm_time = norm_times[name][step], norm_times["original"][step]
            row |= {f"norm_layers_{measure}_ms_per_{step}": 1e3 * norm_time,
                    f"norm_layers_{measure}_share_of_original_{step}": norm_time / seconds,
                    f"expected_{step}_ratio_{measure}": seconds / (seconds - original_norm_time + norm_time)}
        for kind, count in tokens.items():
            row[f"{kind}_tokens_per_s"] = count / statistics.median(times[name, kind])
            row[f"{kind}_ratio"], row[f"{kind}_ratio_q1"], row[f"{kind}_ratio_q3"] = paired_speedups(
                times[name, kind], times["original", kind])
        rows.append(row)
        print(f"  model {row}", flush=True)
    return rows


def bench_pipeline(windows: int) -> dict:
    from hf_dynorm.calibration import calibrate
    from hf_dynorm.evaluation import perplexity
    from hf_dynorm.fidelity import outlier_fidelity

    model, tokenizer = hf_dynorm.load_model("smollm2-135m"), hf_dynorm.load_tokenizer("smollm2-135m")
    train = token_stream("wiki-sample", tokenizer, "train")
    test = token_stream("wiki-sample", tokenizer, "test")[: windows * 512]
    batches = full_windows(test, 512)

    def plain_loop():
        with torch.no_grad():
            for first in range(0, len(batches), 4):
                model(input_ids=batches[first:first + 4])

    def calibration_pass(autocast):
        started = time.perf_counter()
        result = calibrate(model, train, window=512, max_windows=windows, autocast=autocast, progress=False)
        return result, time.perf_counter() - started

    # interleaved repeats, best of each: the first forward of a process is slower, and the machine is shared
    plain, evaluation, fidelity_s, calibration_s = [], [], [], {None: [], torch.bfloat16: []}
    calibrations = {}
    for _ in range(3):
        plain.append(host_timer(plain_loop))
        evaluation.append(perplexity(model, test, progress=False).seconds)
        for autocast, seconds in calibration_s.items():
            calibrations[autocast], elapsed = calibration_pass(autocast)
            seconds.append(elapsed)
        fidelity_s.append(host_timer(lambda: outlier_fidelity(model, test, calibration=calibrations[None],
                                                              max_windows=windows, progress=False)))
    plain, evaluation, fidelity_s = min(plain), min(evaluation), min(fidelity_s)
    exact, fast = calibrations[None], calibrations[torch.bfloat16]
    kappas, fast_kappas = exact.parameters("dyisru")[0], fast.parameters("dyisru")[0]
    tokens = batches.numel()
    return {"tokens": tokens, "plain_forward_tokens_per_s": tokens / plain,
            "perplexity_tokens_per_s": tokens / evaluation, "perplexity_vs_plain_ratio": evaluation / plain,
            "calibration_tokens_per_s": exact.tokens / min(calibration_s[None]),
            "calibration_seconds_per_64k_tokens": min(calibration_s[None]) * 65536 / exact.tokens,
            "calibration_bf16_autocast_seconds_per_64k_tokens": min(calibration_s[torch.bfloat16]) * 65536
            / fast.tokens,
            "calibration_bf16_autocast_max_kappa_change": max(abs(fast_kappas[n] / kappas[n] - 1) for n in kappas),
            "calibration_bf16_autocast_sites_with_other_anchors_k4": sum(
                exact.sites[n].anchors(4) != fast.sites[n].anchors(4) for n in exact.sites),
            "fidelity_vs_plain_ratio": fidelity_s / plain}


def bench_distill(steps: int, pinned: bool) -> list[dict]:
    """One subprocess per mode; peak RSS of the training loop alone (Linux VmHWM, reset when the loop starts).
    'no teacher' runs the student alone (cross-entropy) for the single-copy teacher's memory ratio."""
    rows = []
    base = ["--seq_len", "256", "--batch_size", "2", "--max_steps", str(steps), "--eval_every", "1000",
            "--save_every", "1000", "--eval_windows", "1", "--calibration_windows", "4", "--report_to", "none",
            "--progress", "false"]
    cases = [("norms", []), ("norms, no teacher", ["--kl_weight", "0", "--ce_weight", "1"]),
             ("lora", []), ("full", [])]
    for label, extra in cases:
        mode = label.split(",")[0]
        with tempfile.TemporaryDirectory() as out:
            script = ("import json, sys\nfrom hf_dynorm.allocator import pin_malloc_thresholds\n"
                      "from hf_dynorm.config import parse_config\nfrom hf_dynorm.distill import train\n"
                      f"{'pin_malloc_thresholds()' if pinned else ''}\n"
                      "r = train(parse_config(sys.argv[1:]))\n"
                      "print('RESULT', json.dumps({'tokens_per_second': r['tokens_per_second'], "
                      "'peak_rss_gb': r['train_peak_rss_gb']}))")
            run = subprocess.run([sys.executable, "-c", script, "--mode", mode, "--output_dir", out, *base, *extra],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                raise RuntimeError(run.stderr[-2000:])
            result = json.loads(run.stdout.rpartition("RESULT ")[2].splitlines()[0])
        rows.append({"mode": label, **result})
        print(f"  distill {rows[-1]}", flush=True)
    return rows


def bandwidth_table(results: dict) -> str:
    """The fused paths' effective memory bandwidth at the issue's shapes, against a plain copy of x timed in the
    same rounds (and, on a GPU, against the card's specification)."""
    peak = results.get("device_peak_gb_per_s")
    header = ["op", "shape", "dtype", "copy GB/s", "forward GB/s", "forward / copy", "forward+backward GB/s",
              "forward+backward / copy", *(["forward / peak"] if peak else [])]
    rows = [[r["op"], str(tuple(r["shape"])), r["dtype"], f"{r['copy_gb_per_s']:.1f}",
             f"{r['forward_gb_per_s']:.1f}", f"{r['forward_share_of_copy']:.0%}",
             f"{r['forward_backward_gb_per_s']:.1f}", f"{r['forward_backward_share_of_copy']:.0%}",
             *([f"{r['forward_gb_per_s'] / peak:.0%}"] if peak else [])]
            for r in results["ops"] if r["op"].endswith(("_fused", "_triton")) and tuple(r["shape"]) != DECODE_SHAPE]
    intro = ("Effective memory bandwidth of the fused paths, counting only the unavoidable reads and writes (forward: "
             "x in, y out; backward: x and the gradient in, dx out), against a plain copy of x timed in the same "
             "rounds" + (f" and the card's {peak:.0f} GB/s by its specification" if peak else "") + "\n")
    return intro + "\n" + markdown_table(header, rows) + "\n"


def report(results: dict) -> str:
    lines = [f"# hf_dynorm benchmarks\n\nMachine: {results['machine']}; torch {results['torch']}, "
             f"{results['threads']} threads; glibc malloc thresholds "
             f"{'pinned' if results.get('malloc_thresholds_pinned') else 'adaptive'}. Times are medians; "
             "ratios are against HF's eager RMSNorm (ops) or the "
             "original model, measured side by side in the same process.\n"]
    if results.get("ops"):
        lines.append("## Ops (ratio to HF eager RMSNorm; below 1 is faster)\n")
        ops = sorted({r["op"] for r in results["ops"]}, key=[r["op"] for r in results["ops"]].index)
        header = ["shape", "dtype", "pass", *ops]
        rows = []
        for shape in {tuple(r["shape"]) for r in results["ops"]}:
            for dtype in ("float32", "bfloat16"):
                subset = {r["op"]: r for r in results["ops"] if tuple(r["shape"]) == shape and r["dtype"] == dtype}
                if subset:
                    for kind in ("forward", "forward_backward"):
                        rows.append([str(shape), dtype, kind.replace("_", "+"),
                                     *(f"{subset[o][kind + '_ratio']:.2f}" if o in subset else "" for o in ops)])
        base = {(tuple(r["shape"]), r["dtype"]): r for r in results["ops"] if r["op"] == "rmsnorm_eager"}
        lines.append(markdown_table(header, sorted(rows)))
        lines.append("\nHF eager RMSNorm itself (ms, forward / forward+backward): " + ", ".join(
            f"{shape} {dtype}: {r['forward_ms']:.3g} / {r['forward_backward_ms']:.3g}"
            for (shape, dtype), r in sorted(base.items())) + "\n")
        lines.append(bandwidth_table(results))
    if results.get("model"):
        kinds = {"forward": "forward 2 x 256", "train_step": "train step 2 x 256", "generate": "generate 32"}
        lines.append("## SmolLM2-135M (tokens/s; ratio to the original: median [quartiles] of paired rounds)\n")
        lines.append(markdown_table(
            ["model", *(f"{label} {what}" for label in kinds.values() for what in ("tokens/s", "ratio"))],
            [[r["model"], *(cell for kind in kinds for cell in (
                r[f"{kind}_tokens_per_s"],
                f"{r[f'{kind}_ratio']:.3f} [{r[f'{kind}_ratio_q1']:.3f}, {r[f'{kind}_ratio_q3']:.3f}]"))]
             for r in results["model"]]))
        steps = {"forward": "per 2 x 256 forward", "decode": "per decode step"}
        for measure, caption in (
                ("in_situ", "Norm layers inside the real passes (hooks around each; a decode step: a generated "
                            "token's share of generate): ms"),
                ("replayed", "Norm layers alone, every one called on the inputs of the original's 2 x 256 forward "
                             "(for a decode step: on its last position): ms")):
            lines.append(f"\n{caption}, share of the original's time, and the whole-model ratio that their time "
                         "implies (above 1 is faster)\n")
            lines.append(markdown_table(
                ["model", *(f"{what} {label}" for label in steps.values()
                            for what in ("norm layers ms", "share", "expected ratio"))],
                [[r["model"], *(cell for step in steps for cell in (
                    f"{r[f'norm_layers_{measure}_ms_per_{step}']:.3g}",
                    f"{100 * r[f'norm_layers_{measure}_share_of_original_{step}']:.2f}%",
                    f"{r[f'expected_{step}_ratio_{measure}']:.4f}"))] for r in results["model"]]))
    if results.get("pipeline"):
        p = results["pipeline"]
        lines.append("\n## Pipeline (SmolLM2-135M, wiki-sample)\n")
        lines.append(markdown_table(["measure", "value"], [[k, v] for k, v in p.items()]))
    if results.get("distill"):
        lines.append("\n## Distillation step (SmolLM2-135M, 2 x 256 tokens)\n")
        lines.append(markdown_table(["mode", "tokens/s", "training-loop peak RSS (GB)"],
                                    [[r["mode"], r["tokens_per_second"], r["peak_rss_gb"]]
                                     for r in results["distill"]]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: ops,model,pipeline,distill")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="op-level device; on cuda the Triton kernels join the comparison")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's malloc thresholds adaptive (the CLI pins them; benchmarks/README.md)")
    args = parser.parse_args()
    pinned = not args.default_malloc and pin_malloc_thresholds()
    skip = set(filter(None, args.skip.split(",")))
    repeats = 3 if args.quick else 7
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or ''}"
               .strip(", "), "torch": torch.__version__, "threads": torch.get_num_threads(), "device": args.device,
               "malloc_thresholds_pinned": pinned}
    if args.device == "cuda":
        results["machine"] += f"; ops on {torch.cuda.get_device_name()}"
        results["device_peak_gb_per_s"] = peak_memory_bandwidth_gb_per_s(torch.cuda.get_device_properties())
    started = time.perf_counter()
    if "distill" not in skip:  # first, while this process holds nothing: measured 25-30% slower after the rest
        results["distill"] = bench_distill(2 if args.quick else 3, pinned)
    if "ops" not in skip:
        results["ops"] = bench_ops(SHAPES[:1] if args.quick else SHAPES, (torch.float32, torch.bfloat16), repeats,
                                   not args.no_compile, args.device)
    if "model" not in skip:
        results["model"] = bench_model(3 if args.quick else 11)
    if "pipeline" not in skip:
        results["pipeline"] = bench_pipeline(4 if args.quick else 16)
    results["seconds"] = time.perf_counter() - started
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
