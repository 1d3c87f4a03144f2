"""The pure element-wise pipeline's parts: the sink prefix, the per-channel range bound and homogenisation."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hf_dynorm
from hf_dynorm.calibration import calibrate
from hf_dynorm.homogenise import homogenise, log_rms_spread
from hf_dynorm.modeling_dynorm import DyISRU, DyT, SinkPrefix
from tiny import (
    EXPECTED_ROLES,
    VOCAB,
    linear_weight_stds_in_file,
    reload_without_hf_dynorm,
    save_tiny_checkpoint,
    tiny_inputs,
    tiny_model,
)

DECODERS = ("llama", "qwen3", "mistral", "gemma3_text", "olmo2", "olmo3")
TINY_RECIPE = str(Path(__file__).parent.parent / "recipes" / "tiny" / "llama.yaml")


def ids(n=2048, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", DECODERS)
def test_a_sink_prefix_is_the_same_model_given_that_token_first(model_type):
    original, model = tiny_model(model_type), tiny_model(model_type)
    SinkPrefix.of(model, 5).install(model)
    text = tiny_inputs(batch=2, length=12)
    with torch.no_grad():
        expected = original(torch.cat([torch.full((2, 1), 5), text], 1)).logits[:, 1:]
        torch.testing.assert_close(model(text).logits, expected, rtol=1e-5, atol=1e-5)
        generated = model.generate(text, max_new_tokens=6, do_sample=False)
        reference = original.generate(torch.cat([torch.full((2, 1), 5), text], 1), max_new_tokens=6,
                                      do_sample=False)
    assert torch.equal(generated, reference[:, 1:])


def test_a_sink_prefix_keeps_left_padding_right_in_generate():
    model = tiny_model("llama")
    SinkPrefix.of(model, 5).install(model)
    rows = tiny_inputs(batch=2, length=12)
    mask = torch.ones_like(rows)
    mask[1, :4] = 0  # the second row is 8 tokens, padded on the left
    with torch.no_grad():
        batched = model.generate(rows, attention_mask=mask, max_new_tokens=5, do_sample=False)
        alone = model.generate(rows[1:, 4:], max_new_tokens=5, do_sample=False)
    assert torch.equal(batched[1, -5:], alone[0, -5:])


def test_a_converted_model_with_a_sink_reloads_with_and_without_hf_dynorm(tmp_path):
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru", calibration=ids(), window=32, range_bound=1.5,
                              sink_token=5, progress=False)
    record = model.config.dynorm
    assert record["sink"] == {"token_id": 5, "layers": 2, "heads": 2, "head_dim": 8}
    model.save_pretrained(tmp_path)
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = model(inputs).logits
        assert torch.equal(hf_dynorm.load_model(tmp_path)(inputs).logits, expected)
    identical, errors = reload_without_hf_dynorm(tmp_path, inputs, expected)
    assert identical, errors


SINK_WORDS = ", with a sink prefix (one constant first token's keys and values before every text)"


@pytest.mark.parametrize("options,form", [
    ({"range_bound": 1.5}, "pure element-wise"),
    ({"range_bound": 1.5, "sink_token": 5}, "pure element-wise" + SINK_WORDS),
    ({"anchors": 2}, "anchored: 2 channels per site stay coupled (not strictly element-wise)"),
    ({"anchors": 2, "sink_token": 5}, "anchored: 2 channels per site stay coupled (not strictly element-wise)"
                                      + SINK_WORDS),
])
def test_the_saved_model_says_which_form_it_is(options, form, tmp_path):
    """The record names the form, a sink prefix included whether or not anchors stay coupled (the card reads it)."""
    model = hf_dynorm.convert(tiny_model("llama"), "dyisru", calibration=ids(), window=32, progress=False, **options)
    model.save_pretrained(tmp_path)
    assert hf_dynorm.load_model(tmp_path).config.dynorm["form"] == form


@pytest.mark.parametrize("norm", ["dyisru", "dyt"])
def test_the_range_bound_sets_each_channel_from_its_own_range(norm):
    model, tokens, c = tiny_model("llama"), ids(), 1.5
    calibration = calibrate(model, tokens, window=32, max_windows=8, progress=False)
    site = "model.layers.1.input_layernorm"
    # the same statistics by hand: |x| of every token at positions >= 1 of the 8 calibration windows
    captured = []
    hook = model.get_submodule(site).register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        model(tokens[:8 * 32].view(8, 32))
    hook.remove()
    x = captured[0]
    tail = x[:, 1:].reshape(-1, x.shape[-1]).abs()
    rank = math.ceil(0.001 * tail.shape[0])  # the 99.9th percentile: the rank-th largest of 248 values
    q = tail.sort(0, descending=True).values[rank - 1]
    s = float(x.square().mean(-1).flatten().median().sqrt())
    channels = x.shape[-1]
    a = torch.clamp(c * q, max=math.sqrt(channels) * s)
    converted = hf_dynorm.convert(model, norm, calibration=calibration, range_bound=c)
    module = converted.get_submodule(site)
    assert converted.config.dynorm["sites"][site]["per_channel"]
    norm_weight = tiny_model("llama").get_submodule(site).weight.detach()
    torch.testing.assert_close(module.weight.detach(), norm_weight * a / s, rtol=1e-4, atol=1e-6)
    if norm == "dyisru":
        assert isinstance(module, DyISRU)
        torch.testing.assert_close(module.kappa.detach(), a.square(), rtol=1e-4, atol=1e-6)
    else:
        assert isinstance(module, DyT)
        torch.testing.assert_close(module.alpha.detach(), a.reciprocal(), rtol=1e-4, atol=1e-6)
    # slope at 0: RMSNorm's at the median token (w / s); saturation: the weight, w a / s
    module.fused = False
    small = torch.full((1, channels), 1e-4)
    with torch.no_grad():
        torch.testing.assert_close(module(small) / 1e-4, (norm_weight / s)[None], rtol=1e-3, atol=1e-6)


def test_log_rms_spread_by_hand():
    # one site, tokens at positions >= 1 with rms 1, 2, 4, 8 (log rms 0, ln 2, 2 ln 2, 3 ln 2): variance 5/3 (ln 2)^2
    rms = torch.tensor([7.0, 1.0, 2.0, 4.0, 8.0])  # position 0 (any rms) is left out
    x = rms.view(1, 5, 1).expand(1, 5, 16).clone()
    assert float(log_rms_spread([x])) == pytest.approx(5 / 3 * math.log(2) ** 2, rel=1e-5)
    assert float(log_rms_spread([x, 2 * x])) == pytest.approx(5 / 3 * math.log(2) ** 2, rel=1e-5)  # scale-free


def test_homogenisation_narrows_the_spread_and_keeps_the_norms():
    model = tiny_model("llama")
    windows = ids(64 * 32).view(64, 32)
    homogenised, history = homogenise(model, windows, steps=30, weight=30.0, learning_rate=5e-3, batch_size=4,
                                      warmup_steps=2)
    assert history[-1]["spread"] < 0.8 * history[0]["spread"]
    assert not any("lora" in name for name, _ in homogenised.named_modules())
    assert type(homogenised.model.norm).__name__ == "LlamaRMSNorm"


def test_the_pure_recipe_runs_its_stages_and_a_resumed_run_reuses_the_homogenised_model(tmp_path):
    model, text = save_tiny_checkpoint(tmp_path / "tiny")
    args = [sys.executable, "-m", "hf_dynorm.distill", "--config", TINY_RECIPE, "--model", str(model), "--data",
            str(text), "--output_dir", str(tmp_path / "out"), "--eval_window", "32",
            "--mode", "lora", "--anchors", "0", "--range_bound", "1.5", "--sink_prefix", "auto",
            "--homogenise_steps", "3", "--homogenise_warmup_steps", "2", "--homogenise_batch_size", "3",
            "--schedule", "all", "--max_steps", "4", "--save_every", "2"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "final" / "results.json").read_text())
    assert results["homogenised"]["steps"] == 3 and results["homogenised"]["warmup_steps"] == 2
    assert results["homogenised"]["batch_size"] == 3 and results["homogenised"]["tokens"] == 3 * 3 * 32
    assert results["homogenised"]["resolved_learning_rate"] == 2e-3  # the stage's default, no rate given
    assert results["anchored"] is False
    record = hf_dynorm.load_model(tmp_path / "out" / "final").config.dynorm
    assert record["sink"]["token_id"] == 1  # the tiny tokenizer's BOS, <s>
    assert all(site["per_channel"] and site.get("anchors", 0) == 0 for site in record["sites"].values())
    stamp = (tmp_path / "out" / "homogenised" / "model.safetensors").stat().st_mtime_ns
    resumed = subprocess.run(args + ["--resume_from_checkpoint", "latest"], capture_output=True, text=True,
                             timeout=600, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0 and "homogenise step" not in resumed.stdout, resumed.stderr[-3000:]
    assert (tmp_path / "out" / "homogenised" / "model.safetensors").stat().st_mtime_ns == stamp
    # a run that finds the stage made (killed before its first checkpoint) distils as the uninterrupted run did
    shutil.copytree(tmp_path / "out" / "homogenised", tmp_path / "again" / "homogenised")
    again = subprocess.run([*args, "--resume_from_checkpoint", "latest", "--output_dir", str(tmp_path / "again")],
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert again.returncode == 0 and "homogenise step" not in again.stdout, again.stderr[-3000:]
    first, second = (load_file(tmp_path / folder / "final" / "model.safetensors") for folder in ("out", "again"))
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    changed = subprocess.run(args + ["--resume_from_checkpoint", "latest", "--homogenise_steps", "5"],
                             capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert changed.returncode != 0 and "homogenise_steps: 3 there, 5 here" in changed.stderr, changed.stderr[-3000:]


@pytest.mark.parametrize("recipe,model_type", [("dyt.yaml", "olmo2"), ("dyisru-pure.yaml", "gemma3_text")])
def test_the_shipped_pure_recipes_run_on_families_with_post_norms_and_qk_norms(recipe, model_type, tmp_path):
    """The SmolLM2 recipes' own settings pointed with --model at another family (post-norms, q/k norms), as users
    will: every stage runs, and every norm the architecture has (tests/tiny.py, by hand) ends pure element-wise."""
    model, text = save_tiny_checkpoint(tmp_path / "tiny", model_type)
    recipe = Path(__file__).parent.parent / "recipes" / "smollm2-135m" / recipe
    run = subprocess.run([sys.executable, "-m", "hf_dynorm.distill", "--config", str(recipe), "--model", str(model),
                          "--data", str(text), "--output_dir", str(tmp_path / "out"), "--seq_len", "32",
                          "--eval_window", "32", "--eval_windows", "1", "--calibration_windows", "4",
                          "--homogenise_steps", "2", "--max_steps", "2", "--report_to", "none", "--progress", "false"],
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "final" / "results.json").read_text())
    assert results["anchored"] is False and math.isfinite(results["final_perplexity_ratio"])
    # both LoRA rates follow the weights they train: the recipe's fractions of the median std read from the files of
    # the checkpoint (homogenisation) and of the homogenised stage (distillation)
    settings = yaml.safe_load(recipe.read_text())
    assert results["homogenised"]["resolved_learning_rate"] == pytest.approx(
        settings["homogenise_relative_learning_rate"] * linear_weight_stds_in_file(model).median().item(), rel=1e-6)
    homogenised = linear_weight_stds_in_file(tmp_path / "out" / "homogenised").median().item()
    assert results["learning_rates"]["base"] == pytest.approx(settings["base_relative_learning_rate"] * homogenised,
                                                              rel=1e-6)
    record = hf_dynorm.load_model(tmp_path / "out" / "final").config.dynorm
    assert record["sink"]["token_id"] == 1  # the tiny tokenizer has no <|endoftext|>: its BOS, <s>
    assert len(record["sites"]) == sum(EXPECTED_ROLES[model_type].values())
    assert all(site["per_channel"] and site.get("anchors", 0) == 0 for site in record["sites"].values())
