"""Resumable heal states: the trainable weights and the optimizer's moments in safetensors, the rest in JSON.

A state is a directory ``step-NNNNNNNN`` inside the run's state directory, written atomically; the newest
complete one is what a resumed run continues, older ones are removed once a newer one is in place. No pickle:
optimizer state is flattened into named tensors (``optimizer.{index}.{key}``) plus its JSON-able fields.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.io.atomic import atomic_directory

STATE_VERSION = 1


@dataclass
class HealState:
    step: int = 0
    losses: list[float] = field(default_factory=list)  # one per step
    seconds: float = 0.0  # training time over every run that reached this state
    trainable: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None


def step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def check_state_dir(root: Path, resume: bool) -> None:
    """Before any work: a state to resume must exist, and an existing one is never silently replaced."""
    exists = root.exists() and any(root.iterdir())
    if resume and not step_dirs(root):
        raise ParameterError("resume", f"is on and {root} holds no heal state to continue")
    if not resume and exists:
        raise ParameterError("resume", f"is off and the heal state {root} exists: continue it with `resume`, or "
                                       "remove it")


def save_state(root: Path, state: HealState, settings: dict[str, Any], extra: dict[str, Any]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"trainable.{k}": v.detach().contiguous().cpu() for k, v in state.trainable.items()}
    groups: list[Any] = []
    if state.optimizer is not None:
        for index, slots in state.optimizer["state"].items():
            for key, value in slots.items():
                tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).contiguous().cpu()
        groups = state.optimizer["param_groups"]
    meta = {"version": STATE_VERSION, "step": state.step, "losses": state.losses, "seconds": state.seconds,
            "settings": settings, "param_groups": groups, **extra}
    with atomic_directory(root / f"step-{state.step:08d}", overwrite=True) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for old in step_dirs(root)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def load_state(root: Path, settings: dict[str, Any]) -> tuple[HealState, dict[str, Any]]:
    """The newest state and its JSON fields; its settings must be this run's (a resumed run may only train
    longer)."""
    last = step_dirs(root)[-1]
    meta = json.loads((last / "state.json").read_text())
    if meta.get("version") != STATE_VERSION:
        raise FlapDeployError(f"{last}: heal state version {meta.get('version')}, this flap-deploy writes "
                              f"{STATE_VERSION}")
    differ = sorted(k for k in set(settings) | set(meta["settings"]) if settings.get(k) != meta["settings"].get(k))
    if differ:
        k = differ[0]
        raise ParameterError(k, f"is {settings.get(k)!r}; the heal state {root} was made with "
                                f"{meta['settings'].get(k)!r} (resume with the same settings)")
    tensors = load_file(str(last / "state.safetensors"))
    trainable = {k[len("trainable."):]: v for k, v in tensors.items() if k.startswith("trainable.")}
    optimizer = None
    if meta["param_groups"]:
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, index, key = k.split(".", 2)
                slots.setdefault(int(index), {})[key] = v
        optimizer = {"state": slots, "param_groups": meta["param_groups"]}
    state = HealState(step=meta["step"], losses=meta["losses"], seconds=meta["seconds"], trainable=trainable,
                      optimizer=optimizer)
    return state, meta
