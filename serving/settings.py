"""What every server is started with: one settings object per backend, validated once, carried as JSON.

A backend's settings are a frozen dataclass whose fields are the parameters it accepts (the
CLI's flags are named after them, so a ``ParameterError`` on a field reaches the user as the
flag). ``python -m serving.onnx SETTINGS`` and ``python -m serving.vllm SETTINGS`` take the
JSON text (or a file holding it) of ``to_json``; the API key travels in the environment
(``FLAP_DEPLOY_API_KEY``), never on a command line, where any local user could read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from flap_deploy.errors import FlapDeployError, ParameterError

API_KEY_ENV = "FLAP_DEPLOY_API_KEY"

S = TypeVar("S", bound="ServerSettings")


def at_least(param: str, value: float | None, low: float, *, open_: bool = False) -> None:
    """ParameterError unless ``value`` is None or a number >= ``low`` (> ``low`` with ``open_``)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(param, f"must be a number, got {value!r}")
    if value <= low if open_ else value < low:
        raise ParameterError(param, f"must be {'greater than' if open_ else 'at least'} {low:g}, got {value}")


def arg_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` among pass-through arguments (``--flag=value`` or ``--flag value``; the last wins)."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            value = a.split("=", 1)[1]
        elif a == flag and i + 1 < len(args):
            value = args[i + 1]
    return value


def local_url(host: str, port: int) -> str:
    """Where a client on this machine reaches a server bound to ``host:port`` (a wildcard bind on loopback)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"


@dataclass(frozen=True)
class ServerSettings:
    """What every backend accepts: the model, where it listens, who may call it, its batch and context bounds."""

    model: str  # a checkpoint, a bundled name, or an export directory the backend serves
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # the id in /v1/models and requests [default: the model's name]
    max_num_seqs: int | None = None  # sequences decoded together at most [default: the backend's]
    max_model_len: int | None = None  # prompt + output tokens [default: the model's positions]

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", str(self.model))
        if not self.model:
            raise ParameterError("model", "is empty")
        if not self.host:
            raise ParameterError("host", "is empty")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ParameterError("port", f"must be between 1 and 65535, got {self.port!r}")
        at_least("max_num_seqs", self.max_num_seqs, 1)
        at_least("max_model_len", self.max_model_len, 2)

    @property
    def base_url(self) -> str:
        return local_url(self.host, self.port)

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls: type[S], text: str) -> S:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FlapDeployError(f"the server settings are not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise FlapDeployError("the server settings must be a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any]) -> S:
        """Settings from ``data``; a key that is no field of ``cls`` is refused by name."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ParameterError(unknown[0], f"is not a setting of {cls.__name__} (its settings: "
                                             f"{', '.join(sorted(fields))})")
        if "model" not in data:
            raise ParameterError("model", "is required")
        return cls(**data)

    # ------------------------------------------------------------------ a server process

    def process_args(self) -> tuple[str, dict[str, str]]:
        """The settings argument of ``python -m MODULE`` and the environment it needs (the key)."""
        env = {API_KEY_ENV: self.api_key} if self.api_key else {}
        return self.replace(api_key=None).to_json(), env


def run_entry_point(module: str, cls: type[S], serve: Callable[[S], int], argv: list[str] | None = None) -> int:
    """``python -m MODULE SETTINGS``: SETTINGS is the JSON of ``cls`` or a file holding it; the API key
    comes from $FLAP_DEPLOY_API_KEY. A user error is one line on stderr, exit 2."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        print(f"usage: python -m {module} SETTINGS\n"
              f"SETTINGS: a JSON object (or a file holding one) with the fields of {cls.__name__}: {fields}; "
              f"the API key may come from ${API_KEY_ENV}", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        settings = cls.from_json(args[0] if args[0].lstrip().startswith("{") else _read(args[0]))
        if settings.api_key is None and os.environ.get(API_KEY_ENV):
            settings = settings.replace(api_key=os.environ[API_KEY_ENV])
        return serve(settings)
    except FlapDeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise FlapDeployError(f"{path}: cannot read the server settings ({e.strerror or e})") from None
