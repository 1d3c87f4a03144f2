"""hf_dynorm: normalization-free transformers from pretrained ones, with DyT and DyISRU.

    import hf_dynorm
    model = hf_dynorm.convert(model, "dyisru", calibration="wiki-sample")
    model.save_pretrained("out")          # reloads with AutoModelForCausalLM (+ trust_remote_code without hf_dynorm)

Importing registers the converted architectures with transformers' Auto classes (lazily: `registry`); the names
below load their modules on first use, so that `import hf_dynorm` and `hf-dynorm --help` stay fast.
"""

__version__ = "0.1.0"

from .architectures import ARCHITECTURES  # noqa: E402
from .registry import register_lazily  # noqa: E402

register_lazily(ARCHITECTURES)

_EXPORTS = {
    "ROLES": "architectures", "NormSite": "architectures", "find_norm_sites": "architectures",
    "load_model": "sources", "load_texts": "sources", "load_tokenizer": "sources",
    "ConversionError": "conversion", "ConversionOptions": "conversion", "convert": "conversion",
    "is_converted": "conversion",
    "DyISRU": "modeling_dynorm", "DyT": "modeling_dynorm", "dyisru": "modeling_dynorm", "dyt": "modeling_dynorm",
}
__all__ = ["ARCHITECTURES", *_EXPORTS]


def __getattr__(name: str):
    """The public names, each imported from its module when first asked for (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_dynorm' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
