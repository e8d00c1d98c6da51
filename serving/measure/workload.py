"""The traffic a measurement sends: request lengths, arrivals, and the SLO it is judged by.

Parsed once here and used by ``bench``, ``compare`` and the capacity search, so the three speak one
vocabulary:

- a workload (``--workload``): ``fixed:IN,OUT`` (every request alike), ``lognormal:IN_MEDIAN,IN_SIGMA,
  OUT_MEDIAN,OUT_SIGMA`` or ``uniform:IN_MIN,IN_MAX,OUT_MIN,OUT_MAX`` (seeded lengths; the prompt
  tokens from ``--prompts``), ``sharegpt:FILE`` (ShareGPT JSON: a list of ``conversations``, the first
  human turn is the prompt, the reply's token count the output length) or ``custom:FILE`` (the JSONL of
  ``vllm bench serve --dataset-name custom``: a ``prompt`` per line, optional ``output_tokens``);
- arrivals: closed loop (a concurrency bound, requests sent at once) or open loop at a request rate,
  with inter-arrival gaps drawn from a gamma distribution of shape ``burstiness`` and mean 1 / rate,
  then scaled so that N requests span N / rate seconds: vLLM's ``get_request`` exactly (burstiness 1
  is a Poisson process, below 1 burstier, infinite a constant gap);
- an SLO (``--slo``): ``METRIC_pP=VALUE[ms|s]`` joined by commas, METRIC one of vLLM's names (ttft,
  tpot, itl, e2el; e2e is accepted for e2el), P one of 50 / 90 / 99. A run meets it when every stated
  percentile is within its bound; a request is good when its own TTFT, TPOT and E2E latency are within
  every bound of that metric (and its own ITLs at the stated percentile), vLLM's ``--goodput`` rule (TPOT
  of a one-token request is 0), and goodput is good requests per second of the run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flap_deploy.errors import ParameterError

DISTRIBUTIONS = ("fixed", "lognormal", "uniform")
DATASETS = ("sharegpt", "custom")
CUSTOM_OUTPUT_TOKENS = 256  # vllm bench serve's --custom-output-len default, for lines without output_tokens
MAX_TOKENS = 1 << 20  # a length beyond any context: a parameter past it is a typo


# ------------------------------------------------------------------------------ workloads


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Workload:
    kind: str
    numbers: tuple[float, ...] = ()
    path: str | None = None
    # a dataset's entries, read when parsed: (prompt, the reply's text or the output tokens)
    entries: tuple[tuple[str, str | int], ...] = field(default=(), repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else f"{self.kind}:{','.join(f'{x:g}' for x in self.numbers)}"

    @property
    def is_dataset(self) -> bool:
        return self.kind in DATASETS

    def requests(self, tokenizer: Any, num_prompts: int, *, prompts: str = "self", seed: int = 0,
                 chat: bool = False) -> list[BenchRequest]:
        """``num_prompts`` seeded requests. Prompt lengths are token counts of ``tokenizer``: token ids are
        sent as they are (completions); with ``chat`` the decoded text is sent and its length re-counted."""
        if num_prompts < 1:
            raise ParameterError("num_prompts", f"must be at least 1, got {num_prompts}")
        rng = np.random.default_rng(seed)
        if self.is_dataset:
            order = rng.permutation(len(self.entries))
            # fewer entries than requests: the shuffled file again, as vLLM's oversampling
            chosen = [self.entries[order[i % len(order)]] for i in range(num_prompts)]
            # a reply counts as its tokens (vLLM's ShareGPT output length)
            chosen = [(p, n if isinstance(n, int) else max(1, len(tokenizer.encode(n, add_special_tokens=False))))
                      for p, n in chosen]
        else:
            in_lens, out_lens = _LENGTHS[self.kind](self.numbers, num_prompts, rng)
            ids = _prompt_ids(tokenizer, prompts, in_lens, rng)
            chosen = list(zip(ids, (int(n) for n in out_lens)))
        if chat:
            texts = [p if isinstance(p, str) else tokenizer.decode(p) for p, _ in chosen]
            return [BenchRequest(t, len(tokenizer.encode(t, add_special_tokens=False)), n)
                    for t, (_, n) in zip(texts, chosen)]
        out = []
        for p, n in chosen:
            ids = tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else p
            out.append(BenchRequest(list(ids), len(ids), n))
        return out


def mean_lengths(requests: list[BenchRequest]) -> dict[str, float]:
    """Mean prompt and output tokens of the requests (what the KV-cache estimates use)."""
    return {"mean_input_len": float(np.mean([r.prompt_len for r in requests])),
            "mean_output_len": float(np.mean([r.output_len for r in requests]))}


def parse_workload(spec: str) -> Workload:
    """A ``--workload`` string, checked (the parameters possible, a dataset file present)."""
    kind, sep, rest = (spec or "").partition(":")
    if not sep or kind not in DISTRIBUTIONS + DATASETS:
        raise ParameterError("workload", f"{spec!r}: expected one of " + ", ".join(
            f"{k}:{_SYNTAX[k]}" for k in DISTRIBUTIONS + DATASETS))
    if kind in DATASETS:
        path = Path(rest)
        if not path.is_file():
            raise ParameterError("workload", f"{spec!r}: {rest}: no such file")
        return Workload(kind, path=str(path), entries=tuple(_DATASET_READERS[kind](path)))
    try:
        numbers = tuple(float(x) for x in rest.split(","))
    except ValueError:
        raise ParameterError("workload", f"{spec!r}: expected {kind}:{_SYNTAX[kind]} (numbers)") from None
    if len(numbers) != _SYNTAX[kind].count(",") + 1:
        raise ParameterError("workload", f"{spec!r}: expected {kind}:{_SYNTAX[kind]}")
    problem = _CHECKS[kind](numbers)
    if problem:
        raise ParameterError("workload", f"{spec!r}: {problem}")
    return Workload(kind, numbers)


def as_workload(workload: str | Workload) -> Workload:
    return workload if isinstance(workload, Workload) else parse_workload(workload)


_SYNTAX = {"fixed": "IN,OUT", "lognormal": "IN_MEDIAN,IN_SIGMA,OUT_MEDIAN,OUT_SIGMA",
           "uniform": "IN_MIN,IN_MAX,OUT_MIN,OUT_MAX", "sharegpt": "FILE (ShareGPT JSON)",
           "custom": "FILE (JSONL, a prompt per line)"}


def _whole(x: float) -> bool:
    return x == int(x) and 1 <= x <= MAX_TOKENS


def _check_fixed(n: tuple[float, ...]) -> str | None:
    return None if all(map(_whole, n)) else f"lengths must be whole numbers from 1 to {MAX_TOKENS}"


def _check_lognormal(n: tuple[float, ...]) -> str | None:
    in_median, in_sigma, out_median, out_sigma = n
    if not (1 <= in_median <= MAX_TOKENS and 1 <= out_median <= MAX_TOKENS):
        return f"medians must lie from 1 to {MAX_TOKENS} tokens"
    if not (0 <= in_sigma <= 3 and 0 <= out_sigma <= 3):
        return "sigmas (of the log length) must lie from 0 to 3"
    return None


def _check_uniform(n: tuple[float, ...]) -> str | None:
    if not all(map(_whole, n)):
        return f"bounds must be whole numbers from 1 to {MAX_TOKENS}"
    if n[0] > n[1] or n[2] > n[3]:
        return "each minimum must not exceed its maximum"
    return None


_CHECKS: dict[str, Callable[[tuple[float, ...]], str | None]] = {
    "fixed": _check_fixed, "lognormal": _check_lognormal, "uniform": _check_uniform}


def _lognormal(median: float, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    return np.clip(np.rint(rng.lognormal(math.log(median), sigma, size=n)), 1, MAX_TOKENS).astype(int)


_LENGTHS: dict[str, Callable[[tuple[float, ...], int, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "fixed": lambda x, n, rng: (np.full(n, int(x[0])), np.full(n, int(x[1]))),
    "lognormal": lambda x, n, rng: (_lognormal(x[0], x[1], n, rng), _lognormal(x[2], x[3], n, rng)),
    "uniform": lambda x, n, rng: (rng.integers(int(x[0]), int(x[1]) + 1, size=n),
                                  rng.integers(int(x[2]), int(x[3]) + 1, size=n)),
}


def _prompt_ids(tokenizer: Any, source: str, lengths: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """Prompts of the given token counts: seeded random ids of ordinary tokens ("self", like vLLM's random
    dataset), or seeded windows of a text file's token stream."""
    if source == "self":
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        pool = np.asarray([i for i in range(len(tokenizer)) if i not in special])
        return [[int(t) for t in rng.choice(pool, size=int(n))] for n in lengths]
    path = Path(source)
    if not path.is_file():
        raise ParameterError("prompts", f"{source}: no such file (give a text file or 'self')")
    text = path.read_text(encoding="utf-8", errors="replace")[:4_000_000]
    stream = tokenizer.encode(text, add_special_tokens=False)
    longest = int(max(lengths))
    if len(stream) < longest + 1:
        raise ParameterError("prompts", f"{source}: only {len(stream)} tokens, fewer than a prompt's {longest}")
    return [list(stream[s:s + int(n)]) for n, s in zip(lengths, rng.integers(0, len(stream) - lengths))]


def _read_json(path: Path, lines: bool) -> list[Any]:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if lines:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ParameterError("workload", f"{path}: not {'JSONL' if lines else 'JSON'} ({e})") from None
    if not isinstance(data, list):
        raise ParameterError("workload", f"{path}: expected a JSON list of conversations")
    return data


def _sharegpt(path: Path) -> list[tuple[str, str]]:
    """(prompt, reply) of each entry with a human turn and a reply (vLLM's ShareGPT reading)."""
    pairs = []
    for entry in _read_json(path, lines=False):
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = (t.get("value") if isinstance(t, dict) else None for t in turns[:2])
        if isinstance(prompt, str) and prompt.strip() and isinstance(reply, str):
            pairs.append((prompt, reply))
    if not pairs:
        raise ParameterError("workload", f"{path}: no usable prompt (entries need 'conversations' with a prompt "
                                         "and a reply)")
    return pairs


def _custom(path: Path) -> list[tuple[str, int]]:
    """(prompt, output tokens) of each JSONL line with a non-empty ``prompt``."""
    pairs = []
    for i, row in enumerate(_read_json(path, lines=True), 1):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            continue
        out = row.get("output_tokens", CUSTOM_OUTPUT_TOKENS)
        if not isinstance(out, int) or out < 1:
            raise ParameterError("workload", f"{path}: line {i}: output_tokens must be a positive integer, got {out!r}")
        pairs.append((prompt, out))
    if not pairs:
        raise ParameterError("workload", f"{path}: no usable prompt (each line needs a non-empty 'prompt')")
    return pairs


_DATASET_READERS = {"sharegpt": _sharegpt, "custom": _custom}


# ------------------------------------------------------------------------------ arrivals


def check_arrivals(request_rate: float, burstiness: float) -> None:
    if not request_rate > 0:
        raise ParameterError("request_rate", f"must be positive (requests/s; inf sends all at once), got {request_rate}")
    if not burstiness > 0:
        raise ParameterError("burstiness", f"must be positive (1: Poisson), got {burstiness}")


def arrival_offsets(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Seconds from the start at which each of ``n`` requests is sent (vLLM's ``get_request``): gamma gaps of
    shape ``burstiness`` and scale 1 / (rate × burstiness), summed, scaled to end at n / rate."""
    check_arrivals(request_rate, burstiness)
    if request_rate == math.inf:
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    if burstiness == math.inf:
        gaps = np.full(n, 1.0 / request_rate)
    else:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return times * (n / request_rate) / times[-1]


# ------------------------------------------------------------------------------ SLOs and goodput

SLO_METRICS = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2el": "e2el", "e2e": "e2el"}
SLO_PERCENTILES = (50, 90, 99)
_UNITS = {"ms": 1.0, "s": 1000.0}


@dataclass(frozen=True)
class Target:
    metric: str  # ttft / tpot / itl / e2el
    percentile: int
    ms: float

    def __str__(self) -> str:
        bound = f"{self.ms / 1000:g}s" if self.ms >= 1000 else f"{self.ms:g}ms"
        return f"{self.metric}_p{self.percentile}={bound}"


@dataclass(frozen=True)
class SLO:
    targets: tuple[Target, ...]

    def __str__(self) -> str:
        return ",".join(map(str, self.targets))

    @property
    def percentiles(self) -> set[float]:
        return {float(t.percentile) for t in self.targets}

    def met_by(self, metrics: dict[str, Any]) -> bool:
        """Whether a run's percentiles (``calculate_metrics``) are all within their bounds."""
        return all(metrics[f"{t.metric}_ms"][f"p{t.percentile}"] <= t.ms for t in self.targets)

    def good(self, result: Any, output_tokens: int) -> bool:
        """Whether one successful request (a ``bench.RequestResult``) met every bound by its own figures."""
        for t in self.targets:
            if t.metric == "itl":
                value = float(np.percentile(result.itl, t.percentile)) if result.itl else 0.0
            elif t.metric == "tpot":
                value = (result.latency - result.ttft) / (output_tokens - 1) if output_tokens > 1 else 0.0
            else:
                value = result.ttft if t.metric == "ttft" else result.latency
            if value * 1000.0 > t.ms:
                return False
        return True


def parse_slo(spec: str) -> SLO:
    """``ttft_p99=500ms,tpot_p99=50ms``: metric (ttft, tpot, itl, e2el / e2e), percentile (50, 90, 99), bound
    with its unit (ms or s)."""
    targets = []
    for item in (spec or "").split(","):
        name, sep, value = item.strip().partition("=")
        metric, _, pct = name.strip().lower().partition("_p")
        if not sep or metric not in SLO_METRICS:
            raise ParameterError("slo", f"{item.strip()!r}: expected METRIC_pP=VALUE with METRIC one of "
                                        f"{', '.join(SLO_METRICS)} (e.g. ttft_p99=500ms)")
        if pct not in {str(p) for p in SLO_PERCENTILES}:
            raise ParameterError("slo", f"{item.strip()!r}: percentile must be one of "
                                        f"{', '.join(f'p{p}' for p in SLO_PERCENTILES)}")
        value = value.strip().lower()
        unit = next((u for u in ("ms", "s") if value.endswith(u)), None)
        try:
            number = float(value[:-len(unit)]) if unit else None
        except ValueError:
            number = None
        if unit is None or number is None or not number > 0 or not math.isfinite(number):
            raise ParameterError("slo", f"{item.strip()!r}: the bound must be a positive number with a unit "
                                        f"({' or '.join(_UNITS)}), e.g. 500ms or 0.5s")
        targets.append(Target(SLO_METRICS[metric], int(pct), number * _UNITS[unit]))
    return SLO(tuple(targets))


def as_slo(slo: str | SLO | None) -> SLO | None:
    return slo if slo is None or isinstance(slo, SLO) else parse_slo(slo)

