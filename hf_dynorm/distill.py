"""Distil a converted student back to its teacher's quality: one readable loop, launched with accelerate.

    hf-dynorm distill --config recipes/smollm2-135m/dyisru.yaml [--key value ...]
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m hf_dynorm.distill --config FILE.yaml

Every site of the student is a `DistillationSite`: the original norm and its replacement side by side, mixed by
a `blend` that the schedule moves from 0 (norm) to 1 (replacement). With blend forced to 0 the same weights are
the teacher, so `norms` and `lora` modes need no second model. At the end each site is unwrapped to its
replacement alone: nothing of the original norm is saved.

The run is four stages: `setup` (once: data, the calibrated conversion, the teacher, the accelerator's model),
`train_step`, `held_out` (the perplexity ratio on held-out text, its windows shared out among the processes) and
`finish` (the full weights gathered, LoRA merged, saved once). Batches are a pure function of the step (a seeded
order over fixed windows, each process taking its slice), so a run on one process and on two with the same global
batch see the same tokens, and a resumed run continues exactly where the killed one stopped. Every decision that
processes must take together (skip a non-finite step, stop) is taken on values all-reduced first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .allocator import pin_malloc_thresholds
from .architectures import find_norm_sites
from .config import (
    DEFAULT_BASE_LEARNING_RATE,
    DEFAULT_HOMOGENISE_LEARNING_RATE,
    HOMOGENISED,
    DistillConfig,
    latest_checkpoint,
    parse_config,
)
from .homogenise import cosine_with_warmup
from .losses import losses, relative_error
from .modeling_dynorm import DyISRU, DyT

# ---------------------------------------------------------------------------------------------------------------
# The student's sites
# ---------------------------------------------------------------------------------------------------------------


def calibrate_as_recipe(model: nn.Module, config: DistillConfig, train_ids: torch.Tensor):
    """Calibrate `model` on `train_ids` as the recipe `config` says: (CalibratedParameters, the sites least
    sensitive first where the schedule needs that order, else None)."""
    from .calibration import calibrate

    calibration = calibrate(model, train_ids, window=config.seq_len, max_windows=config.calibration_windows,
                            progress=False, label=f"{config.data} ({config.train_split})")
    anchors = config.anchors if config.norm == "dyisru" else 0
    sensitivity = calibration.local_sensitivity(config.norm, config.estimator, anchors) \
        if config.schedule == "progressive" and config.order == "sensitivity" else None
    parameters = calibration.parameters(config.norm, config.estimator, anchors, range_bound=config.range_bound)
    return parameters, sensitivity


def convert_as_recipe(model: nn.Module, config: DistillConfig, parameters, tokenizer=None) -> nn.Module:
    """Convert `model` in place with calibrated `parameters` as the recipe says: the student's start (and the
    converted models of benchmarks/run.py). A sink prefix needs the `tokenizer` to name its token."""
    from .conversion import convert

    sink = sink_token(tokenizer, config.sink_prefix) if config.sink_prefix else None
    return convert(model, config.norm, calibration=parameters, bound=config.bound, per_channel=config.per_channel,
                   sink_token=sink)


def sink_token(tokenizer, prefix: str) -> int:
    """The token id of a sink prefix: 'auto' is <|endoftext|> where the vocabulary has it, else the BOS, else the
    EOS. On SmolLM2 (README, "Pure element-wise models"), <|endoftext|> started at 36.6x and reached 1.30x after 40
    steps where its BOS, <|im_start|>, started at 79.5x and stood at 2.38x after 50."""
    if prefix == "auto":
        vocabulary = tokenizer.get_vocab()
        prefix = "<|endoftext|>" if "<|endoftext|>" in vocabulary else (tokenizer.bos_token or tokenizer.eos_token)
    if prefix not in tokenizer.get_vocab():
        raise ValueError(f"sink_prefix {prefix!r} is not one token of this tokenizer; give 'auto' or a token's text")
    return int(tokenizer.convert_tokens_to_ids(prefix))


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
            return self.norm(x)
        new = self.replacement(x)
        if self.track_local:
            with torch.no_grad():
                target = self.norm(x)
            self.local_loss = relative_error(new, target)
        if self.blend >= 1.0:
            return new
        return torch.lerp(self.norm(x), new, self.blend)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The original norm, in x's dtype: HF's RMSNorm returns weight * normed x, which is fp32 where its weight is
        (FSDP keeps the sites' parameters in fp32 when the layers compute in bf16: parallel.shard_norms_in_fp32)."""
        return self.original(x).to(x.dtype)


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


def local_losses(sites: dict[str, DistillationSite]) -> list[torch.Tensor]:
    return [site.local_loss for site in sites.values() if site.local_loss is not None]


def set_teacher(sites: dict[str, DistillationSite], on: bool) -> None:
    for site in sites.values():
        site.as_teacher = on


# ---------------------------------------------------------------------------------------------------------------
# The run: setup, train_step, held_out, finish
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything a distillation run holds between its stages."""

    config: DistillConfig
    accelerator: object
    tokenizer: object
    train_ids: torch.Tensor  # (windows, seq_len)
    eval_ids: torch.Tensor  # the held-out token stream
    student: nn.Module  # prepared by accelerate
    teacher: nn.Module | None  # full mode's frozen copy; None: the student with its norms switched back in
    sites: dict[str, DistillationSite]
    starts: dict[str, int]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    skeleton: nn.Module | None  # the main process's meta-device copy of the unprepared student (see finish)
    order: torch.Tensor  # the training windows in the order steps take them
    topology: dict  # world size, distributed type, mixed precision (and where it came from), sharding
    homogenised: dict | None  # the homogenisation stage's record, where it ran
    teacher_nll: float = math.nan
    start_ratio: float = math.nan  # the converted student's, before training
    optimizer_steps: int = 0  # taken by this process (a skipped step is skipped by all)

    @property
    def output(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def per_step(self) -> int:
        """Sequences per optimizer step over all processes."""
        return self.config.batch_size * self.accelerator.num_processes * self.config.gradient_accumulation_steps

    def batch(self, step: int, micro: int) -> torch.Tensor:
        """This process's sequences for one micro-step: a pure function of the step."""
        config, accelerator = self.config, self.accelerator
        first = step * self.per_step + (micro * accelerator.num_processes + accelerator.process_index) * \
            config.batch_size
        return self.train_ids[self.order[first:first + config.batch_size]].to(accelerator.device)


def setup(config: DistillConfig) -> Run:
    """Data, the student converted with parameters calibrated once (on the main process, broadcast to all), the
    trainable parameters and their optimizer, the teacher, and accelerate's preparation of it all."""
    from accelerate.utils import set_seed

    from . import load_model, load_tokenizer
    from .data import full_windows, token_stream
    from .parallel import (
        broadcast,
        describe,
        make_accelerator,
        meta_copy,
        place_frozen,
        shard_norms_in_fp32,
        sharded_fraction,
    )

    accelerator = make_accelerator(config, config.output_dir)
    set_seed(config.seed)
    say = accelerator.print
    topology = describe(accelerator, config)
    say(f"hf_dynorm distill: {config.model} -> {config.norm} ({config.mode} mode), "
        f"num_processes={accelerator.num_processes} ({topology['distributed_type']}), device={accelerator.device}, "
        f"mixed precision {topology['mixed_precision']} ({topology['mixed_precision_source']})")
    if config.overwrite and accelerator.is_main_process:
        _clear_earlier_run(Path(config.output_dir))

    # -- data: each node's main process tokenizes (and unpacks an embedded model) first; the others read its cache
    with accelerator.local_main_process_first():  # each node fills its own cache
        tokenizer = load_tokenizer(config.model)
        train_ids = full_windows(token_stream(config.data, tokenizer, config.train_split, cache=True), config.seq_len)
        eval_ids = token_stream(config.data, tokenizer, config.eval_split, cache=True)
    eval_ids = eval_ids[: config.eval_windows * config.eval_window]
    if eval_ids.numel() < config.eval_window:
        raise ValueError(f"the {config.eval_split} split has {eval_ids.numel()} tokens, fewer than one eval_window "
                         f"of {config.eval_window}: lower --eval_window or give more held-out text.")

    # -- the student: (homogenised,) calibrated once, converted identically everywhere ------------------------------
    homogenise_record = None
    if config.homogenise_steps:
        homogenise_record = homogenised_start(config, accelerator, tokenizer, train_ids)
        set_seed(config.seed)  # the distillation draws the same numbers whether the stage ran now or was reused
    start = Path(config.output_dir) / HOMOGENISED if homogenise_record else config.model
    student = load_model(start).to(accelerator.device)
    originals = {site.name: student.get_submodule(site.name) for site in find_norm_sites(student)}
    calibrated = calibrate_as_recipe(student, config, train_ids) if accelerator.is_main_process else None
    parameters, sensitivity = broadcast(calibrated, accelerator)
    convert_as_recipe(student, config, parameters, tokenizer)
    sites = wrap_sites(student, originals)
    for site in sites.values():
        site.track_local = bool(config.local_weight)
    base_lr = base_learning_rate(config, student)  # from the linear weights, before LoRA wraps them
    student, trainable = _trainable(student, sites, config)
    skeleton = meta_copy(student) if accelerator.is_main_process else None

    # -- optimisation, prepared by accelerate ---------------------------------------------------------------------
    alpha_lr = alpha_learning_rate(config, sites)  # from the calibrated alphas, before FSDP shards them
    shard_norms_in_fp32(list(sites.values()), accelerator)
    student = accelerator.prepare(student)
    # the optimizer is made from the prepared (under FSDP: sharded) parameters, found by name
    named = dict(accelerator.unwrap_model(student).named_parameters())
    groups = [{"params": [named[name] for name in trainable[group]], "lr": lr, "name": group}
              for group, lr in (("norms", config.learning_rate), ("alphas", alpha_lr),
                                ("base", base_lr)) if trainable[group]]
    optimizer = accelerator.prepare_optimizer(torch.optim.AdamW(groups, weight_decay=0.0, eps=config.adam_epsilon))
    # stepped by hand once per optimizer step (accelerate's wrapper would step once per process)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer,
                                                  cosine_with_warmup(config.warmup_steps, config.max_steps))
    accelerator.register_for_checkpointing(scheduler)
    topology["sharding"] = sharded_fraction(student)
    teacher = place_frozen(load_model(config.teacher or config.model), accelerator) \
        if separate_teacher(config) else None

    starts = site_starts(config, list(sites), sensitivity)
    if schedule_length(config, len(sites)) > config.max_steps:
        say(f"warning: the schedule needs {schedule_length(config, len(sites))} steps but max_steps is "
            f"{config.max_steps}: sites not yet ramped at the end are switched in whole.")
    per_step = config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    generator = torch.Generator().manual_seed(config.seed)
    epochs = math.ceil(config.max_steps * per_step / len(train_ids)) + 1
    order = torch.cat([torch.randperm(len(train_ids), generator=generator) for _ in range(epochs)])
    run = Run(config, accelerator, tokenizer, train_ids, eval_ids, student, teacher, sites, starts, optimizer,
              scheduler, skeleton, order, topology, homogenise_record)
    # the student first: FSDP fixes each unit's gradient dtype at its first forward from the parameters that require
    # gradients then, and the teacher's forward in lora mode runs with PEFT's adapters disabled (requires_grad off)
    apply_schedule(sites, {name: -10 ** 9 for name in sites}, 0, config)  # zero-shot: every site switched in
    start_nll = held_out(run).mean_nll
    run.teacher_nll = held_out(run, teacher=True).mean_nll
    run.start_ratio = math.exp(min(700, start_nll - run.teacher_nll))
    say(f"start: held-out perplexity ratio {run.start_ratio:.4g} (teacher perplexity {math.exp(run.teacher_nll):.4g})")
    return run


def alpha_learning_rate(config: DistillConfig, sites: dict[str, DistillationSite]) -> float:
    """DyT's alpha scales as 1 / its input, and Adam moves a parameter by about its learning rate a step, so a fixed
    rate moves the alphas of a model with 10x larger activations 10x as far relative to their size.
    alpha_relative_learning_rate is a fraction of the model's median calibrated |alpha| instead; unset, alpha trains
    at learning_rate as every other norm parameter."""
    if config.alpha_relative_learning_rate is None:
        return config.learning_rate
    alphas = [site.replacement.alpha.detach().abs().flatten() for site in sites.values()
              if isinstance(site.replacement, DyT)]
    return config.alpha_relative_learning_rate * torch.cat(alphas).median().item() if alphas else 0.0


def base_learning_rate(config: DistillConfig, model: nn.Module) -> float:
    """The LoRA adapters' (full mode: every other weight's) rate: base_learning_rate, or base_relative_learning_rate
    x median_linear_weight_std, or the default."""
    return learning_rate_for(model, config.base_learning_rate, config.base_relative_learning_rate,
                             DEFAULT_BASE_LEARNING_RATE)


def homogenise_learning_rate(config: DistillConfig, model: nn.Module) -> float:
    """The homogenisation stage's LoRA rate, resolved as base_learning_rate's."""
    return learning_rate_for(model, config.homogenise_learning_rate, config.homogenise_relative_learning_rate,
                             DEFAULT_HOMOGENISE_LEARNING_RATE)


def learning_rate_for(model: nn.Module, absolute: float | None, relative: float | None, default: float) -> float:
    """`absolute` where given, else `relative` x median_linear_weight_std(model), else `default`."""
    if relative is None:
        return default if absolute is None else absolute
    return relative * median_linear_weight_std(model)


def median_linear_weight_std(model: nn.Module) -> float:
    """Adam moves a weight (or a LoRA factor) by about its learning rate a step, so what a rate does depends on the
    size of the weights: Gemma 3 270M's linear weights have a median std of 0.040, SmolLM2's 0.19, and the same rate
    changes Gemma's ~5x as much relative to themselves. The median over the model's linear layers (the output
    embedding left out), taken before LoRA wraps them, is the scale a relative rate is a fraction of."""
    head = model.get_output_embeddings()
    stds = [module.weight.detach().float().std() for module in model.modules()  # (GPT-2's linear layers: Conv1D)
            if (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D") and module is not head]
    return torch.stack(stds).median().item()


def separate_teacher(config: DistillConfig) -> bool:
    """Whether the teacher is a frozen model of its own: in full mode, and wherever the student's own weights with
    the norms switched back in are no longer the original (after homogenisation; with a sink prefix)."""
    return config.mode == "full" or bool(config.homogenise_steps or config.sink_prefix or config.teacher)


def homogenised_start(config: DistillConfig, accelerator, tokenizer, train_ids: torch.Tensor) -> dict:
    """The homogenisation stage (homogenise.py), run once on the main process and saved to OUTPUT/homogenised, from
    where every process loads its student; a resumed run finds it there. Returns its record."""
    from . import load_model
    from .fileio import atomic_directory
    from .homogenise import homogenise

    folder = Path(config.output_dir) / HOMOGENISED
    if accelerator.is_main_process and not (folder / "homogenise.json").exists():
        started, model = time.perf_counter(), load_model(config.model)
        rate = homogenise_learning_rate(config, model)
        model, history = homogenise(
            model.to(accelerator.device), train_ids, steps=config.homogenise_steps, weight=config.homogenise_weight,
            learning_rate=rate, warmup_steps=config.homogenise_warmup_steps, batch_size=config.homogenise_batch_size,
            lora_r=config.lora_r, lora_alpha=config.lora_alpha, max_grad_norm=config.max_grad_norm, seed=config.seed,
            log=accelerator.print)
        record = config.homogenise_settings() | {
            "resolved_learning_rate": rate, "seconds": time.perf_counter() - started,
            "tokens": config.homogenise_steps * config.homogenise_batch_size * config.seq_len, "history": history}
        with atomic_directory(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "homogenise.json").write_text(json.dumps(record, indent=2))
    accelerator.wait_for_everyone()
    record = json.loads((folder / "homogenise.json").read_text())
    return {key: value for key, value in record.items() if key != "history"} | {
        "final_kl": record["history"][-1]["kl"], "final_spread": record["history"][-1]["spread"],
        "first_spread": record["history"][0]["spread"]}


def _trainable(student: nn.Module, sites: dict[str, DistillationSite], config: DistillConfig):
    """(the student, LoRA-wrapped in lora mode; the names of the parameters to train: {"alphas": DyT's alpha,
    "norms": the replacements' other parameters, "base": LoRA adapters in lora mode, every other weight in full
    mode}). Everything else is frozen."""
    norm_ids = {id(p) for site in sites.values() for p in site.replacement.parameters()}
    alpha_ids = {id(site.replacement.alpha) for site in sites.values() if isinstance(site.replacement, DyT)}
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                     target_modules="all-linear", lora_dropout=0.0))
    trainable = {"alphas": [], "norms": [], "base": []}
    for name, p in student.named_parameters():
        if id(p) in alpha_ids:
            trainable["alphas"].append(name)
        elif id(p) in norm_ids:
            trainable["norms"].append(name)
        elif config.mode == "full" and p.requires_grad or config.mode == "lora" and "lora_" in name:
            trainable["base"].append(name)
    student.requires_grad_(False)
    for name, p in student.named_parameters():
        p.requires_grad_(any(name in names for names in trainable.values()))
    return student, trainable


def _clear_earlier_run(output: Path) -> None:
    """--overwrite: remove what an earlier run wrote here (its final model and checkpoints), nothing else."""
    for name in ("final", "checkpoints", HOMOGENISED):
        if (output / name).is_dir():
            shutil.rmtree(output / name)


@contextmanager
def teacher_view(run: Run):
    """The teacher's forward: full mode's frozen copy (under the student's autocast), else the student itself with
    every site's original norm switched back in and LoRA adapters disabled."""
    if run.teacher is not None:
        from .parallel import is_fsdp

        # under DDP the prepared student runs under accelerate's autocast; under FSDP both use the bf16 policy
        with nullcontext() if is_fsdp(run.accelerator) else run.accelerator.autocast():
            yield run.teacher
        return
    set_teacher(run.sites, True)
    try:
        with (run.accelerator.unwrap_model(run.student).disable_adapter() if run.config.mode == "lora"
              else nullcontext()):
            yield run.student
    finally:
        set_teacher(run.sites, False)


def held_out(run: Run, teacher: bool = False):
    """Perplexity of the student (or its teacher) on the held-out tokens, its windows shared out among the
    processes: every process gets the same result."""
    from .evaluation import sharded_perplexity
    from .parallel import gather

    accelerator = run.accelerator
    with teacher_view(run) if teacher else nullcontext(run.student) as model:
        return sharded_perplexity(model, run.eval_ids, window=run.config.eval_window,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes,
                                  gather=lambda obj: gather(obj, accelerator), tokenizer=run.tokenizer)


def train_step(run: Run, step: int) -> tuple[dict, bool]:
    """One optimizer step over the global batch: (the losses averaged over processes and micro-steps, whether the
    step was taken). A step with a non-finite loss on any process is skipped by all of them: every process still
    runs its backward (DDP and FSDP reduce gradients inside it, and one process missing would hang the others),
    then nobody updates."""
    from .parallel import all_finite

    config, accelerator, student = run.config, run.accelerator, run.student
    apply_schedule(run.sites, run.starts, step, config)
    student.train()
    totals, finite = {}, True
    hidden = bool(config.hidden_weight)
    for micro in range(config.gradient_accumulation_steps):
        batch = run.batch(step, micro)
        with accelerator.accumulate(student):
            with torch.no_grad(), teacher_view(run) as teacher:
                teacher_out = teacher(input_ids=batch, output_hidden_states=hidden)
            student_out = student(input_ids=batch, output_hidden_states=hidden)
            terms = losses(config, student_out, teacher_out, batch, local_losses(run.sites))
            loss = sum(getattr(config, f"{name}_weight") * term for name, term in terms.items())
            finite = all_finite(loss, accelerator) and finite
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if finite:
                    accelerator.clip_grad_norm_(student.parameters(), config.max_grad_norm)
                    run.optimizer.step()
                    run.scheduler.step()
                    run.optimizer_steps += 1
                run.optimizer.zero_grad()
        for name, value in {"loss": loss, **terms}.items():  # averaged over processes: the global batch's loss
            mean = accelerator.reduce(value.detach().float(), reduction="mean")
            totals[name] = totals.get(name, 0.0) + float(mean) / config.gradient_accumulation_steps
    return totals, finite


def save_checkpoint(run: Run, step: int, skipped: int) -> None:
    """save_state into a temporary folder, renamed into place once every process has written its part (a kill never
    leaves half of one)."""
    accelerator = run.accelerator
    path = run.output / "checkpoints" / f"step-{step:06d}"
    tmp = path.with_name(path.name + ".partial")
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "skipped": skipped}))
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def resume(run: Run) -> tuple[int, int]:
    """(step, skipped steps) to continue from: a checkpoint's, or (0, 0)."""
    config = run.config
    if not config.resume_from_checkpoint:
        return 0, 0
    path = latest_checkpoint(run.output / "checkpoints") if config.resume_from_checkpoint == "latest" else \
        Path(config.resume_from_checkpoint)
    if path is None:  # only the homogenisation stage was done (config.DistillConfig._check_output)
        return 0, 0
    run.accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    run.accelerator.print(f"resumed from {path} at step {state['step']}")
    return state["step"], state["skipped"]


def finish(run: Run, step: int, skipped: int, history: list[dict], seconds: float, peaks: dict) -> dict:
    """Every site switched in whole, the final evaluation (all processes), the full weights gathered onto the main
    process, and there: LoRA merged into whole weights, the sites unwrapped, the model saved once with its results
    and card. Returns the results on the main process, {} on the others."""
    from .conversion import refresh_record, save_converted
    from .hub import model_fingerprint, write_card
    from .parallel import gather

    config, accelerator = run.config, run.accelerator
    apply_schedule(run.sites, {name: -10 ** 9 for name in run.sites}, config.max_steps, config)
    final_eval = held_out(run)
    ratio = math.exp(min(700, final_eval.mean_nll - run.teacher_nll))
    if history:
        history[-1]["eval_ratio"] = ratio
    optimizer_steps = gather(run.optimizer_steps, accelerator)
    state = accelerator.get_state_dict(run.student)  # FSDP: gathered (a collective), on the main process only
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return {}

    final = run.skeleton
    final.load_state_dict(state, assign=True)
    if config.mode == "lora":
        final = final.merge_and_unload()
    final = final.to("cpu").requires_grad_(False)
    unwrap_sites(final)
    if getattr(final.config, "tie_word_embeddings", False):
        final.tie_weights()
    anchored = config.norm == "dyisru" and config.anchors > 0 and not config.anchor_fade_steps
    tokens = step * run.per_step * config.seq_len
    final.config.dynorm["distillation"] = {k: v for k, v in asdict(config).items()
                                           if k not in ("progress", "sources")}
    final.config.dynorm["distillation"].update(tokens=tokens, anchored_final=anchored)
    if not anchored:  # the anchors have faded to weight 0 (or never were): drop them
        for module in final.modules():
            if isinstance(module, DyISRU):
                module.set_anchors([])
                module.anchor_weight.fill_(1.0)
    refresh_record(final)
    result = {"final_perplexity_ratio": ratio, "start_perplexity_ratio": run.start_ratio,
              "teacher_perplexity": math.exp(run.teacher_nll),
              "student": final_eval.to_dict(), "anchored": anchored, "form": final.config.dynorm["form"],
              "tokens": tokens, "train_seconds": seconds,
              "tokens_per_second": tokens / max(seconds, 1e-9),
              "tokens_per_second_per_process": tokens / max(seconds, 1e-9) / accelerator.num_processes,
              "skipped_steps": skipped, "optimizer_steps_by_process": optimizer_steps,
              "learning_rates": {group["name"]: group["initial_lr"] for group in run.optimizer.param_groups}, **peaks,
              **run.topology, "homogenised": run.homogenised, "history": history,
              "config": {k: v for k, v in asdict(config).items() if k != "sources"}}
    save_converted(final, run.output / "final", run.tokenizer, overwrite=True)
    result["model_fingerprint"] = model_fingerprint(run.output / "final")
    (run.output / "final" / "results.json").write_text(json.dumps(result, indent=2, default=str))
    write_card(run.output / "final", result)
    accelerator.print(f"final: perplexity ratio {ratio:.4g} ({'anchored' if anchored else 'pure element-wise'}), "
                      f"saved to {run.output / 'final'}")
    return result


def train(config: DistillConfig) -> dict | None:
    """The whole run; None if it stopped on non-finite losses (the last good checkpoint kept)."""
    from tqdm.auto import tqdm

    run = setup(config)
    accelerator, say = run.accelerator, run.accelerator.print
    step, skipped = resume(run)
    accelerator.init_trackers("distill", config={k: v for k, v in asdict(config).items()
                                                 if v is not None and k != "sources"})
    history = []
    bar = tqdm(total=config.max_steps, initial=step, desc="distill",
               disable=not (config.progress and accelerator.is_main_process))
    _reset_peak_memory()
    started = time.perf_counter()
    while step < config.max_steps:
        totals, finite = train_step(run, step)
        if not finite:
            skipped += 1
            say(f"step {step}: non-finite loss ({totals['loss']}), skipped ({skipped}/{config.max_nan_skips})")
            if skipped > config.max_nan_skips:
                say(f"error: more than {config.max_nan_skips} non-finite losses; stopping. The last good "
                    f"checkpoint is kept in {run.output / 'checkpoints'}. Lower learning_rate or start from more "
                    "anchors.")
                accelerator.end_training()
                return None
        step += 1
        record = {"step": step, "tokens": step * run.per_step * config.seq_len, **totals}
        if step % config.eval_every == 0 and step < config.max_steps:
            record["eval_ratio"] = math.exp(min(700, held_out(run).mean_nll - run.teacher_nll))
            say(f"step {step}: loss {totals['loss']:.4f}, held-out perplexity ratio {record['eval_ratio']:.4g}")
        history.append(record)
        accelerator.log(record, step=step)
        bar.update(1)
        bar.set_postfix(loss=f"{totals['loss']:.4f}")
        if finite and step % config.save_every == 0 and step < config.max_steps:
            save_checkpoint(run, step, skipped)
    bar.close()
    return finish(run, step, skipped, history, time.perf_counter() - started, _peak_memory())


def main(argv: list[str] | None = None) -> int:
    from .assets import AssetMissing

    pin_malloc_thresholds()
    try:
        config = parse_config(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError, AssetMissing) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if train(config) is not None else 1


def _reset_peak_memory() -> None:
    """Reset the peaks (Linux RSS, CUDA memory) so that the loop's own can be read afterwards."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> dict:
    """Peak RSS since `_reset_peak_memory` (Linux VmHWM; None elsewhere) and peak CUDA memory, in GB."""
    peaks = {"train_peak_rss_gb": None, "train_peak_gpu_gb": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks["train_peak_rss_gb"] = int(line.split()[1]) / 1e6
    except OSError:
        pass
    if torch.cuda.is_available():
        peaks["train_peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return peaks


if __name__ == "__main__":
    sys.exit(main())
