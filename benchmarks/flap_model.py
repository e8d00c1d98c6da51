"""The pruned model the benchmarks measure: the bundled SmolLM2-135M pruned by FLAP.

One recipe for every benchmark script, so their figures describe the same kind of model:
FLAP at ``ratio`` with WikiText-2 valid calibration when ``../shared/data`` is present (else
self-generated), MLP widths a multiple of 16, optionally aligned for tensor parallelism.
The result is cached under ``work`` and reused (``flap_deploy.io.bundled.flap_pruned_bundled``).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"


def flap_pruned_bundled(work: Path, *, ratio: float = 0.2, tp_size: int = 1, nsamples: int = 64,
                        mlp_multiple: int = 16) -> Path:
    """Path of the FLAP-pruned bundled model (pruned into ``work`` on the first call)."""
    from flap_deploy.pruning.recipes import flap_pruned_bundled as pruned

    valid = WIKITEXT / "valid.txt"
    out = Path(work) / (f"smollm2-135m-flap{round(100 * ratio)}-{'wikitext' if valid.is_file() else 'self'}"
                        f"{nsamples}-m{mlp_multiple}-tp{tp_size}")
    return pruned(out, ratio=ratio, calib=str(valid) if valid.is_file() else "self", nsamples=nsamples,
                  mlp_multiple=mlp_multiple, tp_size=tp_size)
