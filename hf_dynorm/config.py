"""A distillation recipe as a typed config: YAML keys and --key value overrides, every one checked before any model
loads (a run that would fail after minutes of loading and calibration fails here, in milliseconds)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

MODES = ("norms", "lora", "full")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
ESTIMATORS = ("median", "mean", "geomean", "fit")  # calibration.ESTIMATORS, without importing torch here
HOMOGENISED = "homogenised"  # the output folder's subfolder holding the homogenisation stage's model
DEFAULT_BASE_LEARNING_RATE = 3e-5  # the LoRA adapters or, in full mode, every other weight
DEFAULT_HOMOGENISE_LEARNING_RATE = 2e-3  # the homogenisation stage's LoRA adapters
# the keys that must be at least 1 (a 0 divides by zero or never runs)
POSITIVE_INTEGERS = ("seq_len", "batch_size", "gradient_accumulation_steps", "max_steps", "eval_every",
                     "eval_windows", "eval_window", "save_every", "calibration_windows", "ramp_steps", "lora_r",
                     "homogenise_batch_size")


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
    range_bound: float | None = field(default=None, metadata={
        "help": "pure start: each channel saturates at this multiple of its own 99.9th percentile |x| (anchors: 0; "
                "DyT, whose tanh bends later, wants a smaller one than DyISRU: README)"})
    sink_prefix: str | None = field(default=None, metadata={
        "help": "a constant first token before every sequence (its keys/values kept from the model before the "
                "swap): 'auto' (<|endoftext|> where the vocabulary has it, else the BOS, else the EOS) or a token's "
                "text"})
    homogenise_steps: int = field(default=0, metadata={
        "help": ">0: first fine-tune LoRA (norms in place) to even out token rms (homogenise.py), then convert"})
    homogenise_weight: float = field(default=30.0, metadata={"help": "weight of the log-rms spread in that stage"})
    homogenise_learning_rate: float | None = field(default=None, metadata={
        "help": f"that stage's LoRA rate; unset (and no homogenise_relative_learning_rate): "
                f"{DEFAULT_HOMOGENISE_LEARNING_RATE}"})
    homogenise_relative_learning_rate: float | None = field(default=None, metadata={
        "help": "that stage's LoRA rate as a fraction of the median std of the model's linear weights"})
    homogenise_warmup_steps: int = field(default=10, metadata={
        "help": "that stage's warmup, its own: warmup_steps is the distillation's"})
    homogenise_batch_size: int = field(default=2, metadata={
        "help": "that stage's sequences per step, its own: batch_size is the distillation's"})
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
    train_split: str = field(default="train", metadata={"help": "a split, slicing allowed: train[:50000]"})
    eval_split: str = "test"
    seq_len: int = 256
    batch_size: int = field(default=2, metadata={"help": "sequences per process and micro-step"})
    gradient_accumulation_steps: int = 1
    max_steps: int = 100
    learning_rate: float = field(default=1e-3, metadata={"help": "norm parameters"})
    alpha_relative_learning_rate: float | None = field(default=None, metadata={
        "help": "DyT's alpha, as a fraction of the model's median calibrated |alpha| (alpha scales as 1 / the "
                "activations; DyISRU's kappa trains on a log scale); unset: learning_rate"})
    base_learning_rate: float | None = field(default=None, metadata={
        "help": f"LoRA adapters or all other weights; unset (and no base_relative_learning_rate): "
                f"{DEFAULT_BASE_LEARNING_RATE}"})
    base_relative_learning_rate: float | None = field(default=None, metadata={
        "help": "the same, as a fraction of the median std of the model's linear weights (Adam moves a weight by "
                "about its rate a step: Gemma 3 270M's weights are ~5x smaller than SmolLM2's)"})
    warmup_steps: int = 5
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_nan_skips: int = 3
    seed: int = 0
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no | bf16 | fp16; unset: the accelerate launch config's (else no)"})
    # bookkeeping
    output_dir: str = "outputs/distill"
    overwrite: bool = field(default=False, metadata={"help": "replace the final model and checkpoints of an "
                                                             "earlier run in output_dir"})
    eval_every: int = 25
    eval_windows: int = field(default=4, metadata={"help": "held-out windows, shared out among the processes"})
    eval_window: int = 512
    save_every: int = 50
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder or 'latest'"})
    report_to: str = "tensorboard"
    progress: bool = True
    # where each key's value came from ("recipe FILE" or "command line"); not a key itself
    sources: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def validate(self) -> None:
        """Fail before any model is loaded, with the fix in the message."""
        for name in POSITIVE_INTEGERS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        _one_of("mode", self.mode, MODES)
        _one_of("schedule", self.schedule, ("all", "progressive"))
        _one_of("order", self.order, ("depth", "sensitivity"))
        _one_of("norm", self.norm, ("dyisru", "dyt"))
        _one_of("estimator", self.estimator, ESTIMATORS)
        if self.mixed_precision is not None:
            _one_of("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        if self.norm == "dyt" and (self.anchors or self.anchor_fade_steps):
            raise ValueError("anchors belong to DyISRU: set anchors: 0 and anchor_fade_steps: 0 for DyT")
        if self.anchors < 0 or self.anchor_fade_steps < 0 or self.warmup_steps < 0 or self.gap_steps < 0 \
                or self.max_nan_skips < 0:
            raise ValueError("anchors, anchor_fade_steps, warmup_steps, gap_steps and max_nan_skips cannot be "
                             "negative")
        if self.bound is not None and not self.bound > 0:
            raise ValueError(f"bound must be a positive number of token rms, got {self.bound}")
        if self.range_bound is not None and (not self.range_bound > 0 or self.bound is not None or self.anchors):
            raise ValueError("range_bound must be positive and comes without bound and anchors (anchors: 0): it "
                             "bounds every channel itself")
        if min(self.homogenise_steps, self.homogenise_weight, self.homogenise_warmup_steps) < 0 \
                or not all(rate is None or rate > 0 for rate in (self.homogenise_learning_rate,
                                                                 self.homogenise_relative_learning_rate)):
            raise ValueError("homogenise_steps, homogenise_weight and homogenise_warmup_steps cannot be negative, "
                             "homogenise_learning_rate and homogenise_relative_learning_rate must be positive")
        if self.homogenise_learning_rate is not None and self.homogenise_relative_learning_rate is not None:
            raise ValueError("give homogenise_learning_rate or homogenise_relative_learning_rate, not both")
        if self.anchor_fade_steps > self.max_steps:
            raise ValueError("anchor_fade_steps cannot exceed max_steps")
        if min(self.kl_weight, self.ce_weight, self.hidden_weight, self.local_weight) < 0:
            raise ValueError("loss weights cannot be negative")
        if self.kl_weight + self.ce_weight + self.hidden_weight + self.local_weight <= 0:
            raise ValueError("every loss weight is 0: nothing to train")
        if self.alpha_relative_learning_rate is not None and self.norm != "dyt":
            raise ValueError("alpha_relative_learning_rate is DyT's (its alpha); DyISRU's kappa trains at "
                             "learning_rate")
        if self.base_learning_rate is not None and self.base_relative_learning_rate is not None:
            raise ValueError("give base_learning_rate or base_relative_learning_rate, not both")
        if not (self.temperature > 0 and self.learning_rate >= 0 and (self.base_learning_rate or 0) >= 0
                and min(self.alpha_relative_learning_rate or 0, self.base_relative_learning_rate or 0) >= 0
                and self.adam_epsilon > 0 and self.max_grad_norm > 0):
            raise ValueError("temperature, adam_epsilon and max_grad_norm must be positive and learning rates "
                             "non-negative")
        from .sources import check_text_source, parse_split

        for split in (self.train_split, self.eval_split):
            parse_split(split)
        self._check_output()
        check_text_source(self.data, (self.train_split, self.eval_split))
        for name in (self.model, self.teacher):
            if name:
                self._check_model(name)

    def _check_output(self) -> None:
        """One output policy: a folder with an earlier run's files is refused unless resumed or overwritten."""
        output = Path(self.output_dir)
        if output.exists() and not output.is_dir():
            raise ValueError(f"output_dir {output} is a file; give a folder")
        if self.resume_from_checkpoint and self.overwrite:
            raise ValueError("resume_from_checkpoint and overwrite contradict each other: resume continues the run "
                             "in output_dir, overwrite replaces it. Choose one.")
        if self.resume_from_checkpoint:
            self._check_homogenised_stage(output / HOMOGENISED / "homogenise.json")
        if self.resume_from_checkpoint == "latest":
            stage_done = (output / HOMOGENISED / "homogenise.json").exists()  # a stage to continue from
            if latest_checkpoint(output / "checkpoints") is None and not stage_done:
                raise ValueError(f"resume_from_checkpoint latest: no checkpoint in {output / 'checkpoints'}; start "
                                 "without resume_from_checkpoint, or point it at a checkpoint folder.")
        elif self.resume_from_checkpoint:
            if not (Path(self.resume_from_checkpoint) / "trainer_state.json").exists():
                raise ValueError(f"{self.resume_from_checkpoint} is not a complete checkpoint (no trainer_state.json)"
                                 f"; give one of {output / 'checkpoints'}/step-* or 'latest'.")
        elif output.is_dir() and any(output.iterdir()) and not self.overwrite:
            raise ValueError(f"output_dir {output} already holds files (an earlier run?). Continue it with "
                             "--resume_from_checkpoint latest, replace its results with --overwrite true, or choose "
                             "another --output_dir.")

    def homogenise_settings(self) -> dict:
        """The homogenisation stage's own settings as given, without the prefix: its record (homogenise.json) holds
        them, and the rate they resolve to on the model (distill.homogenise_learning_rate)."""
        return {"steps": self.homogenise_steps, "weight": self.homogenise_weight,
                "learning_rate": self.homogenise_learning_rate,
                "relative_learning_rate": self.homogenise_relative_learning_rate,
                "warmup_steps": self.homogenise_warmup_steps, "batch_size": self.homogenise_batch_size}

    def _check_homogenised_stage(self, record_file: Path) -> None:
        """A resumed run reuses OUTPUT/homogenised only if that stage ran with this recipe's settings."""
        if not record_file.exists():
            return
        record = json.loads(record_file.read_text())
        differ = [f"homogenise_{key}: {record.get(key)} there, {value} here"
                  for key, value in self.homogenise_settings().items()
                  if record.get(key) != value]
        if differ:
            raise ValueError(f"{record_file.parent} was homogenised with other settings ({'; '.join(differ)}); resume "
                             "with the same settings, or start again with --overwrite true.")

    def _check_model(self, name: str) -> None:
        """The model is an architecture of the registry and its context holds the windows asked for."""
        from transformers import PretrainedConfig

        from .architectures import ARCHITECTURES
        from .sources import resolve_model

        config, _ = PretrainedConfig.get_config_dict(resolve_model(name))
        if config.get("model_type") not in ARCHITECTURES:
            raise ValueError(f"model_type {config.get('model_type')!r} of {name} is not in hf_dynorm's registry "
                             f"({', '.join(ARCHITECTURES)}); distillation recipes need a registered architecture.")
        context = config.get("max_position_embeddings") or config.get("n_positions")
        longest = max(self.seq_len, self.eval_window)
        if context and longest > context:
            raise ValueError(f"seq_len/eval_window {longest} exceed the context of {name} ({context} tokens); set "
                             f"--seq_len and --eval_window to {context} or less.")


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def latest_checkpoint(checkpoints: Path):
    """The newest complete checkpoint folder (step-NNNNNN), or None."""
    found = sorted(p for p in Path(checkpoints).glob("step-*") if (p / "trainer_state.json").exists())
    return found[-1] if found else None


def parse_config(argv: list[str]) -> DistillConfig:
    """YAML recipe (--config) with --key value overrides, HfArgumentParser style; unknown keys are errors."""
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DistillConfig)
    known = {f.name for f in fields(DistillConfig) if f.init}
    config_path = None
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs a recipe file: --config recipes/smollm2-135m/dyisru.yaml")
        config_path, argv = argv[index + 1], argv[:index] + argv[index + 2:]
    recipe = {}
    if config_path:
        if not Path(config_path).is_file():
            raise ValueError(f"recipe {config_path} does not exist; the shipped ones are under recipes/")
        recipe = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(recipe, dict):
            raise ValueError(f"{config_path} is not a mapping of recipe keys")
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {config_path}; known keys: {sorted(known)}")
        parser.set_defaults(**recipe)
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    config.sources = {key: f"recipe {config_path}" for key in recipe}
    config.sources.update({arg[2:].split("=")[0]: "command line" for arg in argv
                           if arg.startswith("--") and arg[2:].split("=")[0] in known})
    config.validate()
    return config
