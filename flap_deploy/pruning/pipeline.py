"""FLAP pruning (and the Wanda-sp / magnitude-sp baselines) end to end, one decoder layer resident at a time.

``prune(model, config)``: validate → open the source as a ``LayerStream`` (tensor shapes and
alignment checked, nothing read yet) → state the memory plan → calibration windows → score
(pass 1, layer by layer: the method's scorer, ``methods.METHODS``) → allocate widths globally
(``allocation``) → the reconstruction's compensation (``methods.RECONSTRUCTIONS``) → slice and
write (pass 2, layer by layer, ``compress.compress_stream``) → provenance. The pruned checkpoint
is written straight into the output directory (atomically); the CLI only wraps this.
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

from flap_deploy.errors import FlapDeployError
from flap_deploy.model.layout import LayerMask
from flap_deploy.pruning.allocation import Alignment, allocate
from flap_deploy.pruning.calibration import SELF_BATCH, calibration_windows
from flap_deploy.pruning.compress import LayerMeans, compress_stream
from flap_deploy.pruning.config import PruneConfig
from flap_deploy.pruning.methods import (
    RECONSTRUCTIONS,
    SEARCHES,
    Calibration,
    Compensation,
    Scores,
)
from flap_deploy.pruning.reconstruct import LayerRefit, refit_nbytes
from flap_deploy.pruning.statistics import (
    LayerStats,
    Statistics,
    calibrate_layers,
    covariance_nbytes,
    full_covariances,
    held,
    statistics_nbytes,
)
from flap_deploy.pruning.stats import CovStats
from flap_deploy.streaming.layers import LayerStream
from flap_deploy.streaming.memory import (
    map_large_allocations,
    parse_size,
    peak_rss_bytes,
)
from flap_deploy.streaming.passes import progress_bar
from flap_deploy.streaming.plan import MemoryPlan, hold_layers, plan_memory


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
    search: Any = None  # the width search's ``SearchResult`` (every candidate it measured), when one ran
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
            from flap_deploy.io.model_ref import load_model

            self._model = load_model(self.path)
        return self._model

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> Path:
        """Move (or copy) the checkpoint to ``out``, atomically."""
        from flap_deploy.io.atomic import atomic_directory

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
    from flap_deploy.io.info import checkpoint_report, format_report, plot_widths

    rep = checkpoint_report(path)
    plot_widths(rep, path / "flap_widths.png")
    (path / "flap_report.txt").write_text(format_report(rep) + "\n")


def check_alignment(model_config: Any, config: PruneConfig, align: Alignment) -> None:
    """Raise FlapDeployError when no non-zero width of a layer satisfies the alignment."""
    from flap_deploy.model.adapters import get_adapter
    from flap_deploy.pruning.allocation import attention_menu, mlp_menu

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
    from flap_deploy.io.model_ref import resolve_model

    ref = resolve_model(model, accept=("dense",))
    if check is not None:
        check(ref.hf_config())
    return LayerStream.open(ref, device=config.device, dtype=config.dtype), ref.path


def collect_statistics(model: Any, config: PruneConfig, tokenizer: Any = None, covariance: bool = False,
                       windows: torch.Tensor | None = None, calibration: dict[str, Any] | None = None) -> Statistics:
    """FLAP's statistics pass alone (for reuse by several ``prune`` calls); ``covariance`` also keeps
    every layer's full input covariances. ``windows`` (with their ``calibration`` description)
    replace the configured calibration source."""
    stream, _ = open_source(model, config)
    if windows is None:
        plan = plan_prune(stream, config, calibrates=True)
        calib = _calibration(stream, config, tokenizer, plan)
        windows, calibration = calib.input_ids, calib.description
    layers: list[LayerStats] = []
    calibrate_layers(stream, windows, lambda i, stats: layers.append(held(stats)), batch_size=config.batch_size,
                     progress=config.progress, covariance=full_covariances(stream) if covariance else None)
    return Statistics(layers=layers, calibration=calibration or {}, windows=windows)


def plan_prune(stream: LayerStream, config: PruneConfig, calibrates: bool,
               statistics: Statistics | None = None) -> MemoryPlan:
    """The memory plan of a prune, checked against ``max_memory``: the streaming terms (``plan_memory``),
    the statistics, and where the ``ls`` refit's covariances come from.

    Kept from the statistics pass (``ls_statistics`` "kept"), every layer's full covariances are held to
    the end (n² float64 per module and layer) and no forward pass is added; from a second pass
    ("second pass"), the writing pass runs the calibration windows through the dense layers again with
    one layer's accumulators at a time (n x |k|, bounded by n x n before the allocation), so memory stays
    flat in depth. The second pass is the default: covariances are kept only when ``max_memory`` is given
    and the peak with them fits under it (a budget the run may spend to save a pass). Statistics passed
    in are resident already: the runtime counts them."""
    g = stream.geometry
    attn, mlp = g.num_heads * g.head_dim, g.intermediate_size
    second_pass = (config.reconstruction.covariances and statistics is not None
                   and statistics.covariances is None and statistics.windows is not None)
    windows = ((config.nsamples, config.seqlen) if calibrates
               else tuple(statistics.windows.shape) if second_pass else None)
    plan = plan_memory(stream, windows=windows, batch_size=config.batch_size,
                       generate=SELF_BATCH if calibrates and config.generates_calibration else 0,
                       offload_buffer=config.offload_buffer, max_memory=parse_size(config.max_memory, "max_memory"))
    plan = replace(plan, statistics_bytes=statistics_nbytes(stream))
    if config.reconstruction.covariances and (calibrates or statistics is not None):
        elt = torch.empty((), dtype=stream.dtype).element_size()
        rows = min(config.batch_size, windows[0] if windows else 0) * (windows[1] if windows else 0)

        def solve(gathered: bool) -> int:  # widths unknown before the allocation: bounded by the dense ones
            return max(refit_nbytes(g.hidden_size, n, n, elt, config.ridge, gathered) for n in (attn, mlp))

        update = max(CovStats.update_nbytes(n, n, rows, stream.dtype) for n in (attn, mlp))
        one_layer = CovStats.nbytes(attn, attn) + CovStats.nbytes(mlp, mlp)
        second = replace(plan, ls_statistics="second pass", accumulator_bytes=one_layer, update_bytes=update,
                         solve_bytes=solve(gathered=False))
        if statistics is not None:
            plan = second if second_pass else replace(plan, ls_statistics="kept", solve_bytes=solve(gathered=True))
        else:
            kept = replace(plan, ls_statistics="kept", covariance_bytes=covariance_nbytes(stream),
                           update_bytes=update, solve_bytes=solve(gathered=True),
                           accumulator_bytes=one_layer if plan.on_device else 0)  # on the host: the covariances
            fits = kept.host_peak_bytes <= kept.limit_bytes and kept.device_peak_bytes <= kept.device_free_bytes
            # a search refits every candidate from the held covariances: it keeps them whenever they fit
            wanted = plan.limit_given or SEARCHES[config.search].run is not None
            plan = replace(kept if wanted and fits else second, kept_need_bytes=kept.host_peak_bytes)
    return hold_layers(plan, g.num_layers).check()


def _calibration(stream: LayerStream, config: PruneConfig, tokenizer: Any, plan: MemoryPlan) -> Calibration:
    """The calibration windows (self-generated ones with the model's own forward, its layers paged
    through memory but for the ones the plan holds)."""
    if config.generates_calibration:  # only then are the weights (and the LM head) paged in
        with stream.paged(plan.held_bytes) as model:
            windows = calibration_windows(config.calib, model, tokenizer, config.nsamples, config.seqlen,
                                          config.seed, progress=config.progress)
    else:
        windows = calibration_windows(config.calib, None, tokenizer, config.nsamples, config.seqlen, config.seed,
                                      progress=config.progress)
    return Calibration(windows.input_ids, windows.describe(config.seed), config.batch_size,
                       "cpu" if plan.buffer_on_host else None, config.progress)


def _provenance(config: PruneConfig, align: Alignment, scores: Scores, stream: LayerStream,
                pruned_config: Any, compensation: Compensation, search: dict[str, Any] | None) -> dict[str, Any]:
    """The run's record; the achieved ratio from the weights the pruned checkpoint holds (the contract's shapes)."""
    from flap_deploy.model.config import as_flap_config
    from flap_deploy.model.params import count_params
    from flap_deploy.version import __version__

    dense = count_params(as_flap_config(stream.model.config.to_dict()))
    pruned = count_params(pruned_config.to_dict())
    return {
        **config.pruning_method.provenance(config),
        "attn_granularity": config.attn_granularity,
        "target_ratio": config.ratio,
        "achieved_ratio": 1 - pruned.decoder_linear / dense.decoder_linear,
        "bias_compensation": compensation.means is not None,
        "reconstruction": compensation.record,
        "search": search,
        "calibration": scores.calibration,
        "source_model": stream.name,
        "source_revision": stream.revision,
        "source_architecture": stream.adapter.architecture,
        "alignment": align.to_dict(),
        "package_version": __version__,
        "dense_params": dense.total,
        "pruned_params": pruned.total,
        "dense_linear_weights": dense.decoder_linear,
        "pruned_linear_weights": pruned.decoder_linear,
    }


def _say(config: PruneConfig, text: str) -> None:
    if config.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"flap-deploy: {text}", file=__import__("sys").stderr)


def _source_tokenizer(tokenizer: Any, source: Path | None) -> Any:
    if tokenizer is not None or source is None:
        return tokenizer
    from flap_deploy.io.model_ref import load_tokenizer

    try:
        return load_tokenizer(source)
    except FlapDeployError:
        return None


def _write(stream: LayerStream, config: PruneConfig, masks: list[LayerMask], means: list[LayerMeans] | None,
           refit: Callable | None, provenance: Callable[[Any], dict[str, Any]], target: Path, writing: Any,
           tokenizer: Any, source: Path | None) -> Any:
    """Pass 2: every layer sliced (and refitted) into ``target``'s shards, then config, tokenizer and report."""
    from flap_deploy.io.card import write_card
    from flap_deploy.io.checkpoint import finish_checkpoint

    with writing as tmp:
        bar = progress_bar(stream.geometry.num_layers, "write", config.progress)
        pruned_config = compress_stream(stream, masks, means, tmp, on_layer=lambda i: bar.update(), refit=refit)
        bar.close()
        pruned_config.flap = {**provenance(pruned_config), **pruned_config.flap}
        finish_checkpoint(tmp, pruned_config, tokenizer=tokenizer if source is None else None, tokenizer_from=source)
        write_report(tmp)
        write_card(tmp, pruned_config.to_dict(), source=source, path=target)
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
    from flap_deploy.io.atomic import atomic_directory, check_output_dir

    config = config or PruneConfig()
    config.validate()
    align = Alignment(config.mlp_multiple, config.tp_size)
    if out is not None:
        check_output_dir(out, overwrite)
    map_large_allocations()  # freed layers and batch products go back to the OS: the plan's terms hold
    stream, source = open_source(model, config, lambda cfg: check_alignment(cfg, config, align))
    tokenizer = _source_tokenizer(tokenizer, source)
    method = config.pruning_method
    calibrates = method.needs_calibration(statistics)
    plan = plan_prune(stream, config, calibrates, statistics)
    _say(config, f"plan: {plan.describe()}")
    search = SEARCHES[config.search]
    if search.run is not None:
        from flap_deploy.pruning.search import plan_search

        search_plan = plan_search(stream, config, plan, statistics)
        _say(config, search_plan.describe())

    t0 = time.perf_counter()
    calib = _calibration(stream, config, tokenizer, plan) if calibrates else None
    scores = method.scorer(stream, config, calib, statistics, align, plan)
    timings = {"calibrate_s": time.perf_counter() - t0}
    allocation = allocate(scores.attn, scores.mlp, stream.geometry, ratio=config.ratio,
                          structure=method.structure(config),
                          attn_ratio=config.effective_attn_ratio, granularity=config.attn_granularity, align=align)
    found = None
    if search.run is not None:
        t_search = time.perf_counter()
        found = search.run(stream, config, scores, calib, allocation, align, search_plan)
        allocation = found.allocation
        timings["search_s"] = time.perf_counter() - t_search
    compensation = config.reconstruction.build(stream, config, scores, calib, allocation.masks)
    means, refit = compensation.means, compensation.refit
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
                           lambda cfg: _provenance(config, align, scores, stream, cfg, compensation,
                                                   found.record if found is not None else None),
                           target, writing, tokenizer, source)
    timings.update(write_s=time.perf_counter() - t1, total_s=time.perf_counter() - t0)
    memory = {"plan": plan.to_dict(), "peak_rss_bytes": peak_rss_bytes()}
    if stream.device.type == "cuda":
        memory["peak_device_bytes"] = torch.cuda.max_memory_allocated(stream.device)
    result = PrunedModel(path=target, masks=allocation.masks, provenance=pruned_config.flap, means=means,
                         refits=refits or None, statistics=scores.statistics if method.reuses_statistics else statistics,
                         search=found, timings=timings, memory=memory)
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


__all__ = ["PruneConfig", "PrunedModel", "Statistics", "collect_statistics", "prune", "RECONSTRUCTIONS"]
