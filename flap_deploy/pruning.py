"""FLAP pruning (and the Wanda-sp / magnitude-sp baselines) end to end, one decoder layer resident at a time.

``prune(model, config)``: validate → open the source as a ``LayerStream`` (tensor shapes and
alignment checked, nothing read yet) → state the memory plan → calibration windows → score
(pass 1, layer by layer: ``score_flap``, ``score_wanda_sp``, ``score_magnitude_sp``) →
allocate widths globally (``allocation``) → slice and write (pass 2, layer by layer,
``compress.compress_stream``) → provenance. The pruned checkpoint is written straight into
the output directory (atomically); the CLI only wraps this.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .allocation import GRANULARITIES, STRUCTURES, Alignment, allocate
from .calibration import calibration_windows
from .compress import LayerMask, LayerMeans, compress_stream
from .errors import FlapDeployError, ParameterError
from .importance import METRICS, flap_scores, head_scores, magnitude_metric, wanda_metric
from .layerwise import LayerPass, LayerStats, calibrate_layers, progress_bar
from .reconstruct import MODES as RECONSTRUCT_MODES
from .reconstruct import LayerRefit, kept_columns, refit_layer
from .stats import CovStats
from .memory import parse_size, peak_rss_bytes
from .streaming import GIB, LayerStream, MemoryPlan, plan_memory

METHODS = ("flap", "wanda-sp", "mag-sp")
BASELINE_METRICS = {"wanda-sp": "wanda", "mag-sp": "magnitude"}  # recorded as the metric of a baseline run

@dataclass
class PruneConfig:
    """Everything that decides a pruning run (recorded in the checkpoint's provenance), then how it runs.

    ratio: fraction of the decoder layers' linear weights (q/k/v/o, gate/up/down) to remove.
    method: ``flap`` or the baselines ``wanda-sp`` / ``mag-sp`` (uniform per layer, no compensation).
    metric / structure: FLAP's importance metric and width structure (see ``importance``, ``allocation``).
    attn_ratio: fraction of attention weights removed by the manual-module structures UL-MM / AL-MM
        (default 0.75 x ratio, the authors' ablation setting of 384 of 1024 heads at 50 %).
    attn_granularity: ``group`` (a KV group is a unit) or ``head`` (query heads inside groups,
        equal group sizes within a layer).
    reconstruct: what replaces the removed inputs of o_proj / down_proj (FLAP only; the baselines
        are never compensated): ``none``; ``bias``, the paper's calibration-mean biases; ``ls``, the
        least-squares refit of the kept columns on the dense calibration inputs (their covariances
        kept from the statistics pass when memory allows, else accumulated while the pruned layers
        are written: ``plan_covariances``; see ``reconstruct``).
    ridge: ``ls`` shrinkage toward the ``bias`` solution, in units of the mean variance of the kept
        channels (``inf`` gives ``bias``, 0 the plain refit).
    calib: ``self`` | ``hf:wikitext2`` | a text file or directory. nsamples x seqlen tokens, seed.
    mlp_multiple / tp_size: alignment of every layer's widths (see ``allocation.Alignment``).
    batch_size: calibration windows per layer forward.
    device: ``auto`` (the first CUDA device, else the CPU), ``cpu``, ``cuda``, ``cuda:N``.
    dtype: compute dtype; default the checkpoint's on an accelerator, float32 on the CPU.
    max_memory: host memory the run may use (bytes or e.g. ``12GiB``; default what the machine has
        available); the plan is checked against it before any layer runs.
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
        if self.method not in METHODS:
            raise FlapDeployError(f"unknown method '{self.method}'; choose from {', '.join(METHODS)}")
        if self.metric not in METRICS:
            raise FlapDeployError(f"unknown metric '{self.metric}'; choose from {', '.join(METRICS)}")
        if self.structure not in STRUCTURES:
            raise FlapDeployError(f"unknown structure '{self.structure}'; choose from {', '.join(STRUCTURES)}")
        if self.attn_granularity not in GRANULARITIES:
            raise FlapDeployError(
                f"unknown attention granularity '{self.attn_granularity}'; choose from {', '.join(GRANULARITIES)}")
        if self.reconstruct not in RECONSTRUCT_MODES:
            raise ParameterError("reconstruct", f"unknown mode '{self.reconstruct}'; choose from "
                                 f"{', '.join(RECONSTRUCT_MODES)}")
        if not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise ParameterError("ridge", f"must be a number >= 0, got {self.ridge}")
        for name in ("nsamples", "seqlen", "mlp_multiple", "tp_size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ParameterError(name, f"must be a positive integer, got {value}")
        if self.seqlen < 2:
            raise ParameterError("seqlen", f"must be at least 2, got {self.seqlen}")
        parse_size(self.max_memory, "max_memory")

    @property
    def effective_reconstruct(self) -> str:
        """The reconstruction the run applies: the baselines are never compensated."""
        return self.reconstruct if self.method == "flap" else "none"

    @property
    def effective_attn_ratio(self) -> float | None:
        if self.structure in ("UL-MM", "AL-MM"):
            return self.attn_ratio if self.attn_ratio is not None else 0.75 * self.ratio
        return None


@dataclass
class PrunedModel:
    """A pruned checkpoint on disk (``path``) with its masks, provenance, timings and memory figures.

    Without an output directory ``prune`` writes into a temporary one, removed with this
    object unless ``save`` moves it into place. ``model`` loads the checkpoint (once).
    """

    path: Path
    masks: list[LayerMask]
    provenance: dict[str, Any]
    means: list[LayerMeans] | None = None
    refits: list[LayerRefit] | None = None  # kept for an in-memory source only (they are weights)
    statistics: Statistics | None = None
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    _model: torch.nn.Module | None = field(default=None, repr=False)
    _cleanup: Any = field(default=None, repr=False)

    @property
    def achieved_ratio(self) -> float:
        return self.provenance["achieved_ratio"]

    @property
    def model(self) -> torch.nn.Module:
        """The pruned FlapLlamaForCausalLM, loaded from ``path`` on first use."""
        if self._model is None:
            from .model_ref import load_model

            self._model = load_model(self.path)
        return self._model

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> Path:
        """Move (or copy) the checkpoint to ``out``, atomically."""
        from .atomic import atomic_directory

        out = Path(out)
        if out.resolve() == self.path.resolve():
            return out
        with atomic_directory(out, overwrite) as tmp:
            for f in self.path.iterdir():
                (shutil.move if self._cleanup is not None else shutil.copy2)(f, tmp / f.name)
        if self._cleanup is not None:
            self._cleanup()
            self._cleanup = None
        self.path = out
        return out


def write_report(path: Path) -> None:
    """The per-layer report beside the weights (flap_report.txt and flap_widths.png)."""
    from .info import checkpoint_report, format_report, plot_widths

    rep = checkpoint_report(path)
    plot_widths(rep, path / "flap_widths.png")
    (path / "flap_report.txt").write_text(format_report(rep) + "\n")


def check_alignment(model_config: Any, config: PruneConfig, align: Alignment) -> None:
    """Raise FlapDeployError when no non-zero width of a layer satisfies the alignment."""
    from .adapters import get_adapter
    from .allocation import attention_menu, mlp_menu

    geom = get_adapter(model_config).geometry(model_config)
    attention_menu(0, torch.zeros(geom.num_heads), geom, align, config.attn_granularity)
    mlp_menu(0, torch.zeros(geom.intermediate_size), geom, align)


def linear_weights(model: torch.nn.Module) -> int:
    """q/k/v/o and gate/up/down weights of the decoder layers."""
    return sum(p.numel() for name, p in model.named_parameters()
               if name.startswith("model.layers.") and name.endswith("_proj.weight"))


def open_source(model: str | os.PathLike | torch.nn.Module, config: PruneConfig,
                check: Callable[[Any], None] | None = None) -> tuple[LayerStream, Path | None]:
    """The dense model as a ``LayerStream`` (nothing read but shard headers) and its directory, if any;
    ``check(model_config)`` runs before anything else is."""
    if isinstance(model, torch.nn.Module):
        if check is not None:
            check(model.config)
        name = getattr(model.config, "_name_or_path", "") or ""
        return LayerStream.open(model), (Path(name) if name and Path(name).is_dir() else None)
    from .model_ref import resolve_model

    ref = resolve_model(model, accept=("dense",))
    if check is not None:
        check(ref.hf_config())
    return LayerStream.open(ref, device=config.device, dtype=config.dtype), ref.path


@dataclass
class Statistics:
    """FLAP's calibration statistics of every layer (metric-independent, so reusable across
    ratios, metrics, structures, alignments and reconstructions of the same model and calibration
    set), with the calibration windows (for the ``ls`` pass). With full covariances (``layers[i].
    attn_cov`` / ``mlp_cov``: kept by ``prune`` when its plan has room, ``plan_covariances``, or by
    ``collect_statistics(covariance=True)``) the ``ls`` refit needs no second pass; they cost n²
    float64 per module and layer."""

    layers: list[LayerStats]
    calibration: dict[str, Any]
    windows: torch.Tensor | None = None

    @property
    def covariances(self) -> list[tuple[CovStats, CovStats]] | None:
        if all(s.attn_cov is not None and s.mlp_cov is not None for s in self.layers):
            return [(s.attn_cov, s.mlp_cov) for s in self.layers]
        return None


def collect_statistics(model: Any, config: PruneConfig, tokenizer: Any = None, covariance: bool = False,
                       windows: torch.Tensor | None = None, calibration: dict[str, Any] | None = None) -> Statistics:
    """FLAP's statistics pass alone (for reuse by several ``prune`` calls); ``covariance`` also keeps
    every layer's full input covariances. ``windows`` (with their ``calibration`` description)
    replace the configured calibration source."""
    stream, _ = open_source(model, config)
    if windows is None:
        plan = plan_memory(stream, config.nsamples * config.seqlen, offload_buffer=config.offload_buffer,
                           head=config.calib == "self", max_memory=parse_size(config.max_memory, "max_memory"))
        calib = _calibration(stream, config, tokenizer, plan)
        windows, calibration = calib.input_ids, calib.description
    layers: list[LayerStats] = []
    calibrate_layers(stream, windows, lambda i, stats: layers.append(_held(stats)), batch_size=config.batch_size,
                     progress=config.progress, covariance=full_covariances(stream) if covariance else None)
    return Statistics(layers=layers, calibration=calibration or {}, windows=windows)


def covariance_nbytes(stream: LayerStream) -> int:
    """Every layer's full float64 input covariances of o_proj and down_proj: what the ``ls`` refit
    holds until the allocation when its statistics come from the statistics pass."""
    g = stream.geometry
    return 8 * g.num_layers * ((g.num_heads * g.head_dim) ** 2 + g.intermediate_size ** 2)


def plan_covariances(stream: LayerStream, config: PruneConfig, plan: MemoryPlan) -> MemoryPlan:
    """Where the ``ls`` refit's statistics come from, as part of the memory plan.

    Full covariances kept from the statistics pass (``plan.covariance_bytes`` > 0) cost no forward
    pass; without them the writing pass runs the calibration windows through the dense layers a
    second time, accumulating each layer's covariance over its kept columns only (one layer's
    worth of memory). They are kept when they fit in half of the headroom the plan leaves under
    its limit (the other half for the solve and what the plan does not count), so ``max_memory``
    decides: a 135M model keeps its 0.6 GiB, a 70B's 530 GiB only where over a terabyte is free.
    """
    need = covariance_nbytes(stream)
    if config.effective_reconstruct != "ls" or need > (plan.limit_bytes - plan.host_peak_bytes) // 2:
        return plan
    return replace(plan, covariance_bytes=need, host_peak_bytes=plan.host_peak_bytes + need)


def full_covariances(stream: LayerStream) -> Callable[[int], tuple[CovStats, CovStats]]:
    """Layer i's (o_proj, down_proj) accumulators over every input column, for ``calibrate_layers``."""
    def full(i: int) -> tuple[CovStats, CovStats]:
        m = stream.adapter.layer_modules(stream.model, i)
        return (CovStats(m.o_proj.in_features, device=stream.device),
                CovStats(m.down_proj.in_features, device=stream.device))

    return full


def _held(stats: LayerStats) -> LayerStats:
    """A layer's statistics as they are kept until the allocation: covariances on the host (the device
    holds one layer's accumulators at a time)."""
    for cov in (stats.attn_cov, stats.mlp_cov):
        if cov is not None:
            cov.to("cpu")
    return stats


@dataclass
class Scores:
    """What a method's scoring hands to the allocation: one score per query head (``attn``) and per
    MLP channel (``mlp``) of every layer, the calibration means for bias compensation (FLAP only),
    the calibration's description and FLAP's reusable statistics."""

    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    means: list[LayerMeans] | None = None
    calibration: dict[str, Any] | None = None
    statistics: Statistics | None = None


@dataclass
class Calibration:
    """The windows of a run and how to run layers over them (shared by the methods that calibrate)."""

    input_ids: torch.Tensor
    description: dict[str, Any]
    batch_size: int
    buffer_device: str | None
    progress: bool


def _flap_layer(stream: LayerStream, i: int, stats: LayerStats, metric: str, scores: Scores) -> None:
    m = stream.adapter.layer_modules(stream.model, i)
    a, s = flap_scores(metric, m.o_proj.weight, stats.attn, m.down_proj.weight, stats.mlp, stream.geometry.head_dim)
    scores.attn.append(a)
    scores.mlp.append(s)
    scores.means.append(LayerMeans(attn=stats.attn.mean.cpu(), mlp=stats.mlp.mean.cpu()))


def score_flap(stream: LayerStream, config: PruneConfig, calib: Calibration | None,
               statistics: Statistics | None = None, covariance: bool = False) -> Scores:
    """FLAP: the configured metric on dense-calibration statistics, standardized per layer and module.
    With ``statistics`` from an earlier run, only o_proj / down_proj weights are read, layer by layer.
    ``covariance`` keeps every layer's full input covariances with the statistics (``plan_covariances``)."""
    geom = stream.geometry
    if statistics is not None:
        if len(statistics.layers) != geom.num_layers:
            raise FlapDeployError(f"statistics of {len(statistics.layers)} layers for a model of {geom.num_layers}")
        scores = Scores(attn=[], mlp=[], means=[], calibration=statistics.calibration, statistics=statistics)
        for i, stats in enumerate(statistics.layers):
            with stream.layer(i):
                _flap_layer(stream, i, stats, config.metric, scores)
        return scores
    kept: list[LayerStats] = []
    scores = Scores(attn=[], mlp=[], means=[], calibration=calib.description,
                    statistics=Statistics(kept, calib.description, windows=calib.input_ids))

    def on_layer(i: int, stats: LayerStats) -> None:
        _flap_layer(stream, i, stats, config.metric, scores)
        kept.append(_held(stats))

    calibrate_layers(stream, calib.input_ids, on_layer, batch_size=calib.batch_size,
                     buffer_device=calib.buffer_device, progress=calib.progress,
                     covariance=full_covariances(stream) if covariance else None)
    return scores


def score_wanda_sp(stream: LayerStream, config: PruneConfig, calib: Calibration, align: Alignment) -> Scores:
    """Wanda-sp: uniform per layer, each layer's widths decided during calibration so the next
    layer sees pruned outputs."""
    geom = stream.geometry
    scores = Scores(attn=[], mlp=[], calibration=calib.description)
    one_layer = replace(geom, num_layers=1)

    def on_layer(i: int, stats: LayerStats) -> LayerMask:
        m = stream.adapter.layer_modules(stream.model, i)
        a = head_scores(wanda_metric(m.o_proj.weight, stats.attn), geom.head_dim, "sum").cpu()
        s = wanda_metric(m.down_proj.weight, stats.mlp).cpu()
        scores.attn.append(a)
        scores.mlp.append(s)
        return allocate([a], [s], one_layer, ratio=config.ratio, structure="UL-UM",
                        granularity=config.attn_granularity, align=align).masks[0]

    calibrate_layers(stream, calib.input_ids, on_layer, batch_size=calib.batch_size, propagate_pruned=True,
                     buffer_device=calib.buffer_device, progress=calib.progress)
    return scores


def score_magnitude_sp(stream: LayerStream, progress: bool = False) -> Scores:
    """Magnitude-sp: weights only, no calibration."""
    geom = stream.geometry
    scores = Scores(attn=[], mlp=[])
    bar = progress_bar(geom.num_layers, "score", progress)
    for i in range(geom.num_layers):
        with stream.layer(i):
            m = stream.adapter.layer_modules(stream.model, i)
            scores.attn.append(head_scores(magnitude_metric(m.o_proj.weight), geom.head_dim, "sum").cpu())
            scores.mlp.append(magnitude_metric(m.down_proj.weight).cpu())
        bar.update()
    bar.close()
    return scores


def _calibration(stream: LayerStream, config: PruneConfig, tokenizer: Any, plan: MemoryPlan) -> Calibration:
    """The calibration windows (self-generated ones with the model's own forward, its layers paged
    through the memory the plan leaves free)."""
    if stream.device.type == "cuda":  # resident layers then live on the device
        budget = max(torch.cuda.mem_get_info(stream.device)[0] - plan.device_peak_bytes, 0)
    else:
        budget = max(plan.limit_bytes - plan.host_peak_bytes, 0)
    with stream.paged(budget) as model:
        windows = calibration_windows(config.calib, model, tokenizer, config.nsamples, config.seqlen, config.seed,
                                      progress=config.progress)
    return Calibration(windows.input_ids, windows.describe(config.seed), config.batch_size,
                       "cpu" if plan.buffer_on_host else None, config.progress)


def _provenance(config: PruneConfig, align: Alignment, scores: Scores, stream: LayerStream,
                pruned_config: Any, reconstruction: dict[str, Any]) -> dict[str, Any]:
    """The run's record; the achieved ratio from the weights the pruned checkpoint holds (the contract's shapes)."""
    from . import __version__
    from .params import as_flap_config, count_params

    flap = config.method == "flap"
    dense = count_params(as_flap_config(stream.model.config.to_dict()))
    pruned = count_params(pruned_config.to_dict())
    return {
        "method": config.method,
        "metric": config.metric if flap else BASELINE_METRICS[config.method],
        "structure": config.structure if flap else "UL-UM",
        "attn_granularity": config.attn_granularity,
        "attn_ratio": config.effective_attn_ratio if flap else None,
        "target_ratio": config.ratio,
        "achieved_ratio": 1 - pruned.decoder_linear / dense.decoder_linear,
        "bias_compensation": scores.means is not None and config.effective_reconstruct == "bias",
        "reconstruction": reconstruction,
        "calibration": scores.calibration,
        "source_model": stream.name,
        "source_architecture": stream.adapter.architecture,
        "alignment": align.to_dict(),
        "package_version": __version__,
        "dense_params": dense.total,
        "pruned_params": pruned.total,
        "dense_linear_weights": dense.decoder_linear,
        "pruned_linear_weights": pruned.decoder_linear,
    }


def _reconstruction(stream: LayerStream, config: PruneConfig, scores: Scores, calib: Calibration | None,
                    masks: list[LayerMask]) -> tuple[list[LayerMeans] | None, Callable | None, dict[str, Any]]:
    """(means for ``bias``, the per-layer refit for ``ls``, the provenance record) of the run's mode.

    The ``ls`` refit needs each layer's dense-input covariance over the columns the allocation
    keeps: taken from full first-pass covariances when the statistics hold them, else accumulated
    in the writing pass itself (the calibration windows run through the dense layers again, one
    resident at a time, each layer refitted before it is sliced), so memory stays one layer's.
    """
    mode = config.effective_reconstruct
    record: dict[str, Any] = {"mode": mode, "ridge": None, "statistics": None}
    if mode == "bias":
        record["statistics"] = {"means": "float64 calibration means of the o_proj / down_proj inputs",
                                "calibration": scores.calibration}
        return scores.means, None, record
    if mode == "none":
        return None, None, record
    stats = scores.statistics
    record["ridge"] = config.ridge
    record["statistics"] = {"covariance": "float64, dense calibration inputs of o_proj and down_proj",
                            "calibration": stats.calibration}
    head_dim = stream.geometry.head_dim
    covariances = stats.covariances
    if covariances is not None:
        record["statistics"]["pass"] = "first (full covariances kept with the statistics)"

        def refit(i: int, m: Any) -> LayerRefit:
            return refit_layer(m.o_proj, m.down_proj, *covariances[i], masks[i], head_dim, config.ridge)

        return None, refit, record
    windows = stats.windows if stats.windows is not None else calib.input_ids
    record["statistics"]["pass"] = "second (while writing, kept columns only)"
    lp = LayerPass(stream, windows, batch_size=config.batch_size,
                   buffer_device=calib.buffer_device if calib is not None else None)

    def refit(i: int, m: Any) -> LayerRefit:
        kept_attn, kept_mlp = kept_columns(masks[i], head_dim, m.o_proj.in_features, m.down_proj.in_features)
        attn, mlp = (CovStats(m.o_proj.in_features, kept_attn, stream.device),
                     CovStats(m.down_proj.in_features, kept_mlp, stream.device))
        hooks = [m.o_proj.register_forward_pre_hook(lambda mod, args: attn.update(args[0])),
                 m.down_proj.register_forward_pre_hook(lambda mod, args: mlp.update(args[0]))]
        try:
            lp.run(stream.layers[i])  # dense outputs feed the next layer, as in the statistics pass
        finally:
            for h in hooks:
                h.remove()
        return refit_layer(m.o_proj, m.down_proj, attn, mlp, masks[i], head_dim, config.ridge)

    return None, refit, record


def _say(config: PruneConfig, text: str) -> None:
    if config.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"flap-deploy: {text}", file=__import__("sys").stderr)


def _score(stream: LayerStream, config: PruneConfig, calib: Calibration | None, statistics: Statistics | None,
           align: Alignment, plan: MemoryPlan) -> Scores:
    if config.method == "flap":
        return score_flap(stream, config, calib, statistics, covariance=plan.covariance_bytes > 0)
    if config.method == "wanda-sp":
        return score_wanda_sp(stream, config, calib, align)
    return score_magnitude_sp(stream, config.progress)


def _source_tokenizer(tokenizer: Any, source: Path | None) -> Any:
    if tokenizer is not None or source is None:
        return tokenizer
    from .model_ref import load_tokenizer

    try:
        return load_tokenizer(source)
    except FlapDeployError:
        return None


def _write(stream: LayerStream, config: PruneConfig, masks: list[LayerMask], means: list[LayerMeans] | None,
           refit: Callable | None, provenance: Callable[[Any], dict[str, Any]], target: Path, writing: Any,
           tokenizer: Any, source: Path | None) -> Any:
    """Pass 2: every layer sliced (and refitted) into ``target``'s shards, then config, tokenizer and report."""
    from .checkpoint import finish_checkpoint

    with writing as tmp:
        bar = progress_bar(stream.geometry.num_layers, "write", config.progress)
        pruned_config = compress_stream(stream, masks, means, tmp, on_layer=lambda i: bar.update(), refit=refit)
        bar.close()
        pruned_config.flap = {**provenance(pruned_config), **pruned_config.flap}
        finish_checkpoint(tmp, pruned_config, tokenizer=tokenizer if source is None else None, tokenizer_from=source)
        write_report(tmp)
    return pruned_config


@torch.no_grad()
def prune(model: str | os.PathLike | torch.nn.Module, config: PruneConfig | None = None,
          tokenizer: Any = None, statistics: Statistics | None = None, *,
          out: str | os.PathLike | None = None, overwrite: bool = False) -> PrunedModel:
    """Prune a dense model (a checkpoint directory, a bundled name, or a loaded model) into ``out``.

    Without ``out`` the checkpoint goes to a temporary directory (``PrunedModel.save`` moves it).
    ``statistics`` (an earlier ``PrunedModel.statistics`` of the same model and calibration)
    skips FLAP's calibration. The dense model is left untouched. Bad input raises before any
    layer runs: parameters, the output path, the source's tensors, alignment, the memory plan.
    """
    from .atomic import atomic_directory, check_output_dir

    config = config or PruneConfig()
    config.validate()
    align = Alignment(config.mlp_multiple, config.tp_size)
    if out is not None:
        check_output_dir(out, overwrite)
    stream, source = open_source(model, config, lambda cfg: check_alignment(cfg, config, align))
    tokenizer = _source_tokenizer(tokenizer, source)
    calibrates = config.method == "wanda-sp" or (config.method == "flap" and statistics is None)
    plan = plan_memory(stream, config.nsamples * config.seqlen if calibrates else 0,
                       offload_buffer=config.offload_buffer, head=config.calib == "self",
                       max_memory=parse_size(config.max_memory, "max_memory"))
    if calibrates and config.method == "flap":
        plan = plan_covariances(stream, config, plan)
    _say(config, f"plan: {plan.describe()}")

    t0 = time.perf_counter()
    calib = _calibration(stream, config, tokenizer, plan) if calibrates else None
    scores = _score(stream, config, calib, statistics, align, plan)
    timings = {"calibrate_s": time.perf_counter() - t0}
    allocation = allocate(scores.attn, scores.mlp, stream.geometry, ratio=config.ratio,
                          structure=config.structure if config.method == "flap" else "UL-UM",
                          attn_ratio=config.effective_attn_ratio, granularity=config.attn_granularity, align=align)
    means, refit, reconstruction = _reconstruction(stream, config, scores, calib, allocation.masks)
    refits: list[LayerRefit] = []
    if refit is not None and not stream.streamed:  # small in-memory models keep them for inspection
        keep_refit = refit

        def refit(i: int, m: Any) -> LayerRefit:
            refits.append(keep_refit(i, m))
            return refits[-1]

    t1 = time.perf_counter()
    target = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="flap-pruned-"))
    writing = atomic_directory(out, overwrite) if out is not None else _plain_directory(target)
    pruned_config = _write(stream, config, allocation.masks, means, refit,
                           lambda cfg: _provenance(config, align, scores, stream, cfg, reconstruction),
                           target, writing, tokenizer, source)
    timings.update(write_s=time.perf_counter() - t1, total_s=time.perf_counter() - t0)
    memory = {"plan": plan.to_dict(), "peak_rss_bytes": peak_rss_bytes()}
    if stream.device.type == "cuda":
        memory["peak_device_bytes"] = torch.cuda.max_memory_allocated(stream.device)
    result = PrunedModel(path=target, masks=allocation.masks, provenance=pruned_config.flap, means=means,
                         refits=refits or None, statistics=scores.statistics if config.method == "flap" else statistics,
                         timings=timings, memory=memory)
    if out is None:
        result._cleanup = weakref.finalize(result, shutil.rmtree, target, True)
    return result


class _plain_directory:
    """An existing directory used as it is (the temporary target of ``prune`` without ``out``)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            shutil.rmtree(self.path, ignore_errors=True)


__all__ = ["PruneConfig", "PrunedModel", "Statistics", "collect_statistics", "prune", "METHODS", "RECONSTRUCT_MODES"]
