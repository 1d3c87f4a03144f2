"""Swap a pretrained model's norms for DyT or DyISRU in place, keeping what the norms learned.

`convert` is all or nothing: every check and every new module is made before the first swap, so a failed call
leaves the model as it was. What was done is written to ``model.config.dynorm``; the model's class becomes a
``Dynorm*`` subclass whose ``save_pretrained`` also writes self-contained code and an ``auto_map``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from . import __version__
from .architectures import ARCHITECTURES, ROLES, NormSite, find_norm_sites
from .calibration import calibrate
from .fileio import atomic_directory
from .modeling_dynorm import (
    NORM_KINDS,
    DyISRU,
    DyT,
    SinkPrefix,
    dynorm_config_class,
    dynorm_model_class,
    install_norms,
)
from .registry import register_architecture

# what `convert` passes on to `calibrate` (the model, its data and its sites are convert's own)
CALIBRATION_OPTIONS = frozenset(inspect.signature(calibrate).parameters) - {"model", "data", "sites"}


class ConversionError(ValueError):
    """A conversion that cannot be done as asked; the model is unchanged."""


@dataclass(frozen=True)
class ConversionOptions:
    """How `convert` swaps the norms, typed and checked as PEFT's configs are: an unknown option is an error (a
    misspelled keyword fails instead of being ignored), and so is one that does not apply (kappa for DyT, an anchor
    count without calibration data).

    norm: "dyisru" or "dyt". sites: roles or regular expressions over module names (None: all). kappa / alpha: one
    value, or one per role, instead of calibration. per_channel: one kappa/alpha per channel. anchors: channel
    indices, or with calibration a count k (the k largest channels per site). bound: saturate at `bound` x token rms
    instead of the paper's sqrt(C). range_bound c (with calibration): each channel saturates at c times its own
    99.9th percentile of |x_i|, slope at 0 RMSNorm's (`Calibration.parameters`). sink_token: a token id whose keys
    and values, computed now with the norms in place, precede every sequence (`SinkPrefix`). estimator,
    kappa_from: how calibration turns statistics into kappa/alpha.
    calibration_options: passed on to `calibration.calibrate` (window, max_windows, tokenizer, ...).
    """

    norm: str = "dyisru"
    sites: str | tuple[str, ...] | None = None
    kappa: float | dict | None = None
    alpha: float | dict | None = None
    per_channel: bool = False
    anchors: int | tuple[int, ...] | None = None
    bound: float | None = None
    range_bound: float | None = None
    sink_token: int | None = None
    estimator: str = "median"
    kappa_from: str = "all"
    calibration_options: dict = field(default_factory=dict)

    def __post_init__(self):
        from .calibration import ESTIMATORS, KAPPA_FROM

        if self.norm not in NORM_KINDS:
            raise ConversionError(f"unknown norm {self.norm!r}: choose one of {sorted(NORM_KINDS)}.")
        if (self.kappa if self.norm == "dyt" else self.alpha) is not None:
            raise ConversionError(f"{'kappa' if self.norm == 'dyt' else 'alpha'} belongs to "
                                  f"{'DyISRU' if self.norm == 'dyt' else 'DyT'}; {self.norm} takes "
                                  f"{'alpha' if self.norm == 'dyt' else 'kappa'}.")
        if self.norm == "dyt" and self.anchors:
            raise ConversionError("anchors belong to DyISRU; DyT has no anchored form.")
        if self.bound is not None and not self.bound > 0:
            raise ConversionError(f"bound must be a positive number of token rms (got {self.bound}); leave it unset "
                                  "for the paper's sqrt(C).")
        if self.range_bound is not None and (not self.range_bound > 0 or self.bound is not None or self.anchors):
            raise ConversionError(f"range_bound must be a positive multiple of each channel's range (got "
                                  f"{self.range_bound}), without bound or anchors: it bounds every channel itself.")
        if self.estimator not in ESTIMATORS or self.kappa_from not in KAPPA_FROM:
            raise ConversionError(f"estimator must be one of {ESTIMATORS} and kappa_from one of {KAPPA_FROM}; got "
                                  f"{self.estimator!r} and {self.kappa_from!r}.")
        unknown = sorted(set(self.calibration_options) - CALIBRATION_OPTIONS)
        if unknown:
            raise ConversionError(f"unknown calibration option(s) {unknown}; calibrate() takes "
                                  f"{sorted(CALIBRATION_OPTIONS)}.")

    @classmethod
    def from_keywords(cls, norm: str, keywords: dict) -> ConversionOptions:
        """The options of `convert(model, norm, **keywords)`: each keyword is an option of this class or of
        `calibration.calibrate`; anything else raises TypeError naming what exists."""
        own = {f.name for f in fields(cls)} - {"norm", "calibration_options"}
        unknown = sorted(set(keywords) - own - CALIBRATION_OPTIONS)
        if unknown:
            raise TypeError(f"convert() got unknown option(s) {unknown}; its options are {sorted(own)}, and with "
                            f"calibration= those of calibrate(): {sorted(CALIBRATION_OPTIONS)}.")
        return cls(norm=norm, **{k: v for k, v in keywords.items() if k in own},
                   calibration_options={k: v for k, v in keywords.items() if k not in own})


def is_converted(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "dynorm", None) is not None


def select_sites(sites: list[NormSite], selection: str | Iterable[str] | None) -> list[NormSite]:
    """Sites by role name (see architectures.ROLES) or by regular expression over module names; None: all."""
    if selection is None or selection == "all":
        return list(sites)
    selectors = [selection] if isinstance(selection, str) else list(selection)
    for selector in selectors:
        if selector not in ROLES:
            try:
                re.compile(selector)
            except re.error as error:
                raise ConversionError(f"sites={selector!r} is neither a role ({', '.join(ROLES)}) nor a valid regular "
                                      f"expression ({error}); escape special characters, e.g. r'layers\\.1\\.'.") \
                    from None
    chosen = [site for site in sites
              if any(site.role == s if s in ROLES else re.search(s, site.name) for s in selectors)]
    if not chosen:
        available = ", ".join(sorted({site.role for site in sites}))
        raise ConversionError(
            f"sites={selectors!r} matches none of the model's {len(sites)} norms. Give roles ({available}) or a "
            f"regular expression over module names; `hf-dynorm info MODEL` lists them.")
    return chosen


def default_parameter(kind: str, channels: int) -> float:
    """Without calibration: the theory's values for inputs of unit rms (s = 1): kappa = C, alpha = 1/sqrt(C)."""
    return float(channels) if kind == "dyisru" else 1.0 / math.sqrt(channels)


def bounded(kind: str, value: float, channels: int, bound: float | None) -> tuple[float, float]:
    """(weight scale, kappa or alpha) for an output bound of `bound` * w per channel instead of sqrt(C) * w.

    The slope at 0 (what the function does to an ordinary element) stays the norm's; the function saturates at
    `bound` times the token rms s instead of sqrt(C) s. One massive token then cannot hand the next layer an input
    sqrt(C) times the usual size, which is what makes a pure element-wise model run away (README, distillation).
    Anchored DyISRU scales its coupled term by the square of the weight scale (`DyISRU.anchor_scale`).
    """
    if bound is None:
        return 1.0, value
    scale = bound / math.sqrt(channels)
    return scale, value * scale ** 2 if kind == "dyisru" else value / scale


def build_replacement(kind: str, site: NormSite, original: nn.Module, value: float | list[float], per_channel: bool,
                      anchors: list[int], bound: float | None = None,
                      weight_scale: list[float] | None = None) -> nn.Module:
    """The element-wise module for one site: kappa or alpha `value` (one, or one per channel), gamma from the norm's
    weight, times the bound's scale or a per-channel `weight_scale` (a range bound's)."""
    bias = getattr(original, "bias", None)
    per_channel = per_channel or isinstance(value, list)
    scale, value = bounded(kind, value, site.channels, bound) if not isinstance(value, list) else (1.0, value)
    first = value[0] if isinstance(value, list) else value
    if kind == "dyisru":
        new = DyISRU(site.channels, kappa=first, per_channel=per_channel, bias=bias is not None, anchors=anchors,
                     anchor_scale=scale ** 2)
    else:
        new = DyT(site.channels, alpha=first, per_channel=per_channel, bias=bias is not None)
    with torch.no_grad():
        if isinstance(value, list):
            parameter = torch.tensor(value, dtype=torch.float32)
            (new.log_kappa.copy_(parameter.log()) if kind == "dyisru" else new.alpha.copy_(parameter))
        if weight_scale is not None:
            scale = torch.tensor(weight_scale, dtype=torch.float32)
        new.weight.copy_(site.gamma(original) * scale)
        if bias is not None:
            new.bias.copy_(bias.detach().float())
    reference = next(original.parameters(), None)
    return new.to(device=reference.device, dtype=reference.dtype) if reference is not None else new


def _explicit_value(explicit: float | dict[str, float], site: NormSite) -> float:
    if not isinstance(explicit, dict):
        return float(explicit)
    if site.role not in explicit:
        raise ConversionError(f"no value given for role {site.role!r} (site {site.name}); the dict needs every "
                              f"converted role, got {sorted(explicit)}.")
    return float(explicit[site.role])


def convert(model: nn.Module, norm: str | ConversionOptions = "dyisru", *, calibration=None, **options) -> nn.Module:
    """Replace the model's norms by `norm` ("dyisru" or "dyt") in place and return the model.

    gamma comes from each norm's own weight (w * sqrt(C), (1 + w) * sqrt(C) for Gemma) and LayerNorm's bias is kept.
    kappa/alpha: from `calibration` (text, token ids, a `Calibration` or `CalibratedParameters`; see
    `calibration.calibrate`, whose options pass through) when given, else `kappa`/`alpha` (a dict gives one value
    per role), else the unit-rms default of `default_parameter`. `anchors`: channel indices coupled at every site
    wide enough (anchored DyISRU); with calibration, ``anchors=k`` picks the k largest channels per site instead.
    `bound`: saturate at `bound` times the token rms (output bound `bound` * w per channel) instead of the paper's
    sqrt(C), slope at 0 unchanged; ~0.5 makes a pure element-wise SmolLM2 ~1e155 times better zero-shot (see
    `bounded` and the README). Every option is one of `ConversionOptions` (which `norm` may also be) or of
    `calibrate`; anything else raises TypeError, and nothing about the model changes unless the whole conversion
    can be done.
    """
    if isinstance(norm, ConversionOptions):
        if options:
            raise TypeError("give the options either as a ConversionOptions or as keywords, not both")
        settings = norm
    else:
        settings = ConversionOptions.from_keywords(norm, options)
    if is_converted(model):
        raise ConversionError("this model is already converted (its config has a `dynorm` record); convert the "
                              "original model instead.")
    norm, anchors, bound, per_channel = settings.norm, settings.anchors, settings.bound, settings.per_channel
    explicit = settings.kappa if norm == "dyisru" else settings.alpha
    if calibration is not None and explicit is not None:
        raise ConversionError("give either calibration data or an explicit kappa/alpha, not both.")
    defaults = ConversionOptions()
    given = sorted(settings.calibration_options) + [name for name in ("estimator", "kappa_from", "range_bound")
                                                    if getattr(settings, name) != getattr(defaults, name)]
    if calibration is None and given:
        raise ConversionError(f"{', '.join(given)}: calibration options, but no calibration data was given; pass "
                              "calibration= (a text source, token ids or a Calibration).")
    found = find_norm_sites(model)
    if not found:
        raise ConversionError(f"found no norm in this {type(model).__name__} ({model.config.model_type}): its norm "
                              "class is neither nn.LayerNorm nor named *RMSNorm, and its architecture is not in "
                              f"hf_dynorm's registry ({', '.join(ARCHITECTURES)}). Nothing was changed.")
    chosen = select_sites(found, settings.sites)
    if model.config.model_type not in CONFIG_MAPPING:
        raise ConversionError(f"model_type {model.config.model_type!r} is not a transformers architecture (remote "
                              "code?); hf_dynorm converts models whose classes ship with transformers.")
    originals = {site.name: model.get_submodule(site.name) for site in chosen}

    summary = None
    if calibration is not None:
        from .calibration import calibrate_parameters

        values, site_anchors, summary, scales = calibrate_parameters(
            model, chosen, calibration, norm, anchors=anchors, estimator=settings.estimator,
            kappa_from=settings.kappa_from, range_bound=settings.range_bound, **settings.calibration_options)
        origin = f"calibration ({summary['estimator']})"
    else:
        if isinstance(anchors, int):
            raise ConversionError("anchors=k (pick k channels) needs calibration data; give channel indices instead.")
        fixed = sorted(anchors or [])
        values = {site.name: _explicit_value(explicit, site) if explicit is not None
                  else default_parameter(norm, site.channels) for site in chosen}
        site_anchors = {site.name: [c for c in fixed if c < site.channels] if site.role not in ("q_norm", "k_norm")
                        else [] for site in chosen}
        origin = "explicit" if explicit is not None else "default: unit rms (kappa = C, alpha = 1/sqrt(C))"
        scales = None
    range_bound = (summary or {}).get("range_bound")
    bound_text = "sqrt(C) (the paper's)" if bound is None else f"{bound} x token rms"
    if range_bound is not None:
        bound_text = f"per channel: {range_bound} x the 99.9th percentile of |x_i| (at most sqrt(C) x token rms)"

    new_modules = {site.name: build_replacement(norm, site, originals[site.name], values[site.name], per_channel,
                                                site_anchors[site.name], bound, (scales or {}).get(site.name))
                   for site in chosen}

    sink = SinkPrefix.of(model, settings.sink_token) if settings.sink_token is not None else None
    base_type = model.config.model_type
    register_architecture(base_type)
    install_norms(model, new_modules)
    if sink is not None:
        sink.install(model)
    model.config.__class__ = dynorm_config_class(type(model.config))
    model.__class__ = dynorm_model_class(type(model))
    model.config.dynorm = {
        "format": 1,
        "hf_dynorm_version": __version__,
        "norm": norm,
        "base_model_type": base_type,
        "base_model": getattr(model.config, "_name_or_path", "") or None,
        "parameters": {"gamma": "norm weight * sqrt(C)" + (" with (1 + w)" if chosen[0].flavour == "rms_offset"
                                                           else ""),
                       "kappa" if norm == "dyisru" else "alpha": origin,
                       "bound": bound_text},
        "sites": {site.name: {**new_modules[site.name].spec(), "role": site.role, "flavour": site.flavour,
                              "eps": site.eps, "depth": site.depth} for site in chosen},
        "calibration": summary,
    }
    if sink is not None:
        model.config.dynorm["sink"] = sink.spec()
    model.config.dynorm["form"] = form_of(model.config.dynorm)
    return model


def form_of(record: dict) -> str:
    """What a converted model is, in words: anchored (how many channels) or pure, and whether a sink prefix precedes
    every text."""
    anchors = max((spec.get("anchors", 0) for spec in record["sites"].values()), default=0)
    form = f"anchored: {anchors} channels per site stay coupled (not strictly element-wise)" if anchors \
        else "pure element-wise"
    if record.get("sink"):
        form += ", with a sink prefix (one constant first token's keys and values before every text)"
    return form


def refresh_record(model: nn.Module) -> None:
    """Bring each site's shape record, and the form, up to date with the modules (after anchors were dropped)."""
    for name, spec in model.config.dynorm["sites"].items():
        spec.update(model.get_submodule(name).spec())
    model.config.dynorm["form"] = form_of(model.config.dynorm)


def save_converted(model: nn.Module, output_dir, tokenizer=None, *, overwrite: bool = False, **kwargs) -> None:
    """`model.save_pretrained` (+ tokenizer) into `output_dir` atomically; refuses an unconverted model."""
    if not is_converted(model):
        raise ConversionError("this model has no `dynorm` record: convert it first (hf_dynorm.convert).")
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
