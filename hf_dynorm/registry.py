"""transformers' Auto classes learn the converted architectures here: ``dynorm_<model_type>`` checkpoints load with
`AutoModelForCausalLM.from_pretrained(folder)` wherever hf_dynorm is imported, without trust_remote_code.

`import hf_dynorm` imports neither torch nor transformers (1.4-2 s and ~2.5 s more here; README, "Import time").
It registers each supported architecture lazily, as transformers' own Auto mappings do: once transformers' config
mapping exists (at once, or right after its module is imported), ``dynorm_<model_type>`` maps to a stand-in config
class that names its base architecture and imports nothing. Parsing a converted config through it registers the
real classes of that one architecture (`register_architecture`: its config, and a model class for each task head)
and hands over to them, so that the Auto model class that asks next finds them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

DYNORM_PREFIX = "dynorm_"
CONFIG_MODULE = "transformers.models.auto.configuration_auto"
# The task heads a converted checkpoint can be reloaded into with an Auto class, by the name of transformers'
# mapping from model_type to that head's class name.
AUTO_HEADS = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


class UnknownArchitecture(ValueError):
    """A converted checkpoint whose base architecture this transformers does not have."""


def register_architecture(model_type: str) -> type:
    """Make ``dynorm_<model_type>`` checkpoints loadable with the Auto class of each of their task heads in this
    process (the real classes, built from the architecture's modeling file). Returns the converted config class."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .modeling_dynorm import dynorm_config_class, dynorm_model_class, register_auto_class

    if model_type not in CONFIG_MAPPING:
        raise UnknownArchitecture(f"this checkpoint was converted from a {model_type!r} model, an architecture "
                                  f"transformers {transformers.__version__} does not know; install the transformers "
                                  "version it was made with.")
    config_class = dynorm_config_class(CONFIG_MAPPING[model_type])
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto_name, mapping in AUTO_HEADS.items():
        class_name = getattr(modeling_auto, mapping).get(model_type)
        if class_name:
            model_class = dynorm_model_class(getattr(transformers, class_name))
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
            register_auto_class(auto_name, model_class)
    return config_class


def _stand_in(model_type: str, base: type) -> type:
    """The config class ``dynorm_<model_type>`` maps to until such a config is parsed: a `base` (PretrainedConfig)
    subclass whose constructors register the real classes and return the real config."""

    def __new__(cls, *args, **kwargs):
        return register_architecture(model_type)(*args, **kwargs)

    def from_dict(cls, *args, **kwargs):
        return register_architecture(model_type).from_dict(*args, **kwargs)

    def from_pretrained(cls, *args, **kwargs):
        return register_architecture(model_type).from_pretrained(*args, **kwargs)

    return type(f"LazyDynorm{model_type.title().replace('_', '')}Config", (base,), {
        "model_type": DYNORM_PREFIX + model_type, "__new__": __new__, "from_dict": classmethod(from_dict),
        "from_pretrained": classmethod(from_pretrained), "__module__": __name__,
        "__doc__": f"Stands in for the converted {model_type} config until one is parsed."})


def _register_stand_ins(model_types, configuration_auto) -> None:
    from transformers import PretrainedConfig

    for model_type in model_types:
        key = DYNORM_PREFIX + model_type
        if key not in configuration_auto.CONFIG_MAPPING:  # a real class registered already wins
            configuration_auto.AutoConfig.register(key, _stand_in(model_type, PretrainedConfig), exist_ok=True)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs `callback(module)` right after `name`'s module has executed (a post-import hook), then steps aside."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self.loader = name, callback, None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self.loader is not None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback(module)


def register_lazily(model_types) -> None:
    """Register `model_types` with transformers' Auto classes without importing transformers: now if its config
    mapping exists, else right after its module is imported."""
    model_types = list(model_types)
    if CONFIG_MODULE in sys.modules:
        _register_stand_ins(model_types, sys.modules[CONFIG_MODULE])
    else:
        sys.meta_path.insert(0, _AfterImport(CONFIG_MODULE, lambda module: _register_stand_ins(model_types, module)))
