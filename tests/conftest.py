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
    from flap_deploy.io.bundled import materialize

    return materialize("smollm2-135m")


@pytest.fixture(autouse=True, scope="session")
def _cpu_threads():
    import torch

    torch.set_num_threads(int(os.environ.get("FLAP_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def flap20_dir(bundled_dir) -> Path:
    """The bundled model pruned 20 % by the real pruner with the shipped defaults (FLAP, ls ridge 0.03) but
    for a cheaper calibration (32 windows of WikiText-2 valid, or self-generated without the data) and MLP
    widths a multiple of 16, cached beside the bundled model for the whole run."""
    from flap_deploy.io.bundled import cache_dir
    from flap_deploy.pruning.recipes import flap_pruned_bundled, recipe_name

    valid = WIKITEXT / "valid.txt"
    recipe = dict(ratio=0.2, calib=str(valid) if valid.is_file() else "self", nsamples=32, mlp_multiple=16)
    return flap_pruned_bundled(cache_dir() / f"test-smollm2-135m-{recipe_name(**recipe)}", progress=False, **recipe)
