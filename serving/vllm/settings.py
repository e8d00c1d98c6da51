"""The vLLM launcher's settings: what `flap-deploy serve --backend vllm` and `python -m serving.vllm` start."""

from __future__ import annotations

from dataclasses import dataclass

from flap_deploy.errors import ParameterError
from serving.settings import ServerSettings, at_least

RANDOM_WEIGHTS_ARGS = ("--load-format", "dummy")  # vLLM makes up the weights: a checkpoint's config is enough


@dataclass(frozen=True)
class VllmServerSettings(ServerSettings):
    """``max_num_seqs`` / ``max_model_len`` left unset are vLLM's own defaults."""

    tp_size: int = 1  # tensor-parallel size; the checkpoint is checked against it before the engine starts
    pp_size: int = 1  # pipeline-parallel stages of whole layers (at most the number of layers)
    ready_timeout_s: float = 900.0  # how long the engine may take to answer /health
    extra_args: tuple[str, ...] = ()  # go to vLLM's OpenAI server unchanged, after the ones built from the above

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        if not all(isinstance(a, str) for a in self.extra_args):
            raise ParameterError("extra_args", f"must be strings, got {list(self.extra_args)!r}")
        for name in ("tp_size", "pp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(name, f"must be a positive integer, got {value!r}")
        at_least("ready_timeout_s", self.ready_timeout_s, 0, open_=True)
