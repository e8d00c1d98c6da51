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
from typing import Any

import torch

from flap_deploy.errors import FlapDeployError
from flap_deploy.model.adapters import LayerModules
from flap_deploy.model.layout import LayerMask, kept_columns
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
                 ridge: float, *, pruned_inputs: bool = False) -> Refit:
    """The ``ls`` refit of one linear layer on its kept input columns (see the module docstring), where its
    statistics live (host or device), within ``refit_nbytes``. ``pruned_inputs``: the study's sequential
    variant (``_refit_on_pruned_inputs``).

    The system ``[Sigma[k, k]; Sigma[r, k]]`` (``CovStats.system``: a second-pass accumulator's own
    co-moment, consumed) is factorized in place (Cholesky of the kept block + lam I). The output rows are
    independent, so W' is solved one row block at a time: the block's right-hand side ``W[b, r] Sigma[r, k]``
    in float64, two triangular solves in place, ``W[b, k]`` added, its bias taken, and cast into W' in the
    weight's dtype; no float64 copy of the whole weight or of W' is made. ``ridge = 0`` factorizes a copy,
    so that a singular kept block can fall back to the minimum-norm solution."""
    if pruned_inputs:
        return _refit_on_pruned_inputs(weight, bias, kept, stats, ridge)
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


def _refit_on_pruned_inputs(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, stats: CovStats,
                            ridge: float) -> Refit:
    """The quality study's sequential refit (``RefitPass(pruned_inputs=True)``): ``stats`` is the joint
    covariance of [dense inputs, pruned inputs' kept columns] against the latter, and the refit predicts
    the dense output from the pruned inputs: ``W' = W_k + (W S_dk - W_k S_kk)(S_kk + lam I)^-1``, which is
    the shipped refit's formula when both inputs are the same. A study tool: float64 copies of W, not
    bounded by ``refit_nbytes``."""
    w = weight.detach().to(torch.float64).cpu()
    n = w.shape[1]
    kept = torch.as_tensor(kept, dtype=torch.long).flatten().cpu()
    removed = torch.ones(n, dtype=torch.bool)
    removed[kept] = False
    removed = removed.nonzero().flatten()
    mu = stats.mean.cpu()
    mu_dense, mu_kept = mu[:n], mu[n:]
    new_w = w[:, kept].clone()
    if kept.numel() and math.isfinite(ridge):
        joint = stats.covariance(cols=torch.arange(n, n + kept.numel())).cpu()  # [n + |k|, |k|]
        s_dk, s_kk = joint[:n], joint[n:]
        lam = ridge * float(s_kk.diagonal().mean())
        lhs = s_kk + lam * torch.eye(kept.numel(), dtype=torch.float64)

        def solve(rhs: torch.Tensor) -> torch.Tensor:  # (S_kk + lam I)^-1 rhs
            try:
                return torch.linalg.solve(lhs, rhs)
            except RuntimeError:  # singular without ridge: the minimum-norm solution
                return torch.linalg.pinv(lhs, hermitian=True) @ rhs

        new_w += w[:, removed] @ solve(s_dk[removed].T).T
        new_w += w[:, kept] @ solve((s_dk[kept] - s_kk).T).T
    b = bias.detach().to(torch.float64).cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    new_b = b + w @ mu_dense - new_w @ mu_kept
    return Refit(kept=kept, weight=new_w.to(weight.dtype), bias=new_b)


def refit_layer(o_proj: torch.nn.Module, down_proj: torch.nn.Module, attn: CovStats | None, mlp: CovStats | None,
                mask: LayerMask, head_dim: int, ridge: float) -> LayerRefit:
    """The ``ls`` refit of one layer from its dense-input covariances (a module without statistics is
    left to the mean compensation)."""
    kept_attn, kept_mlp = kept_columns(mask, head_dim, o_proj.in_features, down_proj.in_features)
    return LayerRefit(
        attn=refit_linear(o_proj.weight, o_proj.bias, kept_attn, attn, ridge) if attn is not None else None,
        mlp=refit_linear(down_proj.weight, down_proj.bias, kept_mlp, mlp, ridge) if mlp is not None else None,
    )


MODULES = ("attn", "mlp")  # o_proj, down_proj


class RefitPass:
    """The ``ls`` refit's own pass over the calibration windows: ``refit(i, modules)``, called for every
    layer in order while it is resident, accumulates layer i's inputs of o_proj / down_proj over the
    columns its mask keeps (one layer's covariances held at a time), refits the layer, and moves the
    windows on to the next layer.

    Every layer is fed the dense outputs of the previous one, as in the statistics pass (the shipped
    refit). ``pruned_inputs`` (the quality study's sequential variant) also runs a second stream
    through the already pruned and refitted layers, and refits each module on its pruned inputs
    toward the dense module's outputs (attention first, so that the MLP's pruned inputs pass through
    the refitted attention). ``modules`` selects o_proj (``attn``) and / or down_proj (``mlp``);
    the other is left to the mean compensation (with ``pruned_inputs``: to its kept columns)."""

    def __init__(self, stream: Any, windows: torch.Tensor, masks: list[LayerMask], ridge: float, *,
                 modules: tuple[str, ...] = MODULES, pruned_inputs: bool = False, batch_size: int = 8,
                 buffer_device: torch.device | str | None = None):
        from flap_deploy.streaming.passes import LayerPass

        self.lp = LayerPass(stream, windows, batch_size=batch_size, buffer_device=buffer_device)
        self.masks, self.ridge, self.modules = masks, ridge, modules
        self.pruned = self.lp.buffer.clone() if pruned_inputs else None

    @torch.no_grad()
    def __call__(self, i: int, m: LayerModules) -> LayerRefit:
        from flap_deploy.pruning.statistics import input_hooks
        from flap_deploy.streaming.memory import give_back_memory

        stream, layer = self.lp.stream, self.lp.stream.layers[i]
        linears = dict(zip(MODULES, (m.o_proj, m.down_proj)))
        kept = dict(zip(MODULES, kept_columns(self.masks[i], stream.geometry.head_dim, m.o_proj.in_features,
                                              m.down_proj.in_features)))
        if self.pruned is None:
            stats = {k: CovStats(linears[k].in_features, kept[k], stream.device) for k in self.modules}
            with input_hooks(m, **{k: s.update for k, s in stats.items()}):
                self.lp.run(layer)
            give_back_memory()  # the pass's activations and batch products, freed, before the solve allocates
            return refit_layer(m.o_proj, m.down_proj, stats.get("attn"), stats.get("mlp"), self.masks[i],
                               stream.geometry.head_dim, self.ridge)
        fits: dict[str, Refit] = {}
        for k in self.modules:
            n, cols = linears[k].in_features, kept[k].numel()
            joint = CovStats(n + cols, torch.arange(n, n + cols), stream.device)
            for sl in self.lp.slices:
                seen: dict[str, torch.Tensor] = {}
                with input_hooks(m, **{k: lambda x: seen.__setitem__("dense", x)}):
                    self.lp.forward(layer, sl)
                with input_hooks(m, **{k: lambda x: seen.__setitem__("pruned", x)}), self._pruned(m, kept, fits):
                    self.lp.forward(layer, sl, self.pruned)
                joint.update(torch.cat([seen["dense"], seen["pruned"][..., kept[k]]], dim=-1))
            fits[k] = refit_linear(linears[k].weight, linears[k].bias, kept[k], joint, self.ridge,
                                   pruned_inputs=True)
        self.lp.run(layer)
        with self._pruned(m, kept, fits):
            self.lp.run(layer, buffer=self.pruned)
        return LayerRefit(attn=fits.get("attn"), mlp=fits.get("mlp"))

    @staticmethod
    def _pruned(m: LayerModules, kept: dict[str, torch.Tensor], fits: dict[str, Refit]) -> Any:
        """For the block, o_proj / down_proj compute the pruned layer's outputs: their refit where
        there is one, else their kept columns as they are."""
        from flap_deploy.streaming.layers import hooks

        def output(k: str) -> Any:
            def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
                x = args[0][..., kept[k].to(args[0].device)]
                fit = fits.get(k)
                if fit is None:
                    return torch.nn.functional.linear(x, module.weight[:, kept[k].to(x.device)], module.bias)
                return torch.nn.functional.linear(x, fit.weight.to(x), fit.bias.to(x))
            return hook

        return hooks(after=[(m.o_proj, output("attn")), (m.down_proj, output("mlp"))])


@torch.no_grad()
def refit_layers(model: torch.nn.Module, input_ids: torch.Tensor, masks: list[LayerMask], ridge: float, *,
                 modules: tuple[str, ...] = MODULES, pruned_inputs: bool = False, batch_size: int = 8,
                 progress: bool = True,
                 covariances: list[tuple[CovStats | None, CovStats | None]] | None = None) -> list[LayerRefit]:
    """The ``ls`` refit of every layer of an in-memory model, by ``RefitPass`` over ``input_ids`` (after
    the global allocation, as ``prune`` does while writing). ``covariances`` (full-column accumulators
    from a first pass, e.g. ``collect_statistics(covariance=True)``) skips the pass."""
    from flap_deploy.streaming.passes import as_stream, progress_bar

    stream = as_stream(model)
    geom = stream.geometry
    if covariances is not None:
        if pruned_inputs:
            raise ValueError("a refit on pruned inputs needs its own pass, not first-pass covariances")
        return [refit_layer(m.o_proj, m.down_proj, a if "attn" in modules else None, b if "mlp" in modules else None,
                            masks[i], geom.head_dim, ridge)
                for i, (a, b) in enumerate(covariances)
                for m in (stream.adapter.layer_modules(stream.model, i),)]
    refit = RefitPass(stream, input_ids, masks, ridge, modules=modules, pruned_inputs=pruned_inputs,
                      batch_size=batch_size)
    refits = []
    bar = progress_bar(geom.num_layers, "refit", progress)
    for i in range(geom.num_layers):
        with stream.layer(i):
            refits.append(refit(i, stream.adapter.layer_modules(stream.model, i)))
        bar.update()
    bar.close()
    return refits
