"""The pruned bundled model the tests and the demo measure, and how a pruned checkpoint's recipe is named."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flap_deploy.io.bundled import materialize

from .config import PruneConfig
from .pipeline import prune


def flap_pruned_bundled(out: str | os.PathLike, *, progress: bool = True, **overrides: Any) -> Path:
    """The bundled SmolLM2-135M pruned into ``out`` with the shipped defaults (``PruneConfig()``) but
    ``overrides``, once; later calls return ``out`` at once. The caller names ``out`` after what it
    overrides (``recipe_name``), so that different recipes never share a cached directory."""
    out = Path(out)
    if not (out / "config.json").is_file():
        prune(materialize("smollm2-135m"), PruneConfig(progress=progress, **overrides), out=out, overwrite=True)
    return out


def recipe_name(**overrides: Any) -> str:
    """A directory name that says every setting that differs from the shipped defaults."""
    config = PruneConfig(**overrides)
    parts = [f"{config.method}{round(100 * config.ratio)}", config.effective_reconstruct]
    for key, value in sorted(overrides.items()):
        if key not in ("ratio", "method", "reconstruct"):
            parts.append(f"{key}-{Path(str(value)).stem if key == 'calib' else value}")
    return "-".join(parts)


def describe_recipe(config: dict[str, Any]) -> str:
    """The exact recipe of a pruned checkpoint, from its config.json (provenance and dtype): what every
    result that measures it must name."""
    from flap_deploy.io.card import reconstruction_of

    p = config["flap"]
    mode, ridge = reconstruction_of(p)
    calib = p.get("calibration") or {}
    source = calib.get("source", "?")
    text = (f"{p['method']} {100 * p['target_ratio']:g} % ({p['metric']}, {p['structure']}, "
            f"reconstruction {mode}" + (f" ridge {ridge:g}" if ridge is not None else "")
            + f", calibration {source} {calib.get('samples', '?')} x {calib.get('seqlen', '?')}, "
              f"seed {calib.get('seed', '?')}")
    align = p.get("alignment") or {}
    if align.get("mlp_multiple", 1) != 1 or align.get("tp_size", 1) != 1:
        text += f", MLP multiple {align.get('mlp_multiple', 1)}, TP {align.get('tp_size', 1)}"
    dtype = config.get("dtype") or config.get("torch_dtype") or "?"
    return text + f"; {dtype}; achieved {100 * p['achieved_ratio']:.1f} %)"
