import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default model on the Transformers backend, loaded once per session."""
    from powersmc import load_model

    return load_model(backend="transformers", device="cpu")


@pytest.fixture(scope="session")
def llama_lm():
    """The embedded default model on the llama.cpp backend, loaded once per session."""
    from powersmc import load_model

    return load_model(backend="llama.cpp", device="cpu")
