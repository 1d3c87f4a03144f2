"""The command line end to end on a tiny model with its own tokenizer and text."""

import json
import math
import subprocess
import sys

import pytest

import hf_dynorm
from hf_dynorm.data import token_stream
from tiny import hand_mean_nll, save_tiny_checkpoint


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
    tokens = token_stream(str(text), hf_dynorm.load_tokenizer(model))
    expected = math.exp(hand_mean_nll(hf_dynorm.load_model(out), tokens, 32)
                        - hand_mean_nll(hf_dynorm.load_model(model), tokens, 32))
    assert results["perplexity_ratio"] == pytest.approx(expected, rel=1e-5)
    assert "converted" in results["fidelity"]["candidates"]
    assert results["model_fingerprint"] and "Outlier fidelity" in report
    assert (tmp_path / "eval" / "fidelity_by_depth.png").exists()


def test_convert_with_a_bound(tiny, tmp_path):
    model, text = tiny
    cli("convert", model, tmp_path / "bounded", "--norm", "dyt", "--bound", "0.5", "--calibration", text,
        "--calibration-windows", "2")
    assert hf_dynorm.load_model(tmp_path / "bounded").config.dynorm["parameters"]["bound"] == "0.5 x token rms"


def test_zero_shot_calibration_report(tiny, tmp_path, monkeypatch):
    model, text = tiny
    from hf_dynorm import sweep as reports

    monkeypatch.setattr(reports, "ANCHOR_COUNTS", (0, 2))
    results = reports.zero_shot_report(model, text, tmp_path, windows=4, eval_windows=2, window=32)
    assert len(results["all_sites"]) == 2 + 4 + 2 * 4 + 1 + 2 * len(reports.BOUNDS)
    assert len(results["sensitivity"]) == 5 and results["cumulative"][-1]["sites"] == 5
    # a row against its own computation by hand: DyT with the paper's alpha swapped at every site
    original, tokens = hf_dynorm.load_model(model), token_stream(str(text), hf_dynorm.load_tokenizer(model), "test")
    tokens = tokens[:2 * 32]
    swapped = hf_dynorm.convert(hf_dynorm.load_model(model), "dyt", alpha=reports.DYT_PAPER_ALPHA)
    expected = math.exp(hand_mean_nll(swapped, tokens, 32) - hand_mean_nll(original, tokens, 32))
    row = next(r for r in results["all_sites"] if r["estimator"] == f"paper alpha {reports.DYT_PAPER_ALPHA}")
    assert row["perplexity_ratio"] == pytest.approx(expected, rel=1e-5)
    report = (tmp_path / "report.md").read_text()
    assert f"| dyt | paper alpha {reports.DYT_PAPER_ALPHA} | 0 | {expected:.4g} |" in report


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


def test_eval_runs_a_local_lm_eval_task_into_results_report_and_card(tiny, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install hf_dynorm[eval]")
    import torch

    model, text = tiny
    out = tmp_path / "converted"
    cli("convert", model, out, "--norm", "dyt")
    # a cloze task on the tiny text: each item's target is one word, so lm-eval's accuracy (is the target the greedy
    # continuation) can be counted by hand from the logits at the end of the context
    lines = text.read_text().splitlines()[:12]
    items = [{"context": " ".join(line.split()[:5]), "target": line.split()[5]} for line in lines]
    data = tmp_path / "task" / "cloze.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(item) for item in items))
    task = data.with_name("tiny_cloze.yaml")
    task.write_text(f"task: tiny_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    "output_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{context}}'\n"
                    "doc_to_target: \"{{' ' + target}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
                    "    higher_is_better: true\n")
    report = cli("eval", out, "--reference", model, "--data", text, "--window", "32", "--tasks", task,
                 "--prompts", "2", "--out", tmp_path / "eval")
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    tokenizer = hf_dynorm.load_tokenizer(model)
    for who, folder in (("model", out), ("reference", model)):
        scored = hf_dynorm.load_model(folder)
        hits = 0
        with torch.no_grad():
            for item in items:
                context = torch.tensor([tokenizer(item["context"])["input_ids"]])
                target = tokenizer(item["target"], add_special_tokens=False)["input_ids"]
                hits += int(scored(context).logits[0, -1].argmax()) == target[0]
        assert results["tasks"][str(task)][who]["acc"] == pytest.approx(hits / len(items))
    assert "Downstream tasks" in report and str(task) in report
    cli("card", out, "--results", tmp_path / "eval" / "results.json")
    card = (out / "README.md").read_text()
    assert "name: tiny_cloze acc" in card and "name: Agreement with the base model (top1)" in card
