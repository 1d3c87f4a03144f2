"""Distillation: the single-copy teacher, LoRA merge, schedules, multi-process equivalence, resume, faults."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_dynorm
import hf_dynorm.losses as distill_losses
from hf_dynorm.config import DistillConfig, parse_config
from hf_dynorm.distill import (
    DistillationSite,
    apply_schedule,
    set_teacher,
    site_starts,
    unwrap_sites,
    wrap_sites,
)
from hf_dynorm.losses import SoftenedKL
from hf_dynorm.modeling_dynorm import DyISRU
from tiny import linear_weight_stds_in_file, save_tiny_checkpoint, tiny_inputs, tiny_model

RECIPE = str(Path(__file__).parent.parent / "recipes" / "tiny" / "llama.yaml")


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_softened_kl_is_the_kl_div_of_log_softmaxes_in_value_and_gradient(temperature, monkeypatch):
    monkeypatch.setattr(distill_losses, "KL_CHUNK_ELEMENTS", 4 * 96)  # 4 rows a chunk: 3 chunks, the last one partial
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 5, 96, generator=generator, dtype=torch.float64)).requires_grad_()
    teacher = student.detach() + torch.randn(2, 5, 96, generator=generator, dtype=torch.float64)
    expected = torch.nn.functional.kl_div(torch.log_softmax(student / temperature, -1).flatten(0, 1),
                                          torch.log_softmax(teacher / temperature, -1).flatten(0, 1),
                                          log_target=True, reduction="batchmean") * temperature ** 2
    (expected_grad,) = torch.autograd.grad(3 * expected, student)
    fused_student = student.detach().float().requires_grad_()
    loss = SoftenedKL.apply(fused_student, teacher.float(), temperature)
    (3 * loss).backward()  # a loss scale other than 1 reaches the gradient
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(fused_student.grad.double(), expected_grad, rtol=1e-5, atol=1e-7)  # fp32 q - p
    low = student.detach().bfloat16().requires_grad_()  # mixed precision: the gradient in the logits' dtype
    SoftenedKL.apply(low, teacher.bfloat16(), temperature).backward()
    assert low.grad.dtype == torch.bfloat16 and low.grad.shape == student.shape


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


def distill_args(checkpoint, out, *extra):
    model, text = checkpoint
    return ["--config", RECIPE, "--model", str(model), "--data", str(text), "--output_dir", str(out),
            "--eval_window", "32", *map(str, extra)]


def run_distill(args, launcher=None, timeout=600):
    command = (launcher or [sys.executable, "-m", "hf_dynorm.distill"]) + args
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def converted_with_sites(model_type="llama"):
    model = tiny_model(model_type)
    originals = {site.name: model.get_submodule(site.name) for site in hf_dynorm.find_norm_sites(model)}
    hf_dynorm.convert(model, "dyisru", anchors=[1, 2])
    return model, wrap_sites(model, originals)


def test_single_copy_teacher_is_exactly_the_unconverted_model():
    inputs = tiny_inputs()
    with torch.no_grad():
        expected = tiny_model("llama")(inputs).logits
        student, sites = converted_with_sites()
        set_teacher(sites, True)
        assert torch.equal(student(inputs).logits, expected)
        set_teacher(sites, False)
        apply_schedule(sites, {name: 0 for name in sites}, 100, DistillConfig(ramp_steps=1))
        assert not torch.equal(student(inputs).logits, expected)


def test_lora_merge_leaves_logits_unchanged():
    from peft import LoraConfig, get_peft_model

    student, sites = converted_with_sites()
    apply_schedule(sites, {name: 0 for name in sites}, 5, DistillConfig(ramp_steps=10))
    peft_model = get_peft_model(student, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    inputs = tiny_inputs()
    with torch.no_grad():
        before = peft_model(inputs).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(inputs).logits, before, rtol=1e-5, atol=1e-5)


def test_progressive_schedule_ends_with_no_original_norm_left():
    student, sites = converted_with_sites("qwen3")
    config = DistillConfig(schedule="progressive", ramp_steps=3, gap_steps=2, max_steps=40)
    starts = site_starts(config, list(sites), None)
    assert sorted(starts.values()) == [2 * i for i in range(len(sites))]
    apply_schedule(sites, starts, 0, config)
    assert [site.blend for site in sites.values()].count(0.0) == len(sites) - 1
    apply_schedule(sites, starts, 39, config)
    assert all(site.blend == 1.0 for site in sites.values())
    unwrap_sites(student)
    assert not any(isinstance(m, DistillationSite) or type(m).__name__.endswith("RMSNorm")
                   for m in student.modules())


def test_anchor_fade_reaches_zero_at_the_end():
    student, sites = converted_with_sites()
    config = DistillConfig(max_steps=20, anchor_fade_steps=10)
    apply_schedule(sites, {n: 0 for n in sites}, 5, config)
    assert all(float(s.replacement.anchor_weight) == 1.0 for s in sites.values())
    apply_schedule(sites, {n: 0 for n in sites}, 20, config)
    assert all(float(s.replacement.anchor_weight) == 0.0 for s in sites.values())


def test_distill_trains_saves_and_reloads(checkpoint, tmp_path):
    run = run_distill(distill_args(checkpoint, tmp_path, "--mode", "full", "--hidden_weight", "1",
                                   "--anchor_fade_steps", "3", "--max_steps", "8"))
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "final" / "results.json").read_text())
    assert results["anchored"] is False and len(results["history"]) == 8
    model = hf_dynorm.load_model(tmp_path / "final")
    assert all(m.anchors.numel() == 0 for m in model.modules() if isinstance(m, DyISRU))
    assert model.config.dynorm["distillation"]["mode"] == "full"
    assert not any(type(m).__name__.endswith("RMSNorm") for m in model.modules())


def test_loss_falls(checkpoint, tmp_path):
    # the random tiny teacher knows nothing of the text: cross-entropy on it has far to fall
    run = run_distill(distill_args(checkpoint, tmp_path, "--norm", "dyt", "--anchors", "0", "--mode", "full",
                                   "--schedule", "all", "--ramp_steps", "1", "--kl_weight", "0", "--ce_weight", "1",
                                   "--max_steps", "30", "--base_learning_rate", "3e-3", "--save_every", "100",
                                   "--eval_every", "100"))
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads((tmp_path / "final" / "results.json").read_text())["history"]
    first, last = history[0]["ce"], sum(h["ce"] for h in history[-5:]) / 5
    assert last < 0.8 * first


def test_bounded_per_channel_pure_start_is_kept_in_the_saved_model(checkpoint, tmp_path):
    run = run_distill(distill_args(checkpoint, tmp_path, "--anchors", "0", "--bound", "0.5", "--per_channel", "true",
                                   "--max_steps", "2"))
    assert run.returncode == 0, run.stderr[-3000:]
    model = hf_dynorm.load_model(tmp_path / "final")
    assert model.config.dynorm["parameters"]["bound"] == "0.5 x token rms"
    norms = [m for m in model.modules() if isinstance(m, DyISRU)]
    assert norms and all(m.log_kappa.shape == (m.channels,) for m in norms)
    assert json.loads((tmp_path / "final" / "results.json").read_text())["anchored"] is False


def test_dyt_alpha_trains_at_a_rate_relative_to_its_median(checkpoint, tmp_path):
    # alpha_relative_learning_rate 0 freezes DyT's alpha alone: the run ends with the alphas of a run that trains
    # nothing; at r, Adam's first step (lr x g / (|g| + eps), no warmup) moves each alpha by r x their median at most
    common = ["--norm", "dyt", "--anchors", "0", "--schedule", "all", "--ramp_steps", "1", "--max_steps", "3",
              "--warmup_steps", "0", "--eval_every", "100", "--save_every", "100"]
    frozen = run_distill(distill_args(checkpoint, tmp_path / "frozen", *common, "--learning_rate", "0"))
    alpha_only = run_distill(distill_args(checkpoint, tmp_path / "alpha", *common, "--learning_rate", "1e-2",
                                          "--alpha_relative_learning_rate", "0"))
    one_step = run_distill(distill_args(checkpoint, tmp_path / "one", *common, "--learning_rate", "0",
                                        "--alpha_relative_learning_rate", "0.01", "--max_steps", "1"))
    assert frozen.returncode == alpha_only.returncode == one_step.returncode == 0, \
        (frozen.stderr + alpha_only.stderr + one_step.stderr)[-3000:]
    a, b, c = (final_weights(tmp_path / name) for name in ("frozen", "alpha", "one"))
    alphas = [key for key in a if key.endswith(".alpha")]
    weights = [key for key in alphas if key.replace(".alpha", ".weight") in a]
    assert alphas and all(torch.equal(a[key], b[key]) for key in alphas)
    assert all(not torch.equal(a[key.replace(".alpha", ".weight")], b[key.replace(".alpha", ".weight")])
               for key in weights)
    expected = 0.01 * torch.cat([a[key].abs().flatten() for key in alphas]).median().item()
    moves = torch.cat([(c[key] - a[key]).abs().flatten() for key in alphas])
    assert moves.max().item() == pytest.approx(expected, rel=1e-3) and moves.max() <= expected * (1 + 1e-4)
    record = json.loads((tmp_path / "one" / "final" / "results.json").read_text())
    assert record["learning_rates"]["alphas"] == pytest.approx(expected, rel=1e-6)


def test_lora_trains_at_a_rate_relative_to_the_median_std_of_the_linear_weights(checkpoint, tmp_path):
    # the rate the adapters got, against the median std of the checkpoint's linear weights read from its file
    # (every 2-D weight but the embedding and the LM head, which the rate leaves out)
    run = run_distill(distill_args(checkpoint, tmp_path, "--mode", "lora", "--max_steps", "1", "--eval_every", "100",
                                   "--base_relative_learning_rate", "0.01"))
    assert run.returncode == 0, run.stderr[-3000:]
    model, _ = checkpoint
    stds = linear_weight_stds_in_file(model)
    assert len(stds) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    record = json.loads((tmp_path / "final" / "results.json").read_text())
    assert record["learning_rates"]["base"] == pytest.approx(0.01 * stds.median().item(), rel=1e-6)


def final_weights(folder):
    return load_file(str(Path(folder) / "final" / "model.safetensors"))


def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(checkpoint, tmp_path):
    common = ["--mode", "full", "--max_steps", "14", "--save_every", "2", "--eval_every", "100"]
    straight = run_distill(distill_args(checkpoint, tmp_path / "straight", *common))
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "hf_dynorm.distill", *distill_args(checkpoint, out, *common)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000004").exists() and time.time() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "final").exists()
    resumed = run_distill(distill_args(checkpoint, out, *common, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    a, b = final_weights(tmp_path / "straight"), final_weights(out)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(checkpoint, tmp_path):
    run = run_distill(distill_args(checkpoint, tmp_path, "--mode", "full", "--learning_rate", "1e30",
                                   "--base_learning_rate", "1e30", "--max_grad_norm", "1e30", "--max_steps", "20",
                                   "--max_nan_skips", "2", "--save_every", "1", "--warmup_steps", "0"))
    assert run.returncode == 1
    assert "non-finite losses; stopping" in run.stdout
    assert not (tmp_path / "final").exists()
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert checkpoints and not any(p.name.endswith(".partial") for p in checkpoints)


@pytest.mark.parametrize("override, message", [
    (["--colour", "blue"], "colour"),
    (["--mode", "adapters"], "mode must be one of"),
    (["--data", "/nonexistent/corpus.txt"], "does not exist"),
    (["--bound", "-1"], "bound must be a positive number"),
    (["--alpha_relative_learning_rate", "1e-3"], "alpha_relative_learning_rate is DyT's"),
    (["--base_learning_rate", "1e-3", "--base_relative_learning_rate", "1e-2"],
     "base_learning_rate or base_relative_learning_rate, not both"),
    (["--homogenise_learning_rate", "1e-3", "--homogenise_relative_learning_rate", "1e-2"],
     "homogenise_learning_rate or homogenise_relative_learning_rate, not both"),
    (["--homogenise_relative_learning_rate", "0"], "homogenise_relative_learning_rate must be positive"),
    (["--homogenise_warmup_steps", "-1"], "homogenise_warmup_steps cannot be negative"),
    (["--homogenise_batch_size", "0"], "homogenise_batch_size must be at least 1"),
])
def test_bad_config_fails_before_loading_a_model(checkpoint, tmp_path, override, message):
    run = run_distill(distill_args(checkpoint, tmp_path, *override))
    assert run.returncode == 2 and message in run.stderr
    assert "hf_dynorm distill:" not in run.stdout  # stopped before the accelerator and the model
    assert not tmp_path.joinpath("checkpoints").exists()


def test_unknown_key_in_recipe_and_unregistered_model(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model: smollm2-135m\nlearnin_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learnin_rate'\]"):
        parse_config(["--config", str(recipe)])
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "starcoder2"}))
    with pytest.raises(ValueError, match="not in hf_dynorm's registry"):
        parse_config(["--model", str(folder)])


@pytest.mark.parametrize("recipe", ["llama-3.2-1b", "qwen3-0.6b", "gemma-3-1b", "gpt2"])
def test_multi_gpu_recipes_smoke_on_a_tiny_model_of_their_architecture(recipe, tmp_path):
    model_type = {"llama-3.2-1b": "llama", "qwen3-0.6b": "qwen3", "gemma-3-1b": "gemma3_text", "gpt2": "gpt2"}[recipe]
    model, text = save_tiny_checkpoint(tmp_path, model_type)
    path = Path(__file__).parent.parent / "recipes" / recipe / "dyisru.yaml"
    run = run_distill(["--config", str(path), "--model", str(model), "--data", str(text), "--train_split", "train",
                       "--eval_split", "test", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                       "--seq_len", "32", "--batch_size", "2", "--gradient_accumulation_steps", "1",
                       "--eval_window", "32", "--eval_windows", "1", "--calibration_windows", "4",
                       "--mixed_precision", "no", "--report_to", "none", "--progress", "false"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


@pytest.mark.real_model
@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(RECIPE).parents[1] / "smollm2-135m").glob("*.yaml")))
def test_cpu_recipes_are_valid_configs(recipe, smollm2, tmp_path):
    config = parse_config(["--config", str(Path(RECIPE).parents[1] / "smollm2-135m" / recipe), "--output_dir",
                           str(tmp_path)])
    # the 30-minute budget: a LoRA step runs ~130 tokens/s on 2 cores, evaluation included (174k took 22.4 min)
    assert config.model == "smollm2-135m" and config.max_steps * config.batch_size * config.seq_len <= 200_000
