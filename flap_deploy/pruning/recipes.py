"""Named pruning recipes: the pruned bundled model the tests, the demo and the benchmarks measure.
"""

from __future__ import annotations

import os
from pathlib import Path

from flap_deploy.io.bundled import materialize

from .config import PruneConfig
from .pipeline import prune


def flap_pruned_bundled(out: str | os.PathLike, *, ratio: float = 0.2, calib: str = "self", nsamples: int = 64,
                        mlp_multiple: int = 16, tp_size: int = 1, reconstruct: str = "bias",
                        progress: bool = True) -> Path:
    """The bundled SmolLM2-135M pruned by FLAP into ``out``, once; later calls return ``out`` at once.

    The one recipe of the test fixtures and the benchmarks (seqlen 128, seed 0, the paper's bias
    compensation unless ``reconstruct`` says otherwise: the cached models of earlier runs stay
    what their directory names say), so their figures describe the same kind of model. The caller names ``out``
    after the arguments it varies, so that different recipes do not share a directory.
    """
    out = Path(out)
    if not (out / "config.json").is_file():
        config = PruneConfig(ratio=ratio, calib=calib, nsamples=nsamples, seqlen=128, seed=0,
                             mlp_multiple=mlp_multiple, tp_size=tp_size, reconstruct=reconstruct, progress=progress)
        prune(materialize("smollm2-135m"), config, out=out, overwrite=True)
    return out
