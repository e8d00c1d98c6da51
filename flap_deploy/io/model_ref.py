"""A MODEL argument resolved once: where it is, what it is, and its config.

Commands and library entry points accept a bundled model name (``smollm2-135m``), a
directory, or a Hugging Face Hub id (``namespace/name``, at a ``revision``; fetched into
huggingface_hub's cache by ``flap_deploy.io.hub``). A directory wins over an id of the same
spelling. ``resolve_model`` turns the argument into a ``ModelRef`` at the boundary; everything
below takes the object, so no argument is resolved twice and no config.json is read twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from flap_deploy.errors import FlapDeployError, ParameterError

# The manifest beside an ONNX export's model.onnx (exporters.onnx.manifest writes and checks it).
ONNX_MANIFEST = "flap_onnx.json"


@dataclass(frozen=True)
class ModelRef:
    """``kind``: "dense" (a supported source family), "pruned" (a flap_llama checkpoint) or "onnx"
    (an ONNX export, ``config`` then is its manifest); ``bundled``: the argument named a bundled model;
    ``revision``: the commit of a Hub id's snapshot (None for anything else)."""

    arg: str
    path: Path
    kind: str
    config: dict[str, Any] = field(repr=False)
    bundled: bool = False
    revision: str | None = None

    def __str__(self) -> str:  # where a MODEL argument is shown, the argument as given
        return self.arg

    @property
    def name(self) -> str:
        """The model's short name: the bundled name or the Hub id, else the directory name."""
        return self.arg if self.bundled or self.revision else self.path.name

    @property
    def is_checkpoint(self) -> bool:
        return self.kind != "onnx"

    def load(self, dtype: Any = None) -> Any:
        """The transformers model (dense family or FlapLlama), in eval mode on the CPU."""
        from transformers import AutoModelForCausalLM

        from flap_deploy.model.registration import register_auto_classes

        register_auto_classes()

        return AutoModelForCausalLM.from_pretrained(_accepted(self, CHECKPOINTS).path, dtype=dtype or "auto").eval()

    def hf_config(self) -> Any:
        """The transformers config object; a config.json transformers refuses is a one-line error."""
        from transformers import AutoConfig

        from flap_deploy.model.registration import register_auto_classes

        register_auto_classes()

        try:
            return AutoConfig.from_pretrained(self.path)
        except Exception as e:  # strict field validation, unknown keys, bad values: all the user's file
            detail = " ".join(str(e).split())
            raise FlapDeployError(f"{self.path / 'config.json'}: {detail}") from None

    def tokenizer(self) -> Any:
        return _tokenizer_at(self.path)

    def decode_step_params(self) -> int:
        """Weights read per decode step (``params.decode_step_params``; an export states it in its manifest)."""
        from flap_deploy.model.params import decode_step_params

        if self.kind != "onnx":
            return decode_step_params(self.config)
        if "decode_step_params" in self.config:
            return int(self.config["decode_step_params"])
        # An export from before the manifest stated it: its source checkpoint, while unchanged.
        source = self.config.get("source") or {}
        config = Path(source.get("path", "")) / "config.json"
        if config.is_file() and hashlib.sha256(config.read_bytes()).hexdigest() == source.get("config_sha256"):
            return decode_step_params(json.loads(config.read_text()))
        raise FlapDeployError(f"{self.path}: the export does not state its size and its source checkpoint is gone; "
                              "re-export it or pass the checkpoint")


KINDS = ("dense", "pruned", "onnx")
CHECKPOINTS = ("dense", "pruned")


def is_hub_id(arg: str | os.PathLike) -> bool:
    """Whether a MODEL argument names a Hugging Face Hub model: spelled ``namespace/name``, and neither a
    bundled name nor an existing path (those win)."""
    from flap_deploy.io.bundled import BUNDLED
    from flap_deploy.io.hub import is_repo_id

    arg = str(arg)
    return arg not in BUNDLED and not Path(arg).exists() and is_repo_id(arg)


def resolve_model(model: str | os.PathLike | ModelRef, *, accept: tuple[str, ...] = KINDS,
                  check_weights: bool = True, revision: str | None = None) -> ModelRef:
    """Resolve a bundled name, a directory or a Hub id (at ``revision``) of a kind the caller ``accept``s,
    and check it: a pruned checkpoint against the whole contract (tensor headers included unless
    ``check_weights`` is false, e.g. for random-weight serving), a dense one for a supported family, an
    export for its manifest. A Hub model's config is checked before its weights are fetched."""
    if isinstance(model, ModelRef):
        return _accepted(model, accept)
    from flap_deploy.io.bundled import BUNDLED, materialize
    from flap_deploy.io.checkpoint import read_config

    arg = str(model)
    bundled = arg in BUNDLED
    hub = is_hub_id(arg)
    if hub:
        from flap_deploy.io.hub import fetch

        path = fetch(arg, revision, lambda config: _check_kind(_kind(config, arg), arg, accept))
    elif revision is not None:
        raise ParameterError("revision", f"applies to a Hugging Face Hub id (namespace/name); '{arg}' is not one")
    else:
        path = materialize(arg) if bundled else Path(arg)
    if not path.exists():
        raise FlapDeployError(f"model '{arg}' not found: no such directory, not a bundled model "
                              f"({', '.join(BUNDLED)}), and not a Hugging Face Hub id (namespace/name)")
    found = partial(ModelRef, arg, path, bundled=bundled, revision=path.name if hub else None)  # snapshots/<commit>
    manifest = path / ONNX_MANIFEST
    if manifest.is_file():
        try:
            return _accepted(found("onnx", json.loads(manifest.read_text())), accept)
        except json.JSONDecodeError as e:
            raise FlapDeployError(f"{manifest}: invalid JSON ({e})") from None
    if "onnx" in accept and path.is_dir() and not (path / "config.json").is_file():
        raise FlapDeployError(f"{path}: neither a model checkpoint (config.json) nor an ONNX export ({ONNX_MANIFEST})")
    config = read_config(path)
    kind = _kind(config, path / "config.json")
    if kind == "pruned":
        if check_weights and config.get("quantization_config"):
            from flap_deploy.io.quantized import validate_quantized_checkpoint

            validate_quantized_checkpoint(path)
        elif check_weights:
            from flap_deploy.io.checkpoint import validate_checkpoint

            validate_checkpoint(path)
        else:
            from flap_deploy.model.modeling_flap_llama import (
                FlapConfigError,
                validate_flap_config,
            )

            try:
                validate_flap_config(config)
            except FlapConfigError as e:
                raise FlapDeployError(f"{path / 'config.json'}: {e}") from None
        return _accepted(found("pruned", config), accept)
    if check_weights:  # a truncated or corrupt weight file: one line now, not a traceback after calibration
        from flap_deploy.io.checkpoint import checkpoint_tensors

        checkpoint_tensors(path)
    return _accepted(found("dense", config), accept)


def _kind(config: dict[str, Any], where: str | os.PathLike) -> str:
    """"pruned" (flap_llama) or "dense" (a supported family); anything else is an error naming ``where``."""
    if "per_layer_config" in config:
        raise FlapDeployError(f"{where}: transformers' per-layer form (per_layer_config, as `flap-deploy export hf` "
                              "writes it); flap-deploy runs the flap_llama checkpoint it was exported from "
                              "(FlapLlamaForCausalLM.from_pretrained loads this one)")
    if config.get("model_type") == "flap_llama":
        return "pruned"
    from flap_deploy.model.adapters import get_adapter

    get_adapter(config)
    return "dense"


def _accepted(ref: ModelRef, accept: tuple[str, ...]) -> ModelRef:
    _check_kind(ref.kind, ref.path, accept)
    return ref


def _check_kind(kind: str, where: str | os.PathLike, accept: tuple[str, ...]) -> None:
    if kind not in accept:
        if kind == "onnx":
            raise FlapDeployError(f"{where}: an ONNX export, not a checkpoint (pass the checkpoint it was "
                                  "exported from)")
        raise FlapDeployError(f"{where}: a {kind} checkpoint; expected {' or '.join(accept)}")


def load_model(model: str | os.PathLike | ModelRef, dtype: Any = None) -> Any:
    """``resolve_model(model).load(dtype)``."""
    return resolve_model(model, accept=CHECKPOINTS).load(dtype)


def load_tokenizer(model: str | os.PathLike | ModelRef) -> Any:
    """The tokenizer of a model, or of any directory with tokenizer files (no model needed)."""
    if isinstance(model, ModelRef):
        return model.tokenizer()
    from flap_deploy.io.bundled import BUNDLED, materialize

    return _tokenizer_at(materialize(str(model)) if str(model) in BUNDLED else Path(model))


def _tokenizer_at(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FlapDeployError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
