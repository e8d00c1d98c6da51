"""The pruned model the benchmarks measure: what `flap-deploy prune smollm2-135m OUT` makes.

One recipe for every benchmark script, so that their figures describe what users get: the
shipped defaults (``PruneConfig()``: FLAP 20 %, WIFV, AL-AM, least-squares reconstruction,
self-generated calibration), made through the CLI in a fresh process. ``flags`` adds CLI flags
where a benchmark needs them (e.g. ``--tp-size 2``); the directory name says them, and
``recipe(path)`` names the exact recipe for a result file. Cached once for all benchmarks, in
the cache root's ``benchmark-models``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"


def flap_pruned_bundled(*flags: str) -> Path:
    """Path of the bundled model pruned by `flap-deploy prune` with the shipped defaults plus ``flags``
    (pruned on the first call)."""
    from flap_deploy.io.bundled import cache_dir

    out = cache_dir() / "benchmark-models" / "-".join(["smollm2-135m-flap-default", *(f.lstrip("-") for f in flags)])
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "flap_deploy_cli", "prune", "smollm2-135m", str(out), "--overwrite",
                        *flags], cwd=REPO, check=True)
    return out


def recipe(path: str | Path) -> str:
    """The exact recipe of a pruned checkpoint (method, reconstruction, calibration, ratio, dtype)."""
    from flap_deploy.pruning.recipes import describe_recipe

    return describe_recipe(json.loads((Path(path) / "config.json").read_text()))
