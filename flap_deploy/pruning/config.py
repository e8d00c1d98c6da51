"""``PruneConfig``, its vocabularies and its one validator: no torch, so that a bad value is an error
before anything heavy is imported (the CLI builds its ``prune`` options from these fields)."""

from __future__ import annotations

from dataclasses import dataclass

from flap_deploy.errors import ParameterError
from flap_deploy.streaming.memory import parse_size

from .choices import (
    DTYPES,
    GRANULARITIES,
    MANUAL_MODULE_STRUCTURES,
    METRICS,
    STRUCTURES,
    parse_budget,
)
from .methods import METHODS, RECONSTRUCTIONS, SEARCHES, Method, Reconstruction


def choices() -> dict[str, tuple]:
    """Every field with a vocabulary, and its values (the tables' as they are now)."""
    return {"method": tuple(METHODS), "metric": METRICS, "structure": STRUCTURES, "attn_granularity": GRANULARITIES,
            "reconstruct": tuple(RECONSTRUCTIONS), "search": tuple(SEARCHES), "dtype": (None, *DTYPES)}


@dataclass
class PruneConfig:
    """Everything that decides a pruning run (recorded in the checkpoint's provenance), then how it runs.

    ratio: fraction of the decoder layers' linear weights (q/k/v/o, gate/up/down) to remove.
    method: a name of ``methods.METHODS`` (FLAP, or a baseline at the same budget).
    metric / structure: FLAP's importance metric and width structure (see ``importance``, ``allocation``).
    attn_ratio: fraction of attention weights removed by the manual-module structures UL-MM / AL-MM
        (default 0.75 x ratio, the authors' ablation setting of 384 of 1024 heads at 50 %).
    attn_granularity: ``group`` (a KV group is a unit) or ``head`` (query heads inside groups,
        equal group sizes within a layer).
    reconstruct: what replaces the removed inputs of o_proj / down_proj (FLAP only; the baselines
        are never compensated): ``none``; ``bias``, the paper's calibration-mean biases; ``ls``, the
        least-squares refit of the kept columns on the dense calibration inputs (their covariances
        accumulated while the pruned layers are written, or kept from the statistics pass when
        ``max_memory`` is given and has room for them: ``pipeline.plan_prune``; see ``reconstruct``).
    ridge: ``ls`` shrinkage toward the ``bias`` solution, in units of the mean variance of the kept
        channels (``inf`` gives ``bias``, 0 the plain refit).
    search: ``none`` keeps FLAP's allocation; ``evo`` searches per-layer widths from it (``search``).
    search_budget: candidate evaluations (``200``) or wall time (``10m``) the search may spend.
    search_windows: calibration windows most candidates are measured on; the best of each generation
        and the start are measured on four times as many (at most ``nsamples``).
    calib: ``self`` | ``hf:wikitext2`` | a text file or directory. nsamples x seqlen tokens, seed
        (the search's seed too).
    mlp_multiple / tp_size: alignment of every layer's widths (see ``allocation.Alignment``).
    batch_size: calibration windows per layer forward.
    device: ``auto`` (the first CUDA device, else the CPU), ``cpu``, ``cuda``, ``cuda:N``.
    dtype: compute dtype; default the checkpoint's on an accelerator, float32 on the CPU.
    max_memory: host memory the run may use (bytes or e.g. ``12GiB``; default what the machine has
        available); the plan's peak is checked against it before any layer runs and the run keeps
        under it. Given with room for them, it also keeps the ``ls`` covariances from the statistics
        pass (one forward fewer).
    offload_buffer: keep the calibration buffer in pinned host memory instead of on the device.
    """

    ratio: float = 0.2
    method: str = "flap"
    metric: str = "WIFV"
    structure: str = "AL-AM"
    attn_ratio: float | None = None
    attn_granularity: str = "group"
    reconstruct: str = "ls"
    ridge: float = 0.03
    search: str = "none"
    search_budget: str = "100"
    search_windows: int = 8
    calib: str = "self"
    nsamples: int = 1024
    seqlen: int = 128
    seed: int = 0
    mlp_multiple: int = 1
    tp_size: int = 1
    batch_size: int = 8
    device: str = "auto"
    dtype: str | None = None
    max_memory: int | str | None = None
    offload_buffer: bool = False
    progress: bool = True

    def validate(self) -> None:
        """One-line errors for values no run could use."""
        if not 0 <= self.ratio < 1:
            raise ParameterError("ratio", f"must be in [0, 1), got {self.ratio}")
        if self.attn_ratio is not None and not 0 <= self.attn_ratio < 1:
            raise ParameterError("attn_ratio", f"must be in [0, 1), got {self.attn_ratio}")
        for name, values in choices().items():
            if getattr(self, name) not in values:
                raise ParameterError(name, f"{getattr(self, name)!r} is not one of {', '.join(map(str, values))}")
        if not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise ParameterError("ridge", f"must be a number >= 0, got {self.ridge}")
        for name in ("nsamples", "seqlen", "mlp_multiple", "tp_size", "batch_size", "search_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParameterError(name, f"must be a positive integer, got {value}")
        if self.seqlen < 2:
            raise ParameterError("seqlen", f"must be at least 2, got {self.seqlen}")
        parse_size(self.max_memory, "max_memory")
        parse_budget(self.search_budget)
        if self.search != "none" and not self.pruning_method.searchable:
            raise ParameterError("search", f"starts from FLAP's allocation and statistics; method {self.method} has "
                                           "neither (use `method` flap)")
        if self.search != "none" and self.search_windows > self.nsamples:
            raise ParameterError("search_windows", f"{self.search_windows} is more than the {self.nsamples} "
                                                   "calibration windows (`nsamples`)")

    @property
    def pruning_method(self) -> Method:
        return METHODS[self.method]

    @property
    def effective_reconstruct(self) -> str:
        """The reconstruction the run applies: a method that does not compensate gets none."""
        return self.reconstruct if self.pruning_method.compensates else "none"

    @property
    def reconstruction(self) -> Reconstruction:
        return RECONSTRUCTIONS[self.effective_reconstruct]

    @property
    def generates_calibration(self) -> bool:
        """``calib self``: the model writes its own windows, so its weights and LM head must be resident."""
        return self.calib == "self"

    @property
    def effective_attn_ratio(self) -> float | None:
        if self.structure in MANUAL_MODULE_STRUCTURES:
            return self.attn_ratio if self.attn_ratio is not None else 0.75 * self.ratio
        return None
