import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    if not (WIKITEXT / "test.txt").is_file():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT}")
    return WIKITEXT


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The materialized bundled SmolLM2-135M (converted once per cache)."""
    from flap_deploy.bundled import materialize

    return materialize("smollm2-135m")


@pytest.fixture(autouse=True, scope="session")
def _cpu_threads():
    import torch

    torch.set_num_threads(int(os.environ.get("FLAP_TEST_THREADS", "2")))
