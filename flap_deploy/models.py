"""Resolve a model argument (bundled name or directory) and load it with transformers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .adapters import get_adapter
from .bundled import BUNDLED, materialize
from .checkpoint import read_config, validate_checkpoint
from .errors import FlapDeployError


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A directory for a bundled model name or an existing path; a clear error otherwise."""
    text = str(name_or_path)
    if text in BUNDLED:
        return materialize(text)
    path = Path(text)
    if not path.exists():
        raise FlapDeployError(
            f"model '{text}' not found: no such directory, and not a bundled model ({', '.join(BUNDLED)})"
        )
    return path


def check_model_dir(path: Path) -> dict[str, Any]:
    """Validate a pruned checkpoint or check that a dense one is of a supported family."""
    cfg = read_config(path)
    if cfg.get("model_type") == "flap_llama":
        return validate_checkpoint(path)
    get_adapter(cfg)
    return cfg


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = None) -> torch.nn.Module:
    """Load a dense (supported family) or pruned checkpoint for inference on the CPU."""
    import flap_deploy  # noqa: F401  registers flap_llama with the Auto classes
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FlapDeployError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
