"""Distil a converted student back to its teacher's quality: one readable loop, launched with accelerate.

    hf-dynorm distill --config recipes/smollm2-135m/dyisru.yaml [--key value ...]
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m hf_dynorm.distill --config FILE.yaml

Every site of the student is a `DistillationSite`: the original norm and its replacement side by side, mixed by
a `blend` that the schedule moves from 0 (norm) to 1 (replacement). With blend forced to 0 the same weights are
the teacher, so `norms` and `lora` modes need no second model. At the end each site is unwrapped to its
replacement alone: nothing of the original norm is saved.

Batches are a pure function of the step (a seeded order over fixed windows, each process taking its slice), so a
run on one process and on two with the same global batch see the same tokens, and a resumed run continues
exactly where the killed one stopped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .allocator import pin_malloc_thresholds
from .architectures import ARCHITECTURES, find_norm_sites
from .assets import check_text_source
from .modeling_dynorm import DyISRU

MODES = ("norms", "lora", "full")


@dataclass
class DistillConfig:
    """Every key can be set in the YAML recipe or on the command line as --key value."""

    # what to convert
    model: str = field(default="smollm2-135m", metadata={"help": "Hub id, local folder or smollm2-135m"})
    teacher: str | None = field(default=None, metadata={"help": "full mode: the frozen teacher (default: model)"})
    norm: str = "dyisru"
    anchors: int = field(default=4, metadata={"help": "anchored DyISRU start: k anchor channels per site"})
    anchor_fade_steps: int = field(default=0, metadata={"help": ">0: fade anchors to 0 over these final steps "
                                                                  "(a pure element-wise model)"})
    bound: float | None = field(default=None, metadata={"help": "output bound in token rms (conversion.bounded); "
                                                                  "unset: the paper's sqrt(C)"})
    estimator: str = "median"
    calibration_windows: int = 16
    per_channel: bool = field(default=False, metadata={"help": "one kappa/alpha per channel instead of per site"})
    # how to train
    mode: str = field(default="norms", metadata={"help": "norms | lora | full"})
    lora_r: int = 16
    lora_alpha: int = 32
    schedule: str = field(default="all", metadata={"help": "all | progressive"})
    order: str = field(default="depth", metadata={"help": "progressive order: depth | sensitivity"})
    ramp_steps: int = 10
    gap_steps: int = 2
    # losses (each weight 0 switches it off)
    kl_weight: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    local_weight: float = 0.0
    # data and optimisation
    data: str = "wiki-sample"
    train_split: str = field(default="train", metadata={"help": "a datasets split, slicing allowed: train[:50000]"})
    eval_split: str = "test"
    seq_len: int = 256
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    learning_rate: float = field(default=1e-3, metadata={"help": "norm parameters"})
    base_learning_rate: float = field(default=3e-5, metadata={"help": "LoRA adapters or all other weights"})
    warmup_steps: int = 5
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_nan_skips: int = 3
    seed: int = 0
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16 (as accelerate)"})
    # bookkeeping
    output_dir: str = "outputs/distill"
    eval_every: int = 25
    eval_windows: int = 4
    eval_window: int = 512
    save_every: int = 50
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder or 'latest'"})
    report_to: str = "tensorboard"
    progress: bool = True

    def validate(self) -> None:
        """Fail before any model is loaded."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.schedule not in ("all", "progressive") or self.order not in ("depth", "sensitivity"):
            raise ValueError("schedule must be 'all' or 'progressive' and order 'depth' or 'sensitivity'")
        if self.norm not in ("dyisru", "dyt"):
            raise ValueError(f"norm must be 'dyisru' or 'dyt', got {self.norm!r}")
        if self.norm == "dyt" and (self.anchors or self.anchor_fade_steps):
            raise ValueError("anchors belong to DyISRU: set anchors: 0 and anchor_fade_steps: 0 for DyT")
        if self.bound is not None and not self.bound > 0:
            raise ValueError(f"bound must be a positive number of token rms, got {self.bound}")
        if self.anchor_fade_steps > self.max_steps:
            raise ValueError("anchor_fade_steps cannot exceed max_steps")
        if self.kl_weight + self.ce_weight + self.hidden_weight + self.local_weight <= 0:
            raise ValueError("every loss weight is 0: nothing to train")
        _check_model_known(self.model)
        if self.teacher:
            _check_model_known(self.teacher)
        check_text_source(self.data)


def _check_model_known(name: str) -> None:
    from transformers import PretrainedConfig

    from .assets import EMBEDDED_MODEL, resolve_model

    if name == EMBEDDED_MODEL:
        resolve_model(name)
        return
    config, _ = PretrainedConfig.get_config_dict(resolve_model(name))
    if config.get("model_type") not in ARCHITECTURES:
        raise ValueError(f"model_type {config.get('model_type')!r} of {name} is not in hf_dynorm's registry "
                         f"({', '.join(ARCHITECTURES)}); distillation recipes need a registered architecture.")


def parse_config(argv: list[str]) -> DistillConfig:
    """YAML recipe (--config) with --key value overrides, HfArgumentParser style; unknown keys are errors."""
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DistillConfig)
    known = {f.name for f in fields(DistillConfig)}
    config_path = None
    if "--config" in argv:
        index = argv.index("--config")
        config_path, argv = argv[index + 1], argv[:index] + argv[index + 2:]
    if config_path:
        recipe = yaml.safe_load(Path(config_path).read_text()) or {}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {config_path}; known keys: {sorted(known)}")
        parser.set_defaults(**recipe)
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    config.validate()
    return config


# ---------------------------------------------------------------------------------------------------------------
# The student's sites
# ---------------------------------------------------------------------------------------------------------------


def convert_as_recipe(model: nn.Module, config: DistillConfig, train_ids: torch.Tensor):
    """Calibrate `model` on `train_ids` and convert it in place as the recipe `config` says: the student's start
    (and the converted models of benchmarks/run.py). Returns the calibration and the `anchors` option used."""
    from .calibration import calibrate
    from .conversion import convert

    calibration = calibrate(model, train_ids, window=config.seq_len, max_windows=config.calibration_windows,
                            progress=False, label=f"{config.data} ({config.train_split})")
    anchors = (config.anchors or None) if config.norm == "dyisru" else None
    convert(model, config.norm, calibration=calibration, estimator=config.estimator, anchors=anchors,
            bound=config.bound, per_channel=config.per_channel)
    return calibration, anchors


class DistillationSite(nn.Module):
    """The original norm and its element-wise replacement, mixed by `blend` (0: norm, 1: replacement)."""

    def __init__(self, original: nn.Module, replacement: nn.Module):
        super().__init__()
        self.original, self.replacement = original.requires_grad_(False), replacement
        self.blend = 0.0
        self.as_teacher = False
        self.local_loss: torch.Tensor | None = None  # set during a student forward when local matching is on
        self.track_local = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.as_teacher or self.blend <= 0.0:
            return self.original(x)
        new = self.replacement(x)
        if self.track_local:
            with torch.no_grad():
                target = self.original(x)
            self.local_loss = _relative_error(new, target)
        if self.blend >= 1.0:
            return new
        return torch.lerp(self.original(x), new, self.blend)


def _relative_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of |pred - target|^2 / |target|^2: every token counts, massive ones do not dominate."""
    prediction, target = prediction.float(), target.float()
    return ((prediction - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-6)).mean()


def wrap_sites(model: nn.Module, originals: dict[str, nn.Module]) -> dict[str, DistillationSite]:
    from .modeling_dynorm import install_norms

    sites = {name: DistillationSite(original, model.get_submodule(name)) for name, original in originals.items()}
    install_norms(model, sites)
    return sites


def unwrap_sites(model: nn.Module) -> None:
    from .modeling_dynorm import install_norms

    install_norms(model, {name: module.replacement for name, module in model.named_modules()
                          if isinstance(module, DistillationSite)})


def site_starts(config: DistillConfig, names: list[str], sensitivity: list[str] | None) -> dict[str, int]:
    """Step at which each site starts its ramp: all at 0, or one after another (gap_steps apart)."""
    if config.schedule == "all":
        return {name: 0 for name in names}
    ordered = sensitivity if config.order == "sensitivity" and sensitivity else names
    return {name: i * config.gap_steps for i, name in enumerate(ordered)}


def apply_schedule(sites: dict[str, DistillationSite], starts: dict[str, int], step: int,
                   config: DistillConfig) -> None:
    """Blends and anchor weights as pure functions of the step (so a resumed run is the same run)."""
    fade_start = config.max_steps - config.anchor_fade_steps
    anchor_weight = 1.0 if not config.anchor_fade_steps else \
        min(1.0, max(0.0, 1.0 - (step - fade_start) / config.anchor_fade_steps))
    for name, site in sites.items():
        ramp = max(config.ramp_steps, 1)
        site.blend = min(1.0, max(0.0, (step - starts[name] + 1) / ramp))
        if isinstance(site.replacement, DyISRU):
            site.replacement.anchor_weight.fill_(anchor_weight)


def schedule_length(config: DistillConfig, sites: int) -> int:
    return (0 if config.schedule == "all" else (sites - 1) * config.gap_steps) + config.ramp_steps


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------


# rows of logits per chunk of the KL loss: ~1M fp32 elements (21 rows of SmolLM2's 49152-token vocabulary)
KL_CHUNK_ELEMENTS = 1 << 20


class SoftenedKL(torch.autograd.Function):
    """KL(teacher || student) of the logits softened by temperature T, mean over positions, times T^2 (Hinton).

    Chunks of rows at a time, the gradient ``T (softmax(s / T) - softmax(t / T)) / positions`` computed in the
    forward while a chunk's softmaxes are in cache: the only vocabulary-sized tensor it keeps is that gradient,
    where log_softmax + kl_div keep both log-softmaxes and write four more full-size temporaries. SmolLM2's
    (2, 256, 49152) logits, forward + backward: 0.38-0.48 s -> 0.12-0.14 s (one in-process A/B), the same value to
    fp32 rounding.
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature: float):
        student, teacher = (logits.reshape(-1, logits.shape[-1]) for logits in (student_logits, teacher_logits))
        positions, chunk = student.shape[0], max(1, KL_CHUNK_ELEMENTS // student.shape[-1])
        grad = torch.empty(student.shape, dtype=torch.float32, device=student.device)
        total = student.new_zeros((), dtype=torch.float32)
        for rows in (slice(first, first + chunk) for first in range(0, positions, chunk)):
            student_log = F.log_softmax(student[rows].float() / temperature, -1)
            teacher_log = F.log_softmax(teacher[rows].float() / temperature, -1)
            teacher_p = teacher_log.exp()
            total += teacher_log.sub_(student_log).mul_(teacher_p).sum()
            torch.sub(student_log.exp_(), teacher_p, out=grad[rows]).mul_(temperature / positions)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        return total * (temperature * temperature / positions)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).view(ctx.shape).to(ctx.dtype), None, None


def losses(config, student_out, teacher_out, labels, sites) -> dict[str, torch.Tensor]:
    terms = {}
    if config.kl_weight:
        terms["kl"] = SoftenedKL.apply(student_out.logits, teacher_out.logits.detach(), config.temperature)
    if config.ce_weight:
        terms["ce"] = F.cross_entropy(student_out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    if config.hidden_weight:
        terms["hidden"] = torch.stack([_relative_error(s, t) for s, t in
                                       zip(student_out.hidden_states[1:], teacher_out.hidden_states[1:])]).mean()
    if config.local_weight:
        local = [site.local_loss for site in sites.values() if site.local_loss is not None]
        if local:
            terms["local"] = torch.stack(local).mean()
    return terms


def set_teacher(sites: dict[str, DistillationSite], on: bool) -> None:
    for site in sites.values():
        site.as_teacher = on


def main(argv: list[str] | None = None) -> int:
    pin_malloc_thresholds()
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if train(config) is not None else 1


def train(config: DistillConfig) -> dict | None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from . import load_model, load_tokenizer
    from .conversion import refresh_record, save_converted
    from .data import full_windows, token_stream
    from .evaluation import perplexity
    from .hub import model_fingerprint, write_card

    output = Path(config.output_dir)
    accelerator = Accelerator(
        # without a GPU, processes started by `accelerate launch --multi_gpu` (torchrun) join as MULTI_CPU (gloo)
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision,
        log_with=config.report_to if config.report_to != "none" else None,
        project_config=ProjectConfiguration(project_dir=str(output), automatic_checkpoint_naming=False),
        # sites waiting for their ramp leave their parameters unused in a step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(config.seed)
    say = accelerator.print
    say(f"hf_dynorm distill: {config.model} -> {config.norm} ({config.mode} mode), "
        f"num_processes={accelerator.num_processes}, device={accelerator.device}")

    # -- student, teacher, data ----------------------------------------------------------------------------------
    tokenizer = load_tokenizer(config.model)
    student = load_model(config.model)
    train_ids = full_windows(token_stream(config.data, tokenizer, config.train_split), config.seq_len)
    eval_ids = token_stream(config.data, tokenizer, config.eval_split)[: config.eval_windows * config.eval_window]

    def held_out(model, **options):
        return perplexity(model, eval_ids, window=config.eval_window, progress=False, **options)

    teacher_nll = held_out(student).mean_nll
    originals = {site.name: student.get_submodule(site.name) for site in find_norm_sites(student)}
    calibration, anchors = convert_as_recipe(student, config, train_ids)
    sensitivity = calibration.local_sensitivity(config.norm, config.estimator, anchors or 0)
    sites = wrap_sites(student, originals)
    for site in sites.values():
        site.track_local = bool(config.local_weight)

    teacher = None
    if config.mode == "full":
        teacher = load_model(config.teacher or config.model).eval().requires_grad_(False)
    norm_params = [p for site in sites.values() for p in site.replacement.parameters()]
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                     target_modules="all-linear", lora_dropout=0.0))
        base_params = [p for n, p in student.named_parameters() if "lora_" in n]
    elif config.mode == "full":
        norm_ids = {id(p) for p in norm_params}
        base_params = [p for p in student.parameters() if id(p) not in norm_ids and p.requires_grad]
    else:
        base_params = []
        student.requires_grad_(False)
    for p in norm_params:
        p.requires_grad_(True)
    groups = [{"params": norm_params, "lr": config.learning_rate}]
    if base_params:
        groups.append({"params": base_params, "lr": config.base_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, eps=config.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(
        config.warmup_steps, 1)) * 0.5 * (1 + math.cos(math.pi * min(step, config.max_steps) / config.max_steps)))
    # the scheduler is stepped by hand once per optimizer step (accelerate's would step once per process)
    student, optimizer = accelerator.prepare(student, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if teacher is not None:
        teacher = teacher.to(accelerator.device)
    starts = site_starts(config, list(sites), sensitivity)
    if schedule_length(config, len(sites)) > config.max_steps:
        say(f"warning: the schedule needs {schedule_length(config, len(sites))} steps but max_steps is "
            f"{config.max_steps}: sites not yet ramped at the end are switched in whole.")

    # -- resume ---------------------------------------------------------------------------------------------------
    step, skipped = 0, 0
    checkpoints = output / "checkpoints"
    if config.resume_from_checkpoint:
        path = _latest(checkpoints) if config.resume_from_checkpoint == "latest" else \
            Path(config.resume_from_checkpoint)
        if path is not None:
            accelerator.load_state(str(path))
            step, skipped = (json.loads((path / "trainer_state.json").read_text())[k] for k in ("step", "skipped"))
            say(f"resumed from {path} at step {step}")
    accelerator.init_trackers("distill", config={k: v for k, v in asdict(config).items() if v is not None})

    # -- train ----------------------------------------------------------------------------------------------------
    per_step = config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    generator = torch.Generator().manual_seed(config.seed)
    epochs = math.ceil(config.max_steps * per_step / len(train_ids)) + 1
    order = torch.cat([torch.randperm(len(train_ids), generator=generator) for _ in range(epochs)])
    history = []
    bar = tqdm(total=config.max_steps, initial=step, desc="distill", disable=not (
        config.progress and accelerator.is_main_process))
    _reset_peak_memory()
    started = time.perf_counter()
    while step < config.max_steps:
        apply_schedule(sites, starts, step, config)
        student.train()
        totals = {}
        for micro in range(config.gradient_accumulation_steps):
            first = step * per_step + (micro * accelerator.num_processes + accelerator.process_index) * \
                config.batch_size
            batch = train_ids[order[first:first + config.batch_size]].to(accelerator.device)
            with accelerator.accumulate(student):
                with torch.no_grad():
                    if teacher is not None:
                        teacher_out = teacher(input_ids=batch, output_hidden_states=bool(config.hidden_weight))
                    else:
                        set_teacher(sites, True)
                        with (accelerator.unwrap_model(student).disable_adapter() if config.mode == "lora"
                              else nullcontext()):
                            teacher_out = student(input_ids=batch, output_hidden_states=bool(config.hidden_weight))
                        set_teacher(sites, False)
                student_out = student(input_ids=batch, output_hidden_states=bool(config.hidden_weight))
                terms = losses(config, student_out, teacher_out, batch, sites)
                loss = sum(getattr(config, f"{k}_weight") * v for k, v in terms.items())
                finite = bool(torch.isfinite(loss))
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                optimizer.zero_grad()
            for k, v in {"loss": loss, **terms}.items():  # averaged over processes: the global batch's loss
                mean = accelerator.reduce(v.detach().float(), reduction="mean")
                totals[k] = totals.get(k, 0.0) + float(mean) / config.gradient_accumulation_steps
        if not finite:
            skipped += 1
            say(f"step {step}: non-finite loss ({totals['loss']}), skipped ({skipped}/{config.max_nan_skips})")
            if skipped > config.max_nan_skips:
                say(f"error: more than {config.max_nan_skips} non-finite losses; stopping. The last good "
                    f"checkpoint is kept in {checkpoints}. Lower learning_rate or start from more anchors.")
                accelerator.end_training()
                return None
        step += 1
        record = {"step": step, "tokens": step * per_step * config.seq_len, **totals}
        if step % config.eval_every == 0 or step == config.max_steps:
            record["eval_ratio"] = math.exp(min(700, held_out(student).mean_nll -
                                                teacher_nll))
            say(f"step {step}: loss {totals['loss']:.4f}, held-out perplexity ratio {record['eval_ratio']:.4g}")
        history.append(record)
        accelerator.log(record, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.4f}")
        if finite and (step % config.save_every == 0) and step < config.max_steps:
            _save_checkpoint(accelerator, checkpoints / f"step-{step:06d}", step, skipped)
    bar.close()
    seconds = time.perf_counter() - started
    train_peak_gb = _peak_memory_gb()

    # -- finish: unwrap, merge, save, evaluate --------------------------------------------------------------------
    accelerator.wait_for_everyone()
    accelerator.end_training()
    final = accelerator.unwrap_model(student)
    if config.mode == "lora":
        final = final.merge_and_unload()
    apply_schedule(sites, {name: -10 ** 9 for name in sites}, config.max_steps, config)
    unwrap_sites(final)
    final.requires_grad_(False)
    anchored = config.norm == "dyisru" and config.anchors > 0 and not config.anchor_fade_steps
    final.config.dynorm["distillation"] = {k: v for k, v in asdict(config).items() if k not in ("progress",)}
    final.config.dynorm["distillation"].update(tokens=step * per_step * config.seq_len, anchored_final=anchored)
    if not anchored:  # the anchors have faded to weight 0 (or never were): drop them
        for module in final.modules():
            if isinstance(module, DyISRU):
                module.set_anchors([])
                module.anchor_weight.fill_(1.0)
    refresh_record(final)
    result = None
    if accelerator.is_main_process:
        final_nll = held_out(final, tokenizer=tokenizer)
        result = {"final_perplexity_ratio": math.exp(min(700, final_nll.mean_nll - teacher_nll)),
                  "teacher_perplexity": math.exp(teacher_nll), "student": final_nll.to_dict(),
                  "anchored": anchored, "tokens": step * per_step * config.seq_len, "train_seconds": seconds,
                  "tokens_per_second": (step * per_step * config.seq_len) / max(seconds, 1e-9),
                  "skipped_steps": skipped, "train_peak_rss_gb": train_peak_gb, "history": history,
                  "config": asdict(config)}
        save_converted(final, output / "final", tokenizer, overwrite=True)
        result["model_fingerprint"] = model_fingerprint(output / "final")
        (output / "final" / "results.json").write_text(json.dumps(result, indent=2, default=str))
        write_card(output / "final", result)
        say(f"final: perplexity ratio {result['final_perplexity_ratio']:.4g} "
            f"({'anchored' if anchored else 'pure element-wise'}), saved to {output / 'final'}")
    return result if result is not None else {}  # {} on the other processes: they succeeded too


def _reset_peak_memory() -> None:
    """Linux: reset the process's peak RSS so that the loop's own peak can be read afterwards."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory_gb() -> float | None:
    """Peak RSS since `_reset_peak_memory` (Linux VmHWM), in GB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return None


def _save_checkpoint(accelerator, path: Path, step: int, skipped: int) -> None:
    """save_state into a temporary folder, renamed into place when complete (a kill never leaves half of one)."""
    tmp = path.with_name(path.name + ".partial")
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "skipped": skipped}))
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def _latest(checkpoints: Path) -> Path | None:
    found = sorted(p for p in checkpoints.glob("step-*") if not p.name.endswith(".partial"))
    return found[-1] if found else None


if __name__ == "__main__":
    sys.exit(main())
