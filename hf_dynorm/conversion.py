"""Swap a pretrained model's norms for DyT or DyISRU in place, keeping what the norms learned.

`convert` is all or nothing: every check and every new module is made before the first swap, so a failed call
leaves the model as it was. What was done is written to ``model.config.dynorm``; the model's class becomes a
``Dynorm*`` subclass whose ``save_pretrained`` also writes self-contained code and an ``auto_map``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
import transformers
from torch import nn
from transformers import AutoConfig
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from . import __version__
from .architectures import ARCHITECTURES, ROLES, NormSite, find_norm_sites
from .fileio import atomic_directory
from .modeling_dynorm import (
    NORM_KINDS,
    DyISRU,
    DyT,
    dynorm_config_class,
    dynorm_model_class,
    install_norms,
    register_auto_class,
)

# The task heads a converted checkpoint can be reloaded into with an Auto class.
_AUTO_CLASSES = {
    "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
    "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForTokenClassification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
}
DYNORM_PREFIX = "dynorm_"


class ConversionError(ValueError):
    """A conversion that cannot be done as asked; the model is unchanged."""


def register_architecture(model_type: str) -> None:
    """Make ``dynorm_<model_type>`` checkpoints loadable with transformers' Auto classes in this process."""
    config_class = dynorm_config_class(CONFIG_MAPPING[model_type])
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto_name, class_names in _AUTO_CLASSES.items():
        if model_type in class_names:
            model_class = dynorm_model_class(getattr(transformers, class_names[model_type]))
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
            register_auto_class(auto_name, model_class)


def register_all() -> None:
    for model_type in ARCHITECTURES:
        register_architecture(model_type)


def is_converted(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "dynorm", None) is not None


def select_sites(sites: list[NormSite], selection: str | Iterable[str] | None) -> list[NormSite]:
    """Sites by role name (see architectures.ROLES) or by regular expression over module names; None: all."""
    if selection is None or selection == "all":
        return list(sites)
    selectors = [selection] if isinstance(selection, str) else list(selection)
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


def build_replacement(kind: str, site: NormSite, original: nn.Module, value: float, per_channel: bool,
                      anchors: list[int], bound: float | None = None) -> nn.Module:
    bias = getattr(original, "bias", None)
    scale, value = bounded(kind, value, site.channels, bound)
    if kind == "dyisru":
        new = DyISRU(site.channels, kappa=value, per_channel=per_channel, bias=bias is not None, anchors=anchors,
                     anchor_scale=scale ** 2)
    else:
        new = DyT(site.channels, alpha=value, per_channel=per_channel, bias=bias is not None)
    with torch.no_grad():
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


def convert(
    model: nn.Module,
    norm: str = "dyisru",
    *,
    sites: str | Iterable[str] | None = None,
    kappa: float | dict[str, float] | None = None,
    alpha: float | dict[str, float] | None = None,
    per_channel: bool = False,
    anchors: Iterable[int] | None = None,
    bound: float | None = None,
    calibration=None,
    **calibration_options,
) -> nn.Module:
    """Replace the model's norms by `norm` ("dyisru" or "dyt") in place and return the model.

    gamma comes from each norm's own weight (w * sqrt(C), (1 + w) * sqrt(C) for Gemma) and LayerNorm's bias is kept.
    kappa/alpha: from `calibration` (text, token ids or a `Calibration`; see `calibration.calibrate`, whose options
    pass through) when given, else `kappa`/`alpha` (a dict gives one value per role), else the unit-rms default of
    `default_parameter`. `anchors`: channel indices coupled at every site wide enough (anchored DyISRU); with
    calibration, ``anchors=k`` picks the k largest channels per site instead. `bound`: saturate at `bound` times
    the token rms (output bound `bound` * w per channel) instead of the paper's sqrt(C), slope at 0 unchanged;
    ~0.5 makes a pure element-wise SmolLM2 ~1e155 times better zero-shot (see `bounded` and the README).
    """
    if is_converted(model):
        raise ConversionError("this model is already converted (its config has a `dynorm` record); convert the "
                              "original model instead.")
    if norm not in NORM_KINDS:
        raise ConversionError(f"unknown norm {norm!r}: choose one of {sorted(NORM_KINDS)}.")
    explicit = kappa if norm == "dyisru" else alpha
    if calibration is not None and explicit is not None:
        raise ConversionError("give either calibration data or an explicit kappa/alpha, not both.")
    if norm == "dyt" and anchors:
        raise ConversionError("anchors belong to DyISRU; DyT has no anchored form.")
    if bound is not None and not bound > 0:
        raise ConversionError(f"bound must be a positive number of token rms (got {bound}); leave it unset for "
                              "the paper's sqrt(C).")
    chosen = select_sites(find_norm_sites(model), sites)
    if model.config.model_type not in CONFIG_MAPPING:
        raise ConversionError(f"model_type {model.config.model_type!r} is not a transformers architecture (remote "
                              "code?); hf_dynorm converts models whose classes ship with transformers.")
    originals = {site.name: model.get_submodule(site.name) for site in chosen}

    summary = None
    if calibration is not None:
        from .calibration import calibrate_parameters

        values, site_anchors, summary = calibrate_parameters(model, chosen, calibration, norm,
                                                            anchors=anchors, **calibration_options)
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

    new_modules = {site.name: build_replacement(norm, site, originals[site.name], values[site.name], per_channel,
                                                site_anchors[site.name], bound) for site in chosen}

    base_type = model.config.model_type
    register_architecture(base_type)
    install_norms(model, new_modules)
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
                       "bound": "sqrt(C) (the paper's)" if bound is None else f"{bound} x token rms"},
        "sites": {site.name: {**new_modules[site.name].spec(), "role": site.role, "flavour": site.flavour,
                              "eps": site.eps, "depth": site.depth} for site in chosen},
        "calibration": summary,
    }
    return model


def refresh_record(model: nn.Module) -> None:
    """Bring each site's shape record up to date with its module (after anchors were added or dropped)."""
    for name, spec in model.config.dynorm["sites"].items():
        spec.update(model.get_submodule(name).spec())


def save_converted(model: nn.Module, output_dir, tokenizer=None, *, overwrite: bool = False, **kwargs) -> None:
    """`model.save_pretrained` (+ tokenizer) into `output_dir` atomically; refuses an unconverted model."""
    if not is_converted(model):
        raise ConversionError("this model has no `dynorm` record: convert it first (hf_dynorm.convert).")
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
