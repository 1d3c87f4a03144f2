"""hf_dynorm's metrics as `evaluate` modules: ``evaluate.load(hf_dynorm.metrics.path("dynorm_perplexity"))``.

`dynorm_perplexity` scores a model *object* (converted or not, optionally beside a reference) on texts;
`dynorm_fidelity` measures outlier fidelity of a converted model against its original.
"""

from pathlib import Path

NAMES = ("dynorm_perplexity", "dynorm_fidelity")


def path(name: str) -> str:
    """The local module folder `evaluate.load` reads."""
    if name not in NAMES:
        raise ValueError(f"unknown metric {name!r}: choose one of {NAMES}")
    return str(Path(__file__).parent / name)
