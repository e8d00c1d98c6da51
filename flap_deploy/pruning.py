"""FLAP pruning (and the Wanda-sp / magnitude-sp baselines) end to end.

``prune(model, config)``: validate → load (alignment checked on the config first) → score (one
function per method: ``score_flap``, ``score_wanda_sp``, ``score_magnitude_sp``) → allocate widths
(``allocation``) → ``compress`` → provenance. It returns a ``PrunedModel``; the CLI only wraps it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .adapters import get_adapter
from .allocation import GRANULARITIES, STRUCTURES, Alignment, allocate
from .calibration import calibration_windows
from .compress import LayerMask, LayerMeans, compress
from .errors import FlapDeployError, ParameterError
from .layerwise import LayerStats, calibrate_layers
from .importance import METRICS, flap_scores, head_scores, magnitude_metric, wanda_metric
from .reconstruct import MODES as RECONSTRUCT_MODES
from .reconstruct import LayerRefit, refit_layers
from .stats import CovStats

METHODS = ("flap", "wanda-sp", "mag-sp")
BASELINE_METRICS = {"wanda-sp": "wanda", "mag-sp": "magnitude"}  # recorded as the metric of a baseline run


@dataclass
class PruneConfig:
    """Everything that decides a pruning run (and is recorded in the checkpoint's provenance).

    ratio: fraction of the decoder layers' linear weights (q/k/v/o, gate/up/down) to remove.
    method: ``flap`` or the baselines ``wanda-sp`` / ``mag-sp`` (uniform per layer, no compensation).
    metric / structure: FLAP's importance metric and width structure (see ``importance``, ``allocation``).
    attn_ratio: fraction of attention weights removed by the manual-module structures UL-MM / AL-MM
        (default 0.75 x ratio, the authors' ablation setting of 384 of 1024 heads at 50 %).
    attn_granularity: ``group`` (a KV group is a unit) or ``head`` (query heads inside groups,
        equal group sizes within a layer).
    reconstruct: what replaces the removed inputs of o_proj / down_proj (FLAP only; the baselines
        are never compensated): ``none``; ``bias``, the paper's calibration-mean biases; ``ls``, the
        least-squares refit of the kept columns on the dense calibration inputs (a second
        layer-by-layer pass after the allocation; see ``reconstruct``).
    ridge: ``ls`` shrinkage toward the ``bias`` solution, in units of the mean variance of the kept
        channels (``inf`` gives ``bias``, 0 the plain refit).
    calib: ``self`` | ``hf:wikitext2`` | a text file or directory. nsamples x seqlen tokens, seed.
    mlp_multiple / tp_size: alignment of every layer's widths (see ``allocation.Alignment``).
    batch_size: calibration windows per layer forward.
    """

    ratio: float = 0.2
    method: str = "flap"
    metric: str = "WIFV"
    structure: str = "AL-AM"
    attn_ratio: float | None = None
    attn_granularity: str = "group"
    reconstruct: str = "ls"
    ridge: float = 1.0
    calib: str = "self"
    nsamples: int = 1024
    seqlen: int = 128
    seed: int = 0
    mlp_multiple: int = 1
    tp_size: int = 1
    batch_size: int = 8
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
    """A pruned FlapLlamaForCausalLM with its masks, provenance and timings."""

    model: torch.nn.Module
    masks: list[LayerMask]
    provenance: dict[str, Any]
    means: list[LayerMeans] | None = None
    refits: list[LayerRefit] | None = None
    statistics: "Statistics | None" = None
    source: Path | None = None
    tokenizer: Any = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def achieved_ratio(self) -> float:
        return self.provenance["achieved_ratio"]

    def save(self, out: str | os.PathLike, overwrite: bool = False, report: bool = True) -> Path:
        """Write the contract checkpoint (atomically), then its per-layer widths report and plot."""
        from .checkpoint import save_checkpoint

        out = save_checkpoint(self.model, out, tokenizer_from=self.source,
                              tokenizer=self.tokenizer if self.source is None else None, overwrite=overwrite)
        if report:
            write_report(out)
        return out


def write_report(path: Path) -> None:
    """The per-layer report beside the weights (flap_report.txt and flap_widths.png)."""
    from .info import checkpoint_report, format_report, plot_widths

    rep = checkpoint_report(path)
    plot_widths(rep, path / "flap_widths.png")
    (path / "flap_report.txt").write_text(format_report(rep) + "\n")


def check_alignment(model_config: Any, config: PruneConfig, align: Alignment) -> None:
    """Raise FlapDeployError when no non-zero width of a layer satisfies the alignment."""
    from .allocation import attention_menu, mlp_menu

    geom = get_adapter(model_config).geometry(model_config)
    attention_menu(0, torch.zeros(geom.num_heads), geom, align, config.attn_granularity)
    mlp_menu(0, torch.zeros(geom.intermediate_size), geom, align)


def linear_weights(model: torch.nn.Module) -> int:
    """q/k/v/o and gate/up/down weights of the decoder layers."""
    return sum(p.numel() for name, p in model.named_parameters()
               if name.startswith("model.layers.") and name.endswith("_proj.weight"))


def _load(model: str | os.PathLike | torch.nn.Module, tokenizer: Any,
          check: Callable[[Any], None]) -> tuple[torch.nn.Module, Any, Path | None, str]:
    """(model, tokenizer, source directory or None, name); ``check(config)`` runs before any weight loads."""
    from .model_ref import resolve_model

    if isinstance(model, torch.nn.Module):
        check(model.config)
        name = getattr(model.config, "_name_or_path", "") or "<in-memory model>"
        path = Path(name) if name and Path(name).is_dir() else None
        loaded = model
    else:
        from transformers import AutoConfig

        ref = resolve_model(model, accept=("dense",))
        path, name = ref.path, ref.arg
        check(AutoConfig.from_pretrained(path))
        loaded = ref.load()
    if path is None:
        return loaded, tokenizer, None, name
    if tokenizer is None:
        try:
            tokenizer = resolve_model(path).tokenizer()
        except FlapDeployError:
            tokenizer = None
    return loaded, tokenizer, path, name


@dataclass
class Statistics:
    """FLAP's calibration statistics of every layer (metric-independent, so reusable across
    ratios, metrics, structures, alignments and reconstructions of the same model and calibration
    set), with the calibration windows (for the ``ls`` pass). With full covariances (``layers[i].
    attn_cov`` / ``mlp_cov``, from ``collect_statistics(covariance=True)``) the ``ls`` refit needs no
    second pass; they cost n² float64 per module and layer, for small models and studies."""

    layers: list[LayerStats]
    calibration: dict[str, Any]
    windows: torch.Tensor | None = None

    @property
    def covariances(self) -> list[tuple[CovStats, CovStats]] | None:
        if all(s.attn_cov is not None and s.mlp_cov is not None for s in self.layers):
            return [(s.attn_cov, s.mlp_cov) for s in self.layers]
        return None


def collect_statistics(model: torch.nn.Module, config: PruneConfig, tokenizer: Any = None,
                       covariance: bool = False, windows: torch.Tensor | None = None,
                       calibration: dict[str, Any] | None = None) -> Statistics:
    """Calibrate ``model`` layer by layer (dense outputs feed the next layer) and keep the statistics;
    ``covariance`` also keeps every layer's full input covariances. ``windows`` (with their
    ``calibration`` description) replace the configured calibration source."""
    if windows is None:
        calib = calibration_windows(config.calib, model, tokenizer, config.nsamples, config.seqlen, config.seed,
                                    progress=config.progress)
        windows, calibration = calib.input_ids, calib.describe(config.seed)
    layers: list[LayerStats] = []
    device = next(model.parameters()).device

    def full(i: int) -> tuple[CovStats, CovStats]:
        m = get_adapter(model.config).layer_modules(model, i)
        return CovStats(m.o_proj.in_features, device=device), CovStats(m.down_proj.in_features, device=device)

    calibrate_layers(model, windows, lambda i, stats: layers.append(stats), batch_size=config.batch_size,
                     progress=config.progress, covariance=full if covariance else None)
    return Statistics(layers=layers, calibration=calibration or {}, windows=windows)


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


def score_flap(model: torch.nn.Module, config: PruneConfig, tokenizer: Any,
               statistics: Statistics | None = None) -> Scores:
    """FLAP: the configured metric on dense-calibration statistics, standardized per layer and module."""
    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)
    if statistics is None:
        statistics = collect_statistics(model, config, tokenizer)
    elif len(statistics.layers) != geom.num_layers:
        raise FlapDeployError(f"statistics of {len(statistics.layers)} layers for a model of {geom.num_layers}")
    scores = Scores(attn=[], mlp=[], means=[], calibration=statistics.calibration, statistics=statistics)
    for i, stats in enumerate(statistics.layers):
        m = adapter.layer_modules(model, i)
        a, s = flap_scores(config.metric, m.o_proj.weight, stats.attn, m.down_proj.weight, stats.mlp, geom.head_dim)
        scores.attn.append(a)
        scores.mlp.append(s)
        scores.means.append(LayerMeans(attn=stats.attn.mean.cpu(), mlp=stats.mlp.mean.cpu()))
    return scores


def score_wanda_sp(model: torch.nn.Module, config: PruneConfig, tokenizer: Any, align: Alignment) -> Scores:
    """Wanda-sp: uniform per layer, each layer's widths decided during calibration so the next
    layer sees pruned outputs."""
    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)
    calib = calibration_windows(config.calib, model, tokenizer, config.nsamples, config.seqlen, config.seed,
                                progress=config.progress)
    scores = Scores(attn=[], mlp=[], calibration=calib.describe(config.seed))
    one_layer = replace(geom, num_layers=1)

    def on_layer(i: int, stats: LayerStats) -> LayerMask:
        m = adapter.layer_modules(model, i)
        a = head_scores(wanda_metric(m.o_proj.weight, stats.attn), geom.head_dim, "sum").cpu()
        s = wanda_metric(m.down_proj.weight, stats.mlp).cpu()
        scores.attn.append(a)
        scores.mlp.append(s)
        return allocate([a], [s], one_layer, ratio=config.ratio, structure="UL-UM",
                        granularity=config.attn_granularity, align=align).masks[0]

    calibrate_layers(model, calib.input_ids, on_layer, batch_size=config.batch_size, propagate_pruned=True,
                     progress=config.progress)
    return scores


def score_magnitude_sp(model: torch.nn.Module) -> Scores:
    """Magnitude-sp: weights only, no calibration."""
    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)
    scores = Scores(attn=[], mlp=[])
    for i in range(geom.num_layers):
        m = adapter.layer_modules(model, i)
        scores.attn.append(head_scores(magnitude_metric(m.o_proj.weight), geom.head_dim, "sum").cpu())
        scores.mlp.append(magnitude_metric(m.down_proj.weight).cpu())
    return scores


def _score(model: torch.nn.Module, config: PruneConfig, tokenizer: Any, statistics: Statistics | None,
           align: Alignment) -> Scores:
    if config.method == "flap":
        return score_flap(model, config, tokenizer, statistics)
    if config.method == "wanda-sp":
        return score_wanda_sp(model, config, tokenizer, align)
    return score_magnitude_sp(model)


def _provenance(config: PruneConfig, align: Alignment, scores: Scores, name: str, architecture: str,
                dense: torch.nn.Module, pruned: torch.nn.Module, reconstruction: dict[str, Any]) -> dict[str, Any]:
    """The run's record; the achieved ratio from the weights the pruned model really holds."""
    from . import __version__

    flap = config.method == "flap"
    dense_linear, pruned_linear = linear_weights(dense), linear_weights(pruned)
    return {
        "method": config.method,
        "metric": config.metric if flap else BASELINE_METRICS[config.method],
        "structure": config.structure if flap else "UL-UM",
        "attn_granularity": config.attn_granularity,
        "attn_ratio": config.effective_attn_ratio if flap else None,
        "target_ratio": config.ratio,
        "achieved_ratio": 1 - pruned_linear / dense_linear,
        "bias_compensation": scores.means is not None and config.effective_reconstruct == "bias",
        "reconstruction": reconstruction,
        "calibration": scores.calibration,
        "source_model": name,
        "source_architecture": architecture,
        "alignment": align.to_dict(),
        "package_version": __version__,
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "pruned_params": sum(p.numel() for p in pruned.parameters()),
        "dense_linear_weights": dense_linear,
        "pruned_linear_weights": pruned_linear,
    }


def _refit(model: torch.nn.Module, config: PruneConfig, tokenizer: Any, statistics: Statistics,
           masks: list[LayerMask]) -> tuple[list[LayerRefit], dict[str, Any]]:
    """The ``ls`` refits, and what statistics they used (for the provenance)."""
    used = {"covariance": "float64, dense calibration inputs of o_proj and down_proj",
            "calibration": statistics.calibration}
    if statistics.covariances is not None:
        used["pass"] = "first (full covariances kept with the statistics)"
        return refit_layers(model, statistics.windows, masks, config.ridge,
                            covariances=statistics.covariances), used
    windows = statistics.windows
    if windows is None:
        windows = calibration_windows(config.calib, model, tokenizer, config.nsamples, config.seqlen, config.seed,
                                      progress=config.progress).input_ids
    used["pass"] = "second (after the allocation, kept columns only)"
    return refit_layers(model, windows, masks, config.ridge, batch_size=config.batch_size,
                        progress=config.progress), used


@torch.no_grad()
def prune(model: str | os.PathLike | torch.nn.Module, config: PruneConfig | None = None,
          tokenizer: Any = None, statistics: Statistics | None = None) -> PrunedModel:
    """Prune a dense model (a loaded model, a checkpoint directory or a bundled name).

    validate → load → score → allocate → compress → provenance. ``statistics`` (from
    ``collect_statistics`` or an earlier ``PrunedModel.statistics`` of the same model) skips
    FLAP's calibration. The dense model is left untouched. Raises FlapDeployError for bad input
    before any work.
    """
    config = config or PruneConfig()
    config.validate()
    align = Alignment(config.mlp_multiple, config.tp_size)
    model, tokenizer, source, name = _load(model, tokenizer, lambda cfg: check_alignment(cfg, config, align))
    adapter = get_adapter(model.config)

    t0 = time.perf_counter()
    scores = _score(model, config, tokenizer, statistics, align)
    timings = {"calibrate_s": time.perf_counter() - t0}
    structure = config.structure if config.method == "flap" else "UL-UM"
    allocation = allocate(scores.attn, scores.mlp, adapter.geometry(model.config), ratio=config.ratio,
                          structure=structure, attn_ratio=config.effective_attn_ratio,
                          granularity=config.attn_granularity, align=align)
    mode = config.effective_reconstruct
    means = scores.means if mode == "bias" else None
    refits, reconstruction = None, {"mode": mode, "ridge": None, "statistics": None}
    if mode == "bias":
        reconstruction["statistics"] = {"means": "float64 calibration means of the o_proj / down_proj inputs",
                                        "calibration": scores.calibration}
    if mode == "ls":
        t1 = time.perf_counter()
        refits, reconstruction["statistics"] = _refit(model, config, tokenizer, scores.statistics, allocation.masks)
        reconstruction["ridge"] = config.ridge
        timings["reconstruct_s"] = time.perf_counter() - t1
    pruned = compress(model, allocation.masks, means, refits=refits)
    pruned.config.flap = {**_provenance(config, align, scores, name, adapter.architecture, model, pruned,
                                        reconstruction),
                          **pruned.config.flap}
    timings["total_s"] = time.perf_counter() - t0
    return PrunedModel(model=pruned, masks=allocation.masks, provenance=pruned.config.flap, means=means, refits=refits,
                       statistics=scores.statistics if config.method == "flap" else statistics, source=source,
                       tokenizer=tokenizer, timings=timings)


__all__ = ["PruneConfig", "PrunedModel", "Statistics", "collect_statistics", "prune", "METHODS", "RECONSTRUCT_MODES"]
