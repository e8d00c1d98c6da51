"""Width search: per-layer attention and MLP widths chosen against the whole model's output.

FLAP's allocation ranks units by a per-layer fluctuation score under one global threshold; nothing checks it
against the model's output, and layer-wise errors do not add up (EvoPress). ``evolve`` starts from that
allocation and searches the same menus (the alignment's widths, ``allocation``) at the same budget for the
candidate whose next-token distributions are closest to the dense model's. Fitness: mean KL(dense || pruned)
per predicted token on held-in calibration windows, with the configured reconstruction applied to every
candidate exactly as ``compress_stream`` writes it (so the start's fitness is the KL of the checkpoint
``prune`` writes for FLAP's widths).

Candidates are one (attention, MLP) menu option per layer. A mutation moves width between layers: an MLP
quantum (1/32 of a layer's channels, aligned) from one layer to another, an attention option from one layer
to another, or one layer's attention up or down. The MLP widths then absorb what the attention moves changed,
in alignment steps, so every candidate keeps the start's weights to within half an MLP step (exactly when its
attention keeps as many as the start's): the exactness ``allocate`` gives the ratio.

Fitness runs through the layer stream. One evaluation of a set of candidates is one pass over the layers: each
layer resident once, every candidate's hidden states run through its variant of the layer (the dense layer
sliced and reconstructed for the candidate's widths), and candidates that agree on the layers so far share one
buffer. The variants' refits (the ``ls`` solves, from the covariances the statistics pass held) are cached,
least recently used out first, within a byte budget, so a candidate is a choice per layer, never a new prune.

Multi-fidelity, seeded, budgeted. Offspring of the parent are measured on the first ``search_windows``
calibration windows; those better than the parent there (the best ``SURVIVORS``) on ``HIGH`` times as many,
where one replaces the parent only when better. The start is measured on the large set too, so the result is
never worse than FLAP's allocation on it. The budget counts evaluations on the small set (one on the large
set counts as its windows / the small set's) or seconds; a seed and a budget of evaluations give the same
widths every run.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights

from flap_deploy.errors import ParameterError
from flap_deploy.model.config import flap_config
from flap_deploy.model.layout import LayerMask, layer_widths
from flap_deploy.model.modeling_flap_llama import FlapLlamaDecoderLayer
from flap_deploy.streaming.layers import LayerStream
from flap_deploy.streaming.memory import GIB
from flap_deploy.streaming.passes import LayerPass
from flap_deploy.streaming.plan import MemoryPlan

from .allocation import Alignment, Allocation, chosen
from .choices import parse_budget
from .compress import compensation_biases, slice_layer
from .reconstruct import LayerRefit

OFFSPRING = 8  # candidates a generation
SURVIVORS = 2  # of them, at most, measured on the large set
HIGH = 4  # the large set: this many times the small one (at most every calibration window)
MLP_QUANTUM = 32  # an MLP move: this fraction of a layer's channels, in alignment steps
MAX_MOVES = 4  # a mutation makes 1 to this many moves (geometric)

Picks = tuple[tuple[int, int], ...]


@dataclass
class Evaluated:
    """One measured candidate: its (attention, MLP) options, the windows it was measured on, its KL."""

    picks: Picks
    windows: int
    kl: float


@dataclass
class SearchResult:
    allocation: Allocation
    record: dict[str, Any]  # what the provenance keeps
    evaluated: list[Evaluated]
    seconds: float


@dataclass
class SearchPlan:
    """The search's windows and memory, stated with the prune plan before any layer runs."""

    windows: tuple[int, int]  # small set, large set
    tokens: tuple[int, int]
    buffer_bytes: int  # hidden states of the candidates in flight, the embedded sets, the dense reference
    reference_bytes: int  # the dense log-probs of the small set, held
    cache_bytes: int  # refits kept between generations
    evaluations: int | None
    seconds: float | None

    def describe(self) -> str:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        budget = f"{self.evaluations} evaluations" if self.evaluations is not None else f"{self.seconds:g} s"
        return (f"search: {budget} on {self.windows[0]} / {self.windows[1]} calibration windows "
                f"({self.tokens[0]:,} / {self.tokens[1]:,} tokens), {OFFSPRING} candidates a generation; "
                f"hidden states {g(self.buffer_bytes)}, dense log-probs {g(self.reference_bytes)}, "
                f"refits cached up to {g(self.cache_bytes)}")


def plan_search(stream: LayerStream, config: Any, plan: MemoryPlan, statistics: Any) -> SearchPlan:
    """What the search will hold, checked against the memory plan's headroom; the ``ls`` variants need every
    layer's covariances from the statistics pass (held by the plan, or in the given ``statistics``)."""
    if config.reconstruction.covariances:
        held = statistics.covariances is not None if statistics is not None else plan.covariance_bytes > 0
        if not held:
            raise ParameterError("search", f"with `reconstruct` {config.effective_reconstruct} every candidate is "
                                           "refitted from the covariances held "
                                           "from the statistics pass, and "
                                 + ("the given statistics hold none (collect_statistics(covariance=True))"
                                    if statistics is not None else
                                    "the memory plan has no room for them; raise `max_memory` or use "
                                    "`reconstruct` bias"))
    nsamples = statistics.windows.shape[0] if statistics is not None and statistics.windows is not None \
        else config.nsamples
    seqlen = statistics.windows.shape[1] if statistics is not None and statistics.windows is not None \
        else config.seqlen
    small = min(config.search_windows, nsamples)
    large = min(HIGH * small, nsamples)
    g = stream.geometry
    elt = torch.empty((), dtype=stream.dtype).element_size()
    per_window = seqlen * g.hidden_size * elt
    buffers = per_window * (max(OFFSPRING * small, SURVIVORS * large) + small + 2 * large)
    vocab = stream.model.config.vocab_size
    reference = small * (seqlen - 1) * vocab * 4
    logits = 2 * min(config.batch_size, large) * seqlen * vocab * 4  # one chunk's logits and log-probs
    headroom = plan.limit_bytes - plan.host_peak_bytes - buffers - reference - logits
    if headroom < 0:
        raise ParameterError("search_windows", f"{small} / {large} windows need about "
                                               f"{(buffers + reference + logits) / GIB:.2f} GiB beside the plan's "
                                               f"{plan.host_peak_bytes / GIB:.2f} GiB of {plan.limit_bytes / GIB:.2f}"
                                               " GiB; lower it")
    evaluations, seconds = parse_budget(config.search_budget)
    return SearchPlan((small, large), (small * seqlen, large * seqlen), buffers, reference,
                      min(2 * GIB, headroom // 4), evaluations, seconds)


class Variants:
    """A layer's variant for a candidate's widths: the dense layer sliced and reconstructed as ``compress_stream``
    writes it (cast to the stored dtype), as a ``FlapLlamaDecoderLayer``. Refits are cached by (layer, options)."""

    def __init__(self, stream: LayerStream, config: Any, scores: Any, calib: Any, allocation: Allocation,
                 cache_bytes: int):
        self.stream, self.allocation, self.cache_bytes = stream, allocation, cache_bytes
        build = config.reconstruction.build
        self.compensation = lambda masks: build(stream, config, scores, calib, masks)
        start = self.compensation(allocation.masks)
        self.biases = compensation_biases(stream.adapter.layer_modules(stream.model, 0), start.means,
                                          (start.refit is not None, start.refit is not None))
        widths = [layer_widths(m, stream.geometry, i) for i, m in enumerate(allocation.masks)]
        self.config = flap_config(stream.model.config, widths, o_proj_bias=self.biases[0],
                                  down_proj_bias=self.biases[1])
        self.config._attn_implementation = stream.model.config._attn_implementation
        self.stored = stream.stored_dtype()
        self.refits: OrderedDict[tuple[int, int, int], LayerRefit] = OrderedDict()
        self.cached = 0

    def mask(self, i: int, pick: tuple[int, int]) -> LayerMask:
        return LayerMask(heads=self.allocation.attn_menus[i].mask_of(pick[0]),
                         mlp=self.allocation.mlp_menus[i].mask_of(pick[1]))

    def refit(self, i: int, pick: tuple[int, int], comp: Any, modules: Any) -> LayerRefit | None:
        if comp.refit is None:
            return None
        key = (i, *pick)
        if key in self.refits:
            self.refits.move_to_end(key)
            return self.refits[key]
        refit = comp.refit(i, modules)
        size = sum(r.weight.numel() * r.weight.element_size() + r.bias.numel() * r.bias.element_size()
                   for r in (refit.attn, refit.mlp) if r is not None)
        self.refits[key] = refit
        self.cached += size
        while self.cached > self.cache_bytes and len(self.refits) > 1:
            _, old = self.refits.popitem(last=False)
            self.cached -= sum(r.weight.numel() * r.weight.element_size() + r.bias.numel() * r.bias.element_size()
                               for r in (old.attn, old.mlp) if r is not None)
        return refit

    def layer(self, i: int, pick: tuple[int, int]) -> torch.nn.Module:
        """Layer i (resident) for one candidate's option."""
        stream, geom = self.stream, self.stream.geometry
        mask = self.mask(i, pick)
        comp = self.compensation([mask] * geom.num_layers)
        m = stream.adapter.layer_modules(stream.model, i)
        tensors = slice_layer(m, i, geom, mask, comp.means[i] if comp.means else None, with_o_bias=self.biases[0],
                              with_down_bias=self.biases[1], refit=self.refit(i, pick, comp, m))
        widths = layer_widths(mask, geom, i)
        cfg = copy.copy(self.config)
        for name, value in (("num_attention_heads_per_layer", widths.heads),
                            ("num_key_value_heads_per_layer", widths.kv_heads),
                            ("intermediate_size_per_layer", widths.mlp)):
            setattr(cfg, name, [*getattr(cfg, name)[:i], value, *getattr(cfg, name)[i + 1:]])
        with init_empty_weights(include_buffers=False):
            layer = FlapLlamaDecoderLayer(cfg, i, 0)
        prefix = f"model.layers.{i}."
        # what the checkpoint stores (its dtype), run as the stream runs the dense layers
        state = {name[len(prefix):]: t.to(self.stored).to(stream.dtype) for name, t in tensors.items()}
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.to(stream.device).eval()


class Fitness:
    """Mean KL(dense || candidate) per predicted token on the first ``n`` calibration windows, for many
    candidates in one pass over the layer stream."""

    def __init__(self, stream: LayerStream, windows: torch.Tensor, sizes: tuple[int, int], variants: Variants,
                 batch_size: int, buffer_device: Any):
        self.stream, self.variants, self.sizes = stream, variants, sizes
        self.passes = {n: LayerPass(stream, windows[:n], batch_size=batch_size, buffer_device=buffer_device)
                       for n in sorted(set(sizes))}
        dense = self.passes[sizes[1]]
        self.dense_hidden = dense.buffer.clone()
        for i in range(stream.geometry.num_layers):
            with stream.layer(i) as layer:
                dense.run(layer, buffer=self.dense_hidden)
        small = self.passes[sizes[0]]
        with self._head():
            self.small_reference = torch.cat([self._log_probs(self.dense_hidden[sl]) for sl in small.slices])

    @contextlib.contextmanager
    def _head(self) -> Iterator[None]:
        self.stream.load_head(lm_head=True)
        try:
            yield
        finally:
            self.stream.release_head()

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        lm = self.stream.model
        logits = lm.lm_head(lm.model.norm(hidden.to(self.stream.device)))[:, :-1].float()
        return F.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def __call__(self, candidates: list[Picks], n: int) -> list[float]:
        stream, lp = self.stream, self.passes[n]
        groups: list[tuple[list[int], torch.Tensor]] = [(list(range(len(candidates))), lp.buffer.clone())]
        for i in range(stream.geometry.num_layers):
            with stream.layer(i):
                split: list[tuple[list[int], torch.Tensor]] = []
                for members, buffer in groups:
                    by_pick: dict[tuple[int, int], list[int]] = {}
                    for c in members:
                        by_pick.setdefault(candidates[c][i], []).append(c)
                    parts = list(by_pick.items())
                    buffers = [buffer] + [buffer.clone() for _ in parts[1:]]
                    for (pick, part), buf in zip(parts, buffers):
                        lp.run(self.variants.layer(i, pick), buffer=buf)
                        split.append((part, buf))
                groups = split
        kl = [0.0] * len(candidates)
        with self._head():
            for members, buffer in groups:
                total, count = 0.0, 0
                for sl in lp.slices:
                    ref = self.small_reference[sl] if n == self.sizes[0] else self._log_probs(self.dense_hidden[sl])
                    logp = self._log_probs(buffer[sl])
                    total += (ref.exp() * (ref - logp)).sum().item()
                    count += logp.shape[0] * logp.shape[1]
                for c in members:
                    kl[c] = total / count
        return kl


class Moves:
    """Mutations of a candidate that keep its menus, its alignment and its budget."""

    def __init__(self, allocation: Allocation, rng: random.Random):
        self.attn, self.mlp, self.rng = allocation.attn_menus, allocation.mlp_menus, rng
        self.layers = len(self.attn)
        self.top = [len(m.units) - 1 for m in self.mlp]  # MLP option i keeps i alignment steps
        step_channels = int(self.mlp[0].units[1] - self.mlp[0].units[0]) if self.top[0] else 1
        self.quantum = max(1, round(int(self.mlp[0].units[-1]) / MLP_QUANTUM / step_channels))
        self.step_cost = int(self.mlp[0].cost[1] - self.mlp[0].cost[0]) if self.top[0] else 1
        start = allocation.picks
        self.start_attn = self.attn_cost(start)
        self.start_mlp = sum(m for _, m in start)

    def attn_cost(self, picks: Any) -> int:
        return sum(int(self.attn[i].cost[a]) for i, (a, _) in enumerate(picks))

    def kept_cost(self, picks: Any) -> int:
        return self.attn_cost(picks) + sum(int(self.mlp[i].cost[m]) for i, (_, m) in enumerate(picks))

    def mlp_total(self, picks: Any) -> int:
        """MLP steps a candidate keeps: the start's, plus the attention cost it saved in MLP steps (nearest)."""
        return self.start_mlp + round((self.start_attn - self.attn_cost(picks)) / self.step_cost)

    def mutate(self, parent: Picks) -> Picks | None:
        rng, L = self.rng, self.layers
        attn = [a for a, _ in parent]
        mlp = [m for _, m in parent]
        moves = 1
        while moves < MAX_MOVES and rng.random() < 0.5:
            moves += 1
        for _ in range(moves):
            kind = rng.choice(("mlp", "mlp", "attn", "trade"))
            if kind == "trade" or L < 2:
                i = rng.randrange(L)
                attn[i] = min(max(attn[i] + rng.choice((-1, 1)), 0), len(self.attn[i].units) - 1)
                continue
            a, b = rng.sample(range(L), 2)
            if kind == "mlp":
                d = min(self.quantum, mlp[a], self.top[b] - mlp[b])
                mlp[a], mlp[b] = mlp[a] - d, mlp[b] + d
            elif attn[a] > 0 and attn[b] < len(self.attn[b].units) - 1:
                attn[a], attn[b] = attn[a] - 1, attn[b] + 1
        return self.repair(attn, mlp)

    def repair(self, attn: list[int], mlp: list[int]) -> Picks | None:
        """The MLP widths moved, a quantum at a time in random layers, to the candidate's MLP total; None when
        the MLP cannot absorb the attention's change."""
        want = self.mlp_total(list(zip(attn, mlp)))
        if not 0 <= want <= sum(self.top):
            return None
        diff = want - sum(mlp)
        while diff:
            sign = 1 if diff > 0 else -1
            room = [i for i in range(self.layers) if (mlp[i] < self.top[i] if sign > 0 else mlp[i] > 0)]
            i = self.rng.choice(room)
            d = min(abs(diff), self.quantum, self.top[i] - mlp[i] if sign > 0 else mlp[i])
            mlp[i] += sign * d
            diff -= sign * d
        return tuple(zip(attn, mlp))


class Spend:
    """The budget: evaluations on the small set (a large-set one counts as its share) or seconds."""

    def __init__(self, plan: SearchPlan):
        self.evaluations, self.seconds = plan.evaluations, plan.seconds
        self.large = plan.windows[1] / plan.windows[0]
        self.used = 0.0
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        """Small-set evaluations left (unbounded under a time budget until the time is spent)."""
        if self.seconds is not None:
            return float("inf") if self.elapsed() < self.seconds else 0.0
        return self.evaluations - self.used


def evolve(stream: LayerStream, config: Any, scores: Any, calib: Any, allocation: Allocation,
           align: Alignment, plan: SearchPlan) -> SearchResult:
    """The evolutionary width search (see the module docstring)."""
    from tqdm.auto import tqdm

    statistics = scores.statistics
    windows = statistics.windows if statistics.windows is not None else calib.input_ids
    small, large = plan.windows
    rng = random.Random(config.seed)
    variants = Variants(stream, config, scores, calib, allocation, plan.cache_bytes)
    spend = Spend(plan)
    bar = tqdm(total=plan.evaluations if plan.evaluations is not None else plan.seconds, desc="search",
               unit="eval" if plan.evaluations is not None else "s", disable=not config.progress)
    fitness = Fitness(stream, windows, plan.windows, variants, config.batch_size,
                      calib.buffer_device if calib is not None else None)
    evaluated: list[Evaluated] = []
    shown = 0.0

    def measure(candidates: list[Picks], n: int) -> list[float]:
        nonlocal shown
        kls = fitness(candidates, n)
        evaluated.extend(Evaluated(c, n, k) for c, k in zip(candidates, kls))
        spend.used += len(candidates) * (1.0 if n == small else spend.large)
        now = spend.used if plan.evaluations is not None else min(spend.elapsed(), plan.seconds)
        bar.update(now - shown)
        shown = now
        return kls

    moves = Moves(allocation, rng)
    parent: Picks = tuple(allocation.picks)
    parent_small, start_kl = measure([parent], small)[0], measure([parent], large)[0]
    parent_large = start_kl
    seen = {parent}
    generations = improvements = 0
    bar.set_postfix_str(f"best KL {parent_large:.4f} (start)")
    while spend.left() >= 1 + (SURVIVORS * spend.large if plan.evaluations is not None else 0):
        room = spend.left() - SURVIVORS * spend.large
        count = int(min(OFFSPRING, room))
        offspring: list[Picks] = []
        for _ in range(20 * OFFSPRING):
            if len(offspring) == count:
                break
            child = moves.mutate(parent)
            if child is not None and child not in seen:
                seen.add(child)
                offspring.append(child)
        if not offspring:
            break
        generations += 1
        kls = measure(offspring, small)
        better = sorted((k, j) for j, k in enumerate(kls) if k < parent_small)[:SURVIVORS]
        if better:
            finalists = [offspring[j] for _, j in better]
            for (k_small, _), child, k_large in zip(better, finalists, measure(finalists, large)):
                if k_large < parent_large:
                    parent, parent_small, parent_large = child, k_small, k_large
                    improvements += 1
        bar.set_postfix_str(f"best KL {parent_large:.4f} (start {start_kl:.4f}), generation {generations}")
    bar.close()
    record = {"name": config.search, "budget": str(config.search_budget), "seed": config.seed,
              "windows": [small, large], "offspring": OFFSPRING, "evaluations": round(spend.used, 2),
              "generations": generations, "improvements": improvements,
              "fitness": "mean KL(dense || pruned) per token on the first calibration windows",
              "start_kl": start_kl, "kl": parent_large}
    return SearchResult(chosen(allocation.attn_menus, allocation.mlp_menus, list(parent), allocation.dense_cost),
                        record, evaluated, spend.elapsed())
