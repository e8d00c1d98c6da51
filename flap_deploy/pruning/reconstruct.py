"""Reconstruction of o_proj / down_proj after their input channels were pruned.

Modes (``PruneConfig.reconstruct``):

* ``none``: the kept columns of W as they are, the bias as it is.
* ``bias``: FLAP's compensation: each removed channel is replaced by its calibration mean,
  ``b' = b + W[:, r] mu[r]`` (``compress`` applies it from the means).
* ``ls``: the least-squares refit of the kept columns on the dense calibration inputs, ridge
  shrinking toward the ``bias`` solution (k kept input channels, r removed, Sigma and mu the
  covariance and mean of the dense inputs)::

      W' = W[:, k] + W[:, r] Sigma[r, k] (Sigma[k, k] + lam I)^-1
      b' = b + W mu - W' mu[k]
      lam = ridge * mean(diag Sigma[k, k])

  ``W' x_k + b'`` is the best affine prediction of the dense output ``W x + b`` from the kept
  inputs; ``ridge`` -> infinity gives back ``bias`` exactly, ``ridge = 0`` the plain refit.

Statistics: ``stats.CovStats`` streams the covariance in float64, merging batches with Chan et
al.'s update. By default the writing pass accumulates each layer's against its kept columns only
(where ``max_memory`` is given with room for them, ``pipeline.plan_prune``, every layer's full
covariance is kept from the statistics pass instead), so Sigma[all, k] (n x |k|) is all that is ever held: for Llama-70B's
MLP (n = 28,672) and 80 % kept channels that is 28,672 x 22,938 x 8 B = 5.3 GB for one layer at a
time (attention: 8,192 x |k| x 8 B <= 0.5 GB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from flap_deploy.errors import FlapDeployError
from flap_deploy.pruning.stats import BLOCKS, CovStats, block_slices


@dataclass
class Refit:
    """The new o_proj or down_proj of one layer: ``weight`` [out, len(kept)] on the ``kept`` input
    channels (ascending), in the dtype of the original weight (it is fitted in float64), and
    ``bias`` [out] in float64 (as ``compress`` builds every compensation bias)."""

    kept: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass
class LayerRefit:
    """A layer's refitted o_proj (``attn``) and down_proj (``mlp``); None leaves that module to
    the mean compensation."""

    attn: Refit | None = None
    mlp: Refit | None = None


@torch.no_grad()
def refit_linear(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, stats: CovStats,
                 ridge: float) -> Refit:
    """The ``ls`` refit of one linear layer on its kept input columns (see the module docstring), where its
    statistics live (host or device), within ``refit_nbytes``.

    The system ``[Sigma[k, k]; Sigma[r, k]]`` (``CovStats.system``: a second-pass accumulator's own
    co-moment, consumed) is factorized in place (Cholesky of the kept block + lam I). The output rows are
    independent, so W' is solved one row block at a time: the block's right-hand side ``W[b, r] Sigma[r, k]``
    in float64, two triangular solves in place, ``W[b, k]`` added, its bias taken, and cast into W' in the
    weight's dtype; no float64 copy of the whole weight or of W' is made. ``ridge = 0`` factorizes a copy,
    so that a singular kept block can fall back to the minimum-norm solution."""
    dev = stats.mean.device
    kept = torch.as_tensor(kept, dtype=torch.long).flatten().to(dev)
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=dev)
    removed[kept] = False
    removed = removed.nonzero().flatten()
    w, mu, n_kept = weight.detach(), stats.mean, kept.numel()
    kept_w, removed_w = kept.to(w.device), removed.to(w.device)
    system = factor = pinv = None
    if n_kept and removed.numel() and math.isfinite(ridge):
        system = stats.system(kept)  # [n, |k|] co-moment sums: kept rows, then removed rows
        lhs = system[:n_kept]  # the count cancels: it scales both sides
        scale = float(lhs.diagonal().mean())
        lhs.diagonal().add_(ridge * scale)
        if scale == 0:  # constant inputs: nothing to predict from, the right-hand side is zero too
            system = None
        elif ridge == 0:  # the plain refit: its kept block may be singular, so factorize a copy
            factor = _cholesky(lhs.clone())
            if factor is None:
                pinv = torch.linalg.pinv(lhs, hermitian=True)  # the minimum-norm solution
        else:
            factor = _cholesky(lhs)
            if factor is None:
                raise FlapDeployError(f"the ls refit's system ({n_kept} kept input channels) is not positive "
                                      f"definite at ridge {ridge:g}; use a larger `ridge`")
    new_w = torch.empty(w.shape[0], n_kept, dtype=weight.dtype, device=dev)
    new_b = (bias.detach().to(dev, torch.float64) if bias is not None
             else torch.zeros(w.shape[0], dtype=torch.float64, device=dev))
    for b in block_slices(w.shape[0]):
        block = w[b][:, kept_w].to(dev, torch.float64)
        if system is not None:
            rhs = w[b][:, removed_w].to(dev, torch.float64) @ system[n_kept:]
            if factor is not None:
                torch.linalg.solve_triangular(factor.mT, rhs, upper=True, left=False, out=rhs)
                torch.linalg.solve_triangular(factor, rhs, upper=False, left=False, out=rhs)
            else:
                rhs = rhs @ pinv
            block += rhs
            del rhs
        new_b[b] += w[b].to(dev, torch.float64) @ mu - block @ mu[kept]
        new_w[b] = block
    return Refit(kept=kept.cpu(), weight=new_w, bias=new_b)


def refit_nbytes(out: int, channels: int, kept: int, elt: int, ridge: float, gathered: bool) -> int:
    """The most ``refit_linear`` holds beyond its statistics, for a weight [out, channels] of ``elt``-byte
    elements refitted on ``kept`` columns: W' in the weight's dtype; one row block's float64 right-hand side
    and W'[b], and the weight's row block gathered and cast; ``gathered``: the system copied out of full
    covariances, and one row block of that gather; ``ridge == 0``: the factorized copy and the minimum-norm
    fallback (an eigendecomposition, its workspace and the pseudo-inverse)."""
    step = -(-out // BLOCKS)
    total = out * kept * elt + 2 * step * kept * 8 + step * channels * (elt + 8)
    if gathered:
        total += 8 * channels * kept + 8 * -(-channels // BLOCKS) * kept
    if ridge == 0:
        total += 5 * 8 * kept * kept
    return total


def _cholesky(lhs: torch.Tensor) -> torch.Tensor | None:
    """The lower Cholesky factor of a symmetric positive definite ``lhs``, written over it (on its
    column-major view, which LAPACK factorizes without a copy); None when ``lhs`` is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(lhs.mT, out=(lhs.mT, torch.empty((), dtype=torch.int32,
                                                                                device=lhs.device)))
    return factor if int(info) == 0 else None


def kept_columns(mask, head_dim: int, attn_in: int, mlp_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj, down_proj) input columns a layer's ``LayerMask`` keeps, ascending (None keeps all)."""
    attn = (torch.arange(attn_in) if mask.heads is None
            else mask.heads.bool().cpu().repeat_interleave(head_dim).nonzero().flatten())
    mlp = torch.arange(mlp_in) if mask.mlp is None else mask.mlp.bool().cpu().nonzero().flatten()
    return attn, mlp


def refit_layer(o_proj: torch.nn.Module, down_proj: torch.nn.Module, attn: CovStats | None, mlp: CovStats | None,
                mask, head_dim: int, ridge: float) -> LayerRefit:
    """The ``ls`` refit of one layer from its dense-input covariances (a module without statistics is
    left to the mean compensation)."""
    kept_attn, kept_mlp = kept_columns(mask, head_dim, o_proj.in_features, down_proj.in_features)
    return LayerRefit(
        attn=refit_linear(o_proj.weight, o_proj.bias, kept_attn, attn, ridge) if attn is not None else None,
        mlp=refit_linear(down_proj.weight, down_proj.bias, kept_mlp, mlp, ridge) if mlp is not None else None,
    )


@torch.no_grad()
def refit_layers(model: torch.nn.Module, input_ids: torch.Tensor, masks: list, ridge: float, *,
                 modules: tuple[str, ...] = ("attn", "mlp"), batch_size: int = 8, progress: bool = True,
                 covariances: list[tuple[CovStats | None, CovStats | None]] | None = None) -> list[LayerRefit]:
    """The ``ls`` refit of every layer: a second layer-by-layer pass over the calibration windows
    (each layer fed the dense outputs of the previous one, as FLAP's statistics pass), after the
    global allocation, accumulating each layer's covariance over its kept columns only and refitting
    it before the next layer's. ``covariances`` (full-column accumulators from a first pass, e.g.
    ``collect_statistics(covariance=True)``) skips the pass. ``modules`` selects o_proj (``attn``)
    and/or down_proj (``mlp``); the other is left to the mean compensation."""
    from flap_deploy.model.adapters import get_adapter
    from flap_deploy.pruning.statistics import calibrate_layers

    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)

    def refit(i: int, attn: CovStats | None, mlp: CovStats | None) -> LayerRefit:
        m = adapter.layer_modules(model, i)
        return refit_layer(m.o_proj, m.down_proj, attn if "attn" in modules else None,
                           mlp if "mlp" in modules else None, masks[i], geom.head_dim, ridge)

    if covariances is not None:
        return [refit(i, a, b) for i, (a, b) in enumerate(covariances)]
    device = next(model.parameters()).device
    refits: list[LayerRefit] = []

    def accumulators(i: int) -> tuple[CovStats | None, CovStats | None]:
        m = adapter.layer_modules(model, i)
        kept_attn, kept_mlp = kept_columns(masks[i], geom.head_dim, m.o_proj.in_features, m.down_proj.in_features)
        return (CovStats(m.o_proj.in_features, kept_attn, device) if "attn" in modules else None,
                CovStats(m.down_proj.in_features, kept_mlp, device) if "mlp" in modules else None)

    calibrate_layers(model, input_ids, lambda i, stats: refits.append(refit(i, stats.attn_cov, stats.mlp_cov)),
                     batch_size=batch_size, progress=progress, covariance=accumulators)
    return refits


@dataclass
class Compensation:
    """What a reconstruction mode hands to the writing pass: calibration ``means`` (``bias``), a
    ``refit(i, modules) -> LayerRefit`` called while layer i is resident (``ls``), and the record the
    provenance keeps."""

    means: list | None
    refit: Callable[[int, Any], LayerRefit] | None
    record: dict[str, Any]

    def __iter__(self):
        return iter((self.means, self.refit, self.record))


def no_compensation(stream: Any, config: Any, scores: Any, calib: Any, masks: list) -> Compensation:
    return Compensation(None, None, {"mode": "none", "ridge": None, "statistics": None})


def mean_compensation(stream: Any, config: Any, scores: Any, calib: Any, masks: list) -> Compensation:
    return Compensation(scores.means, None, {"mode": "bias", "ridge": None, "statistics": {
        "means": "float64 calibration means of the o_proj / down_proj inputs", "calibration": scores.calibration}})


def ls_refit(stream: Any, config: Any, scores: Any, calib: Any, masks: list) -> Compensation:
    """The ``ls`` refit of every layer while it is written. Its dense-input covariances over the columns
    the allocation keeps come from full first-pass covariances when the statistics hold them, else from
    the writing pass itself (the calibration windows run through the dense layers again, one resident at
    a time, each layer refitted before it is sliced), so memory stays one layer's."""
    from flap_deploy.streaming.memory import give_back_memory
    from flap_deploy.streaming.passes import LayerPass

    stats = scores.statistics
    record = {"mode": "ls", "ridge": config.ridge, "statistics": {
        "covariance": "float64, dense calibration inputs of o_proj and down_proj", "calibration": stats.calibration}}
    head_dim = stream.geometry.head_dim
    covariances = stats.covariances
    if covariances is not None:
        record["statistics"]["pass"] = "first (full covariances kept with the statistics)"

        def refit(i: int, m: Any) -> LayerRefit:
            return refit_layer(m.o_proj, m.down_proj, *covariances[i], masks[i], head_dim, config.ridge)

        return Compensation(None, refit, record)
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
        give_back_memory()  # the pass's activations and batch products, freed, before the solve allocates
        return refit_layer(m.o_proj, m.down_proj, attn, mlp, masks[i], head_dim, config.ridge)

    return Compensation(None, refit, record)
