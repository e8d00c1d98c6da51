"""Capacity at an SLO: the highest offered request rate at which one replica still meets it, dense vs pruned.

The rates tried lie on a geometric grid, ``start × (1 + resolution)^k`` for whole k, so that two runs
of the search can only disagree on measurements, never on the rates they happened to try. The search
measures ``start``; from there it steps by doubling the rate (upward while the SLO holds, downward
while it does not) until one rate meets it and the next fails, clamped to ``[min_rate, max_rate]``;
then it bisects the grid indexes between the two. So the knee lies between the capacity found and
the next grid rate, ``resolution`` above it, and for a server whose SLO verdict is monotone in the rate
the result is the highest grid rate that meets the SLO: a looser SLO never gives less. No measurement
starts once ``budget_s`` has passed; an unfinished search reports the bracket it reached.

A rate meets the SLO when every repeat of its run does (the run's stated percentiles within their
bounds, no failed request). Each run is open loop: ``num_prompts`` requests of the workload at the
rate (gamma gaps of shape ``burstiness``, vLLM's), so a run lasts at least num_prompts / rate seconds.

Beside the measured capacities the report models where a gain can come from (``kv_model``): KV bytes
per token of each model, the tokens the server's KV cache holds (``Backend.kv_cache_tokens``) and the
sequences of the workload's mean length that fit in it, and the roofline of one decode step: weight
bytes alone (the weight-only ideal), and weight bytes plus batch × context × KV bytes per token (the
full ideal) at the batch measured at the dense capacity (Little's law: throughput × mean latency) and
the mean context of a decode step (mean prompt + half the mean output).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from flap_deploy.errors import ParameterError
from flap_deploy.io.atomic import check_output_dir
from serving.backends import get_backend
from serving.measure.bench import run_bench
from serving.measure.bench_report import summary_rows
from serving.measure.capacity_report import deployer_sentence, write_capacity_report
from serving.measure.compare import ideal_ratio, launched_servers, resolve_pair
from serving.measure.workload import (
    SLO,
    Workload,
    as_slo,
    as_workload,
    check_arrivals,
    mean_lengths,
)


@dataclass(frozen=True)
class CapacitySearch:
    start: float = 1.0  # req/s, the first rate measured
    max_rate: float = 256.0  # req/s, none above is tried (a capacity there is reported as "at least")
    min_rate: float = 0.05  # req/s, none below is tried (a server failing there has no capacity)
    resolution: float = 0.1  # the grid's relative step: the knee lies within this fraction above the capacity
    budget_s: float = 1800.0  # no measurement starts after this many seconds (per model)

    def __post_init__(self) -> None:
        if not (0 < self.min_rate <= self.start <= self.max_rate < math.inf):
            raise ParameterError("rate_start", f"{self.start:g} must lie within the finite rates "
                                               f"[{self.min_rate:g}, {self.max_rate:g}] req/s (rate_min, rate_max)")
        if not 0 < self.resolution <= 1:
            raise ParameterError("resolution", f"must lie in (0, 1] (a fraction of the rate), got {self.resolution:g}")
        if not self.budget_s > 0:
            raise ParameterError("budget", f"must be positive seconds, got {self.budget_s:g}")

    def rate(self, k: int) -> float:
        return self.start * (1 + self.resolution) ** k

    @property
    def doubling(self) -> int:
        """Grid steps to twice the rate."""
        return max(1, math.ceil(math.log(2) / math.log1p(self.resolution)))

    @property
    def k_range(self) -> tuple[int, int]:
        step = math.log1p(self.resolution)
        return (math.ceil(math.log(self.min_rate / self.start) / step - 1e-9),
                math.floor(math.log(self.max_rate / self.start) / step + 1e-9))


def find_capacity(measure: Callable[[float], dict[str, Any]], search: CapacitySearch,
                  clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Bracket the knee, then bisect it (see the module). ``measure(rate)`` returns a run's figures with
    ``slo_met``. Returns the capacity (None: even ``min_rate`` failed), the bracket, every point measured."""
    k_min, k_max = search.k_range
    points: dict[int, dict[str, Any]] = {}
    t0 = clock()

    def met(k: int) -> bool | None:
        if k not in points:
            if clock() - t0 >= search.budget_s:
                return None
            points[k] = {"rate": search.rate(k), **measure(search.rate(k))}
        return bool(points[k]["slo_met"])

    lo = hi = None  # grid indexes: lo met, hi failed
    verdict = met(0)
    if verdict is not None:
        direction = 1 if verdict else -1
        lo, hi = (0, None) if verdict else (None, 0)
        k = 0
        while (lo is None or hi is None) and verdict is not None:
            edge = k_max if direction > 0 else k_min
            if k == edge:
                break
            k = min(k + search.doubling, k_max) if direction > 0 else max(k - search.doubling, k_min)
            verdict = met(k)
            if verdict:
                lo = k
            elif verdict is False:
                hi = k
        while lo is not None and hi is not None and hi - lo > 1 and verdict is not None:
            mid = (lo + hi) // 2
            verdict = met(mid)
            if verdict:
                lo = mid
            elif verdict is False:
                hi = mid
    complete = verdict is not None
    limit = "max_rate" if lo == k_max and hi is None else "min_rate" if lo is None and hi == k_min else None
    return {
        "capacity": search.rate(lo) if lo is not None else None,
        "failed_rate": search.rate(hi) if hi is not None else None,
        "limit": limit if complete else None, "complete": complete, "elapsed_s": clock() - t0,
        "search": asdict(search), "points": [points[k] for k in sorted(points)],
    }


# ------------------------------------------------------------------------------ the model of the gain


def decode_context(workload: dict[str, float]) -> float:
    """Mean tokens in a sequence's KV cache over its decode steps: its prompt and half its output."""
    return workload["mean_input_len"] + workload["mean_output_len"] / 2


def little_batch(row: dict[str, Any]) -> float:
    """Mean sequences in flight during a run (Little's law): completed requests/s × mean latency."""
    return row["request_throughput"] * row["e2el_mean_ms"] / 1000.0


def full_ideal(weights: dict[str, Any], kv_bytes: dict[str, int], batch: float, context: float) -> float:
    """Dense ÷ pruned bytes read by one decode step of ``batch`` sequences of ``context`` tokens each:
    the weights once, every sequence's KV cache."""
    step = {name: weights[f"{name}_decode_bytes"] + batch * context * kv_bytes[name] for name in ("dense", "pruned")}
    return step["dense"] / step["pruned"]


def kv_model(refs: dict[str, Any], backend: Any, extra_args: Sequence[str], kv_tokens: dict[str, int | None],
             lengths: dict[str, float], weights: dict[str, Any], batch: float | None, batch_bound: int) -> dict[str, Any]:
    """KV bytes per token at the runtime's element size, the sequences of mean length the KV cache holds (the
    server's batch bound, max_num_seqs, caps how many run at once besides), the weight-only and the full ideal."""
    from flap_deploy.model.params import kv_bytes_per_token

    per_token = {name: kv_bytes_per_token(ref.config, backend.element_bytes(ref, extra_args))
                 for name, ref in refs.items()}
    seq_len = lengths["mean_input_len"] + lengths["mean_output_len"]
    context = decode_context(lengths)
    return {
        "kv_bytes_per_token": per_token, "kv_cache_tokens": kv_tokens, "mean_sequence_len": seq_len,
        "batch_bound": batch_bound,
        "sequences_that_fit": {n: (t // math.ceil(seq_len) if t else None) for n, t in kv_tokens.items()},
        "decode_context": context, "batch": batch, "weight_only_ideal": weights["ideal_ratio"],
        "full_ideal": full_ideal(weights, per_token, batch, context) if batch is not None else None,
    }


# ------------------------------------------------------------------------------ dense vs pruned


def check_capacity_args(slo: SLO | None, burstiness: float, repeats: int, fleet_load: float) -> None:
    """What a capacity search needs besides its ``CapacitySearch``, checked before any work."""
    if slo is None:
        raise ParameterError("slo", "is needed: a capacity is the highest rate at which an SLO holds")
    check_arrivals(1.0, burstiness)
    if repeats < 1:
        raise ParameterError("repeats", f"must be at least 1, got {repeats}")
    if not fleet_load > 0:
        raise ParameterError("fleet_load", f"must be positive req/s, got {fleet_load:g}")


def compare_capacity(dense: str, pruned: str, *, slo: str | SLO, out_dir: str | Path, backend: str | None = None,
                     workload: str | Workload = "fixed:128,64", num_prompts: int = 64, burstiness: float = 1.0,
                     search: CapacitySearch = CapacitySearch(), repeats: int = 1, fleet_load: float = 100.0,
                     prompts: str = "self", seed: int = 0, warmup: int = 2, max_num_seqs: int = 8,
                     max_model_len: int | None = None, threads: int | None = None, overwrite: bool = False,
                     extra_args: Sequence[str] = (), startup_timeout: float = 900.0, progress: bool = True
                     ) -> dict[str, Any]:
    """Find each model's capacity at ``slo`` (its own server, started for its search and stopped after,
    so only one is ever up) and write capacity.json, capacity.md and capacity.png into ``out_dir``."""
    b = get_backend(backend)
    slo, workload = as_slo(slo), as_workload(workload)
    check_capacity_args(slo, burstiness, repeats, fleet_load)
    options = dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len, threads=threads, extra_args=tuple(extra_args))
    b.settings_for(dense, **options)
    check_output_dir(out_dir, overwrite)
    refs = resolve_pair(dense, pruned, b.name, extra_args)
    weights = ideal_ratio(refs["dense"], refs["pruned"], b.name, extra_args)
    settings = {name: b.settings_for(b.serve_target(ref, progress), served_model_name=name, **options)
                for name, ref in refs.items()}
    tokenizer = refs["dense"].tokenizer()
    requests = workload.requests(tokenizer, num_prompts, prompts=prompts, seed=seed)

    capacity, kv_tokens, start_s = {}, {}, {}
    for name in ("dense", "pruned"):
        with launched_servers({name: settings[name]}, b, startup_timeout=startup_timeout) as live:
            url = live[name]["url"]
            start_s[name] = live[name]["start_s"]
            kv_tokens[name] = b.kv_cache_tokens(url, settings[name])

            def measure(rate: float) -> dict[str, Any]:
                rows = [summary_rows(run_bench(url, requests, model=name, request_rate=rate, burstiness=burstiness,
                                               slo=slo, seed=seed + rep, warmup=warmup, tokenizer=tokenizer,
                                               progress=progress))[0] for rep in range(repeats)]
                return _median_row(rows)

            capacity[name] = find_capacity(measure, search)
    lengths = mean_lengths(requests)
    at_dense = next((p for p in capacity["dense"]["points"] if p["rate"] == capacity["dense"]["capacity"]), None)
    report = {
        "backend": b.name, "dense": str(dense), "pruned": str(pruned),
        "workload": {"workload": str(workload), "slo": str(slo), "num_prompts": num_prompts, **lengths,
                     "arrivals": _arrivals(burstiness), "burstiness": burstiness, "repeats": repeats, "seed": seed,
                     "prompts": prompts, "warmup": warmup, "max_num_seqs": max_num_seqs,
                     "max_model_len": max_model_len, "threads": threads, "extra_args": list(extra_args),
                     "ignore_eos": True, "temperature": 0.0},
        "fleet_load": fleet_load, "server_start_s": start_s, "weights": weights, "capacity": capacity,
        "capacity_ratio": (capacity["pruned"]["capacity"] / capacity["dense"]["capacity"]
                           if capacity["dense"]["capacity"] and capacity["pruned"]["capacity"] else None),
        "kv": kv_model(refs, b, extra_args, kv_tokens, lengths, weights,
                       little_batch(at_dense) if at_dense else None, max_num_seqs),
    }
    report["sentence"] = deployer_sentence(report)
    write_capacity_report(report, out_dir, overwrite)
    return report


def _arrivals(burstiness: float) -> str:
    return "Poisson arrivals" if burstiness == 1 else f"gamma arrivals, burstiness {burstiness:g}"


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over repeats; the SLO met only where every repeat met it."""
    if len(rows) == 1:
        return rows[0]
    out = {"repeats": len(rows), "slo_met": all(r["slo_met"] for r in rows),
           "failed": sum(r["failed"] for r in rows), "completed": sum(r["completed"] for r in rows)}
    for key, value in rows[0].items():
        if key not in out and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in rows)
    return out

