"""The command line end to end on a tiny model with its own tokenizer and text."""

import json
import subprocess
import sys

import pytest

import hf_dynorm
from tiny import save_tiny_checkpoint


def cli(*args, timeout=600):
    run = subprocess.run([sys.executable, "-m", "hf_dynorm.cli", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cli"))


def test_convert_with_calibration_then_info_eval_and_fidelity(tiny, tmp_path):
    model, text = tiny
    out = tmp_path / "converted"
    cli("convert", model, out, "--norm", "dyisru", "--calibration", text, "--anchors", "2", "--estimator", "mean",
        "--calibration-windows", "4", "--calibration-autocast", "bf16")
    record = hf_dynorm.load_model(out).config.dynorm
    assert record["calibration"]["estimator"] == "mean" and record["calibration"]["data"] == str(text)
    assert record["calibration"]["autocast"] == "bfloat16"
    assert (out / "tokenizer.json").exists()
    assert "dyisru at 5 sites" in cli("info", out)
    assert "attn_input" in cli("info", model)
    report = cli("eval", out, "--reference", model, "--data", text, "--window", "32", "--fidelity",
                 "--out", tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["perplexity_ratio"] > 0 and "converted" in results["fidelity"]["candidates"]
    assert results["model_fingerprint"] and "Outlier fidelity" in report
    assert (tmp_path / "eval" / "fidelity_by_depth.png").exists()


def test_convert_with_a_bound(tiny, tmp_path):
    model, text = tiny
    cli("convert", model, tmp_path / "bounded", "--norm", "dyt", "--bound", "0.5", "--calibration", text,
        "--calibration-windows", "2")
    assert hf_dynorm.load_model(tmp_path / "bounded").config.dynorm["parameters"]["bound"] == "0.5 x token rms"


def test_zero_shot_calibration_report(tiny, tmp_path, monkeypatch):
    model, text = tiny
    from hf_dynorm import reports

    monkeypatch.setattr(reports, "ANCHOR_COUNTS", (0, 2))
    results = reports.zero_shot_report(model, text, tmp_path, windows=4, eval_windows=2, window=32)
    assert len(results["all_sites"]) == 2 + 4 + 2 * 4 + 1 + 2 * len(reports.BOUNDS)
    assert len(results["sensitivity"]) == 5 and results["cumulative"][-1]["sites"] == 5
    assert "All sites swapped" in (tmp_path / "report.md").read_text()


def test_paper_demo_cli(tmp_path):
    assert "DyISRU beta" in cli("paper-demo", "--out", tmp_path)
    assert (tmp_path / "paper_demo.png").exists()


def test_unknown_arguments_are_refused():
    run = subprocess.run([sys.executable, "-m", "hf_dynorm.cli", "info", "x", "--bogus"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and "unrecognized arguments: --bogus" in run.stderr


def test_malloc_thresholds_are_pinned_on_glibc_unless_the_user_set_them(monkeypatch):
    import platform

    from hf_dynorm.allocator import pin_malloc_thresholds

    assert pin_malloc_thresholds() is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_malloc_thresholds() is False
