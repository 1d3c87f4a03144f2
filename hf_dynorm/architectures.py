"""The one place that knows where each supported architecture keeps its norms, what role each plays, and how.

An architecture is a flavour (how the norm computes, which fixes gamma), the name of its eps attribute, and a
table of module-name patterns to roles. Patterns match the end of a dotted module name, so the same table serves
the bare model (``layers.0.input_layernorm``) and every task head (``model.layers.0.input_layernorm``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `import hf_dynorm` reads this registry without it
    from torch import nn

logger = logging.getLogger(__name__)

# Roles a norm site can play.
ATTN_INPUT, MLP_INPUT, FINAL = "attn_input", "mlp_input", "final"
Q_NORM, K_NORM = "q_norm", "k_norm"
EMBEDDING, POST_ATTN, POST_MLP = "embedding", "post_attn", "post_mlp"
ROLES = (ATTN_INPUT, MLP_INPUT, FINAL, Q_NORM, K_NORM, EMBEDDING, POST_ATTN, POST_MLP)

# Flavours: how the original norm computes.
RMS = "rms"  # w * x / rms(x)
RMS_OFFSET = "rms_offset"  # Gemma: (1 + w) * x / rms(x)
LAYER = "layer"  # w * (x - mean) / std(x) + b


@dataclass(frozen=True)
class Architecture:
    flavour: str
    eps_attr: str
    sites: dict[str, str]  # module-name pattern (matched at the end of the name) -> role
    qk_heads_first: bool = False  # q/k norms run after the heads transpose: inputs (batch, heads, sequence, head_dim)

    def role_of(self, name: str) -> str | None:
        for pattern, role in self.sites.items():
            if re.search(rf"(?:^|\.){pattern}$", name):
                return role
        return None

    def sequence_dim(self, role: str) -> int:
        """Where a site of this role keeps the sequence in its input: 1, or 2 for heads-first q/k norms."""
        return 2 if self.qk_heads_first and role in (Q_NORM, K_NORM) else 1


_LAYER = r"layers\.\d+\."
_DECODER = {_LAYER + "input_layernorm": ATTN_INPUT, _LAYER + "post_attention_layernorm": MLP_INPUT, "norm": FINAL}
_QK = {_LAYER + r"self_attn\.q_norm": Q_NORM, _LAYER + r"self_attn\.k_norm": K_NORM}
_SANDWICH = {  # Gemma 2/3: a norm before and after each sublayer
    _LAYER + "input_layernorm": ATTN_INPUT, _LAYER + "post_attention_layernorm": POST_ATTN,
    _LAYER + "pre_feedforward_layernorm": MLP_INPUT, _LAYER + "post_feedforward_layernorm": POST_MLP, "norm": FINAL,
}
_POST_NORM = {  # OLMo 2/3: each sublayer's output normalised before the residual add, no norm on its input
    _LAYER + "post_attention_layernorm": POST_ATTN, _LAYER + "post_feedforward_layernorm": POST_MLP, "norm": FINAL,
}
_POST_LN_ENCODER = {
    r"embeddings\.LayerNorm": EMBEDDING, r"attention\.output\.LayerNorm": POST_ATTN,
    r"layer\.\d+\.output\.LayerNorm": POST_MLP,
}

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(RMS, "variance_epsilon", _DECODER),
    "mistral": Architecture(RMS, "variance_epsilon", _DECODER),
    "qwen2": Architecture(RMS, "variance_epsilon", _DECODER),
    "qwen3": Architecture(RMS, "variance_epsilon", {**_DECODER, **_QK}),
    "phi3": Architecture(RMS, "variance_epsilon", _DECODER),
    "gemma": Architecture(RMS_OFFSET, "eps", _DECODER),
    "gemma2": Architecture(RMS_OFFSET, "eps", _SANDWICH),
    "gemma3_text": Architecture(RMS_OFFSET, "eps", {**_SANDWICH, **_QK}, qk_heads_first=True),
    "olmo2": Architecture(RMS, "variance_epsilon", {**_POST_NORM, **_QK}),  # q/k norms over all heads at once
    "olmo3": Architecture(RMS, "variance_epsilon", {**_POST_NORM, **_QK}),
    "gpt2": Architecture(LAYER, "eps", {r"h\.\d+\.ln_1": ATTN_INPUT, r"h\.\d+\.ln_2": MLP_INPUT, "ln_f": FINAL}),
    "gpt_neox": Architecture(LAYER, "eps", {_LAYER + "input_layernorm": ATTN_INPUT,
                                           _LAYER + "post_attention_layernorm": MLP_INPUT,
                                           "final_layer_norm": FINAL}),
    "opt": Architecture(LAYER, "eps", {_LAYER + "self_attn_layer_norm": ATTN_INPUT,
                                      _LAYER + "final_layer_norm": MLP_INPUT,
                                      r"decoder\.final_layer_norm": FINAL}),
    "bert": Architecture(LAYER, "eps", {**_POST_LN_ENCODER, r"predictions\.transform\.LayerNorm": FINAL}),
    "roberta": Architecture(LAYER, "eps", {**_POST_LN_ENCODER, r"lm_head\.layer_norm": FINAL}),
}


@dataclass(frozen=True)
class NormSite:
    """One norm of a model: where it is, what it does, and its facts."""

    name: str
    role: str
    flavour: str
    channels: int
    eps: float
    depth: int | None  # the layer index, None outside the layer stack

    def gamma(self, module: nn.Module):
        """gamma = w * sqrt(C) (RMSNorm and LayerNorm), (1 + w) * sqrt(C) for Gemma (arXiv 2503.21708)."""
        import torch

        weight = getattr(module, "weight", None)
        weight = torch.ones(self.channels) if weight is None else weight.detach().float()
        if self.flavour == RMS_OFFSET:
            weight = 1.0 + weight
        return weight * math.sqrt(self.channels)


def _looks_like_norm(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _generic_flavour(module: nn.Module) -> str:
    from torch import nn

    return LAYER if isinstance(module, nn.LayerNorm) else RMS


def _eps(module: nn.Module, attr: str | None) -> float:
    for name in (attr, "variance_epsilon", "eps", "epsilon"):
        if name and hasattr(module, name):
            return float(getattr(module, name))
    return 1e-6


def _channels(module: nn.Module) -> int:
    if getattr(module, "weight", None) is not None:
        return module.weight.shape[-1]
    shape = getattr(module, "normalized_shape", None)
    if shape:
        return shape[-1]
    raise ValueError(f"cannot tell the channel count of {type(module).__name__}: it has no weight")


def _depth(name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return int(match.group(1)) if match else None


def architecture_of(model: nn.Module) -> Architecture | None:
    return ARCHITECTURES.get(getattr(model.config, "model_type", None))


def find_norm_sites(model: nn.Module) -> list[NormSite]:
    """Every norm of `model` with its role, in module order. Architectures outside the registry fall back to
    modules that are nn.LayerNorm or whose class name ends in RMSNorm, with a warning naming what was found."""
    arch = architecture_of(model)
    sites = []
    for name, module in model.named_modules():
        if arch is not None:
            role = arch.role_of(name)
            if role is None:
                continue
            flavour, eps_attr = arch.flavour, arch.eps_attr
        elif _looks_like_norm(module):
            role, flavour, eps_attr = _generic_role(name), _generic_flavour(module), None
        else:
            continue
        sites.append(NormSite(name, role, flavour, _channels(module), _eps(module, eps_attr), _depth(name)))
    if arch is None:
        model_type = getattr(model.config, "model_type", type(model).__name__)
        kinds = sorted({type(model.get_submodule(site.name)).__name__ for site in sites})
        logger.warning(
            "hf_dynorm has no registry entry for model_type %r: falling back to %d norm-like modules (%s); roles are "
            "guessed from names and Gemma-style (1 + w) weights are not detected. Check them with `hf-dynorm info`.",
            model_type, len(sites), ", ".join(kinds) or "none")
    return sites


@contextmanager
def observing_norm_inputs(model: nn.Module, observers: dict[str, Callable[..., None]], *,
                          with_outputs: bool = False) -> Iterator[nn.Module]:
    """Within the block, every forward of `model` calls observers[name] with the input of the module `name` (a norm
    site) before that module runs, or, `with_outputs`, with its input and output after it ran (so that an observer
    that needs the norm's output does not compute it again); the hooks are removed on the way out, errors included.
    Observers get every tensor as (batch, sequence, ..., channels), whatever order the site's own input has (Gemma 3's
    q/k norms get (batch, heads, sequence, head_dim), OPT's MLP norm (batch x sequence, channels)): they exclude the
    first position, the attention sink's, by it.

    Yields what to call to feed them: the base model when every site lies inside it, so that no task head runs for
    nothing (SmolLM2's LM head writes 4 x 512 x 49152 fp32 logits, 400 MB, per batch of four windows), else
    `model`."""
    arch = architecture_of(model)
    prefix = getattr(model, "base_model_prefix", "")
    inside = prefix and hasattr(model, prefix) and all(name.startswith(prefix + ".") for name in observers)
    root = getattr(model, prefix) if inside else model
    tokens = {}  # the (batch, sequence) of the forward under way

    def note_tokens(_, args, kwargs):
        given = kwargs.get("input_ids", args[0] if args else None)
        given = kwargs.get("inputs_embeds") if given is None else given
        if given is not None:
            tokens["shape"] = tuple(given.shape[:2])

    def hook(name: str, observe):  # the hooks return None whatever observe returns: no output is replaced
        dim = arch.sequence_dim(arch.role_of(name)) if arch is not None else 1

        def ordered(x):
            return x.unflatten(0, tokens["shape"]) if x.dim() == 2 else x.transpose(1, dim)

        def before(_, args):
            observe(ordered(args[0]))

        def after(_, args, output):
            observe(ordered(args[0]), ordered(output))

        module = model.get_submodule(name)
        return module.register_forward_hook(after) if with_outputs else module.register_forward_pre_hook(before)

    handles = [top.register_forward_pre_hook(note_tokens, with_kwargs=True) for top in {model, root}]
    handles += [hook(name, observe) for name, observe in observers.items()]
    try:
        yield root
    finally:
        for handle in handles:
            handle.remove()


def _generic_role(name: str) -> str:
    """A best guess from common naming, used only by the fallback."""
    leaf = name.rsplit(".", 1)[-1].lower()
    if "q_norm" in leaf:
        return Q_NORM
    if "k_norm" in leaf:
        return K_NORM
    if _depth(name) is None:
        return EMBEDDING if "emb" in name.lower() else FINAL
    if "post" in leaf or "final" in leaf or "ln_2" in leaf:
        return MLP_INPUT
    return ATTN_INPUT
