import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default model, loaded once per test session."""
    from powersmc import load_model

    return load_model(device="cpu")
