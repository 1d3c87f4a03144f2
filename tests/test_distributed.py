"""Distillation on several processes (2 CPU processes, gloo): DDP and FSDP2 train what one process trains, faults on one
rank are decided by all, a killed run resumes, and mixed precision keeps the element-wise norms in fp32."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_dynorm
from hf_dynorm.config import DistillConfig
from hf_dynorm.parallel import precision_source
from tiny import save_tiny_checkpoint

HERE = Path(__file__).parent
RECIPE = str(HERE.parent / "recipes" / "tiny" / "llama.yaml")
CONFIGS = HERE.parent / "recipes" / "accelerate"
DDP, FSDP = str(CONFIGS / "cpu_2proc.yaml"), str(CONFIGS / "fsdp_cpu_2proc.yaml")
# cross-entropy (far from 0, unlike the near-perfect tiny KL) and a large Adam epsilon (updates linear in tiny
# gradients, whose last bits depend on the reduction order) make one process and two comparable
COMPARABLE = ["--max_steps", "4", "--save_every", "100", "--eval_every", "100", "--adam_epsilon", "1e-2",
              "--kl_weight", "0", "--ce_weight", "1", "--learning_rate", "1e-2", "--base_learning_rate", "1e-2"]
TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(config: str, script: str | None = None) -> list[str]:
    """`accelerate launch` with 2 processes on a port of their own (a killed run's port may still be held)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--main_process_port",
            str(free_port()), *([script] if script else ["-m", "hf_dynorm.distill"])]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    """Distillation runs by name, each run once per module: (output folder, completed process)."""
    done = {}
    model, text = checkpoint

    def run(name: str, *args, launch: list[str] | None = None, env: dict | None = None):
        if name not in done:
            out = tmp_path_factory.mktemp(name.replace(" ", "-"))
            command = (launch or [sys.executable, "-m", "hf_dynorm.distill"]) + [
                "--config", RECIPE, "--model", str(model), "--data", str(text), "--output_dir", str(out),
                "--eval_window", "32", *map(str, args)]
            done[name] = out, subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT,
                                             stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        return done[name]

    return run


def results(out: Path) -> dict:
    return json.loads((out / "final" / "results.json").read_text())


def assert_same_weights(a: Path, b: Path, **tolerance) -> None:
    first, second = (load_file(str(out / "final" / "model.safetensors")) for out in (a, b))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], **tolerance, msg=key)


def succeeded(run) -> Path:
    out, process = run
    assert process.returncode == 0, (process.stdout[-2000:], process.stderr[-4000:])
    return out


@pytest.mark.parametrize("topology, mode", [("DDP", "full"), ("DDP", "lora"), ("DDP", "norms"), ("FSDP", "lora"),
                                            ("FSDP", "full")])
def test_two_processes_train_what_one_trains(runs, topology, mode):
    one = succeeded(runs(f"one {mode}", "--mode", mode, *COMPARABLE, "--batch_size", "4"))
    two = succeeded(runs(f"{topology} {mode}", "--mode", mode, *COMPARABLE, "--batch_size", "2",
                         launch=launcher(DDP if topology == "DDP" else FSDP)))
    one_results, two_results = results(one), results(two)
    assert (two_results["world_size"], two_results["distributed_type"]) == (2, topology.replace("DDP", "MULTI_CPU"))
    if topology == "FSDP":  # really sharded while it trained: each process held about half of every parameter
        sharding = two_results["sharding"]
        assert sharding["dtensor_parameters"] > 0
        assert sharding["local_parameter_elements"] <= 0.55 * sharding["parameter_elements"]
    for a, b in zip(one_results["history"], two_results["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert two_results["final_perplexity_ratio"] == pytest.approx(one_results["final_perplexity_ratio"], rel=1e-4)
    assert_same_weights(one, two, rtol=1e-4, atol=1e-5)
    reloaded = hf_dynorm.load_model(two / "final")
    assert reloaded.config.dynorm["distillation"]["mode"] == mode
    assert not any(type(m).__name__.endswith("RMSNorm") or "lora" in n for n, m in reloaded.named_modules())


def test_fsdp_keeps_the_norms_in_fp32_while_the_layers_compute_in_bf16(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
           "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    probe = subprocess.run([sys.executable, str(HERE / "fsdp_precision_probe.py"), str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.rpartition("PROBE ")[2])
    assert seen == {"fsdp": True, "finite": True, "q_proj weight": ["bfloat16"], "log_kappa": ["float32"],
                    "norm weight": ["float32"]}


def test_fsdp_bf16_from_the_launch_config_trains_to_a_finite_model(runs, tmp_path_factory):
    config = tmp_path_factory.mktemp("configs") / "fsdp_bf16.yaml"
    config.write_text(Path(FSDP).read_text().replace('mixed_precision: "no"', "mixed_precision: bf16"))
    out = succeeded(runs("FSDP bf16", "--mode", "full", "--max_steps", "4", launch=launcher(str(config))))
    found = results(out)
    assert (found["mixed_precision"], found["mixed_precision_source"]) == ("bf16", "accelerate launch config")
    assert torch.isfinite(torch.tensor(found["final_perplexity_ratio"]))
    weights = load_file(str(out / "final" / "model.safetensors"))
    floating = [w for w in weights.values() if w.is_floating_point()]
    assert floating and all(torch.isfinite(w).all() and w.dtype == torch.float32 for w in floating)


def test_mixed_precision_comes_from_the_recipe_or_command_line_before_the_launch_config(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert precision_source(DistillConfig()) == (None, "accelerate launch config")
    config = DistillConfig(mixed_precision="no")
    config.sources = {"mixed_precision": "command line"}
    assert precision_source(config) == ("no", "command line")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert precision_source(DistillConfig()) == (None, "default (no mixed precision)")


@pytest.mark.parametrize("topology", ["DDP", "FSDP"])
def test_a_nan_on_one_rank_is_skipped_by_both(runs, topology):
    out = succeeded(runs(f"nan {topology}", "--mode", "full", "--max_steps", "5", "--max_nan_skips", "3",
                         launch=launcher(DDP if topology == "DDP" else FSDP, str(HERE / "launch_with_nan.py")),
                         env={"NAN_RANK": "1", "NAN_STEPS": "1,3"}))
    found = results(out)
    assert found["skipped_steps"] == 2
    assert found["optimizer_steps_by_process"] == [3, 3]  # 5 steps, 2 skipped, on both processes
    assert [h["step"] for h in found["history"] if h["loss"] != h["loss"]] == [2, 4]  # NaN, averaged over ranks
    assert all(torch.isfinite(w).all() for w in load_file(str(out / "final" / "model.safetensors")).values())


def test_nans_on_one_rank_stop_every_rank_and_keep_the_last_good_checkpoint(runs):
    out, process = runs("nan stop", "--mode", "full", "--max_steps", "8", "--max_nan_skips", "1", "--save_every",
                        "2", launch=launcher(FSDP, str(HERE / "launch_with_nan.py")),
                        env={"NAN_RANK": "1", "NAN_STEPS": "3,4,5,6,7"})
    assert process.returncode != 0 and "non-finite losses; stopping" in process.stdout, process.stderr[-3000:]
    assert "]: Traceback" not in process.stderr  # no rank raised (the launcher reports the exit code 1)
    assert not (out / "final").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]


def test_a_killed_two_process_run_resumes_to_the_same_weights(runs, checkpoint, tmp_path):
    args = ["--mode", "full", "--max_steps", "8", "--save_every", "2", "--eval_every", "100"]
    straight = succeeded(runs("FSDP straight", *args, launch=launcher(FSDP)))
    model, text = checkpoint
    out = tmp_path / "killed"
    command = ["--config", RECIPE, "--model", str(model), "--data", str(text), "--output_dir", str(out),
               "--eval_window", "32", *args]
    process = subprocess.Popen(launcher(FSDP) + command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + TIMEOUT
    while not (out / "checkpoints" / "step-000004" / "trainer_state.json").exists() and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both workers
    process.wait()
    assert not (out / "final").exists()
    resumed = subprocess.run(launcher(FSDP) + command + ["--resume_from_checkpoint", "latest"], capture_output=True,
                             text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert_same_weights(straight, out, rtol=0, atol=0)
