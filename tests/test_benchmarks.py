"""The benchmark command runs end to end and writes what the README's table is made from. Its numbers are not
asserted: performance goals live in the benchmark's output, never in timed tests."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "run.py"


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
    assert "| (8, 512, 576) | float32 | forward | 1.00 |" in table
    assert "| (8, 512, 576) | bfloat16 | forward+backward | 1.00 |" in table
    assert "| op | shape | dtype | copy GB/s | forward GB/s | forward / copy |" in table
    assert "| dyisru_fused | (8, 512, 576) | float32 |" in table


def test_peak_memory_bandwidth_comes_from_the_card_clock_and_bus_width():
    spec = importlib.util.spec_from_file_location("benchmark_run", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    h100_sxm = SimpleNamespace(memory_clock_rate=2_619_000, memory_bus_width=5120)  # kHz, bits: 3.35 TB/s
    assert benchmark.peak_memory_bandwidth_gb_per_s(h100_sxm) == pytest.approx(3352.3, abs=0.1)
    assert benchmark.peak_memory_bandwidth_gb_per_s(SimpleNamespace()) is None  # an older torch: not reported
