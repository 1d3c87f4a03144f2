"""The benchmark command runs end to end and writes what the README's table is made from. Its numbers are not
asserted: performance goals live in the benchmark's output, never in timed tests."""

import json
import subprocess
import sys
from pathlib import Path

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
    table = (tmp_path / "results.md").read_text()
    assert "| (8, 512, 576) | float32 | forward | 1.00 |" in table
    assert "| (8, 512, 576) | bfloat16 | forward+backward | 1.00 |" in table
