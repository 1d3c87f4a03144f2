"""hf_dynorm: normalization-free transformers from pretrained ones, with DyT and DyISRU.

    import hf_dynorm
    model = hf_dynorm.convert(model, "dyisru", calibration="wiki-sample")
    model.save_pretrained("out")          # reloads with AutoModelForCausalLM (+ trust_remote_code without hf_dynorm)
"""

__version__ = "0.1.0"

from .architectures import ARCHITECTURES, ROLES, NormSite, find_norm_sites  # noqa: E402
from .assets import load_model, load_texts, load_tokenizer  # noqa: E402
from .conversion import ConversionError, convert, is_converted, register_all  # noqa: E402
from .modeling_dynorm import DyISRU, DyT, dyisru, dyt  # noqa: E402

register_all()

__all__ = [
    "ARCHITECTURES", "ROLES", "ConversionError", "DyISRU", "DyT", "NormSite", "convert", "dyisru", "dyt",
    "find_norm_sites", "is_converted", "load_model", "load_texts", "load_tokenizer",
]
