"""Publishing: the dry-run stage reloads without hf_dynorm, the card tells the truth, one commit, errors."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import hf_dynorm
from hf_dynorm.conversion import save_converted
from hf_dynorm.hub import PublishError, model_fingerprint, push_to_hub, render_card
from tiny import VOCAB, reload_without_hf_dynorm, tiny_inputs, tiny_model, tiny_tokenizer


@pytest.fixture
def converted(tmp_path):
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru", anchors=[1])
    folder = tmp_path / "model"
    save_converted(model, folder, tiny_tokenizer())
    return model, folder


def results_for(folder, tmp_path, perplexity=12.5, reference=10.0):
    results = {"model": {"perplexity": perplexity, "tokens": 2048, "window_nll_percentiles": {"p100": 3.1}},
               "reference": {"perplexity": reference}, "perplexity_ratio": perplexity / reference,
               "data": "wiki-sample", "model_fingerprint": model_fingerprint(folder)}
    path = tmp_path / "eval" / "results.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results))
    return path


def card_metadata(readme):
    text = readme.read_text()
    return yaml.safe_load(text.split("---")[1]), text


def test_dry_run_stage_reloads_without_hf_dynorm_and_the_card_holds_the_given_numbers(converted, tmp_path):
    model, folder = converted
    results = results_for(folder, tmp_path)
    (results.parent / "curve.png").write_bytes(b"\x89PNG fake")
    stage = tmp_path / "stage"
    push_to_hub(folder, "someone/tiny-dyisru", results=str(results), dry_run_dir=stage)
    names = {p.name for p in stage.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_dynorm.py", "README.md", "results.json", "curve.png",
            "tokenizer.json"} <= names
    metadata, text = card_metadata(stage / "README.md")
    assert metadata["library_name"] == "transformers" and "dyisru" in metadata["tags"]
    values = sorted(m["value"] for entry in metadata["model-index"] for r in entry["results"] for m in r["metrics"])
    assert values == sorted([12.5, 10.0, 1.25])
    assert "trust_remote_code=True" in text and "arXiv:2503.21708" in text and "curve.png" in text

    inputs = tiny_inputs()
    with torch.no_grad():
        identical, errors = reload_without_hf_dynorm(stage, inputs, model(inputs).logits)
    assert identical, errors


def test_card_without_evaluation_claims_no_numbers(converted):
    _, folder = converted
    card = render_card(folder)
    metadata = yaml.safe_load(str(card).split("---")[1])
    assert "model-index" not in metadata
    assert "not been evaluated" in str(card) and "zero-shot conversion" in str(card)
    assert "output bound sqrt(C) (the paper's)" in str(card)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_card_says_how_the_model_was_calibrated(tmp_path, autocast):
    ids = torch.randint(3, VOCAB, (1024,), generator=torch.Generator().manual_seed(0))
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru", calibration=ids, window=32, anchors=2, autocast=autocast,
                              progress=False)
    save_converted(model, tmp_path / "model", tiny_tokenizer())
    card = str(render_card(tmp_path / "model"))
    assert "`median` estimator on 1024 tokens" in card and "2 anchor channel(s) per site" in card
    assert ("the pass ran its matmuls in bfloat16" in card) == (autocast is not None)


def test_push_sends_every_staged_file_in_one_commit(converted, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    _, folder = converted
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", repo_id))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, operations, **kw: calls.setdefault(
        "operations", [op.path_in_repo for op in operations]) and "https://hub/commit/1")
    results = results_for(folder, tmp_path)
    push_to_hub(folder, "someone/tiny", results=str(results), token="hf_fake")
    stage = tmp_path / "stage"
    push_to_hub(folder, "someone/tiny", results=str(results), dry_run_dir=stage)
    assert calls["repo"] == "someone/tiny"
    assert sorted(calls["operations"]) == sorted(p.name for p in stage.iterdir())


def test_push_a_model_object_directly(tmp_path):
    model = hf_dynorm.convert(tiny_model("gpt2"), "dyt")
    stage = tmp_path / "stage"
    push_to_hub(model, "someone/tiny-gpt2", tokenizer=tiny_tokenizer(), dry_run_dir=stage)
    assert (stage / "tokenizer.json").exists() and (stage / "README.md").exists()


def test_publish_errors_upload_nothing(converted, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    _, folder = converted
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("nothing may be uploaded"))
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("nothing may be created"))
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PublishError, match="not logged in"):
        push_to_hub(folder, "someone/tiny")
    with pytest.raises(PublishError, match="malformed"):
        push_to_hub(folder, "no namespace!", token="hf_fake")
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    with pytest.raises(PublishError, match="not a converted model folder"):
        push_to_hub(plain, "someone/tiny", token="hf_fake")
    other = tmp_path / "other" / "results.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"model": {}, "model_fingerprint": "0" * 64}))
    with pytest.raises(PublishError, match="belong to another model"):
        push_to_hub(folder, "someone/tiny", results=str(other), token="hf_fake")


def test_cli_card_and_dry_run(converted, tmp_path):
    _, folder = converted
    results = results_for(folder, tmp_path)
    run = subprocess.run([sys.executable, "-m", "hf_dynorm.cli", "card", str(folder), "--results", str(results)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "12.5" in (folder / "README.md").read_text()
    run = subprocess.run([sys.executable, "-m", "hf_dynorm.cli", "push", str(folder), "--repo-id", "a/b",
                          "--dry-run", "--out", str(tmp_path / "stage")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and (tmp_path / "stage" / "README.md").exists(), run.stderr[-2000:]
