"""Async load generator for any OpenAI-compatible endpoint (ours, vLLM's, anyone's).

Metric definitions follow `vllm bench serve` (vllm/benchmarks/serve.py, `calculate_metrics`,
and lib/endpoint_request_func.py) so that figures are comparable:

- a request is timed from just before it is sent; TTFT is the arrival of the first SSE
  chunk that carries a choice, ITL the gap between consecutive such chunks, and end-to-end
  latency the arrival of the last such chunk;
- output tokens are the server's `usage.completion_tokens` (streamed with
  `stream_options.include_usage`), else the re-tokenized generated text;
- TPOT = (latency - TTFT) / (output tokens - 1) for requests with more than one token;
- throughputs divide by the wall time of the whole run (first send to last answer);
- percentiles are numpy's (linear interpolation) over successful requests.

Requests (serving.measure.workload) are fixed before the run and sent as token ids to
/v1/completions (exact input lengths), or as text to /v1/chat/completions. Closed loop, at most
a concurrency bound in flight; open loop, sent at the workload module's arrival times (vLLM's),
whether or not earlier answers came. Given an SLO, the run also reports goodput (requests/s
that met every bound, vLLM's `--goodput`) and whether its percentiles met it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flap_deploy.errors import FlapDeployError, ParameterError
from serving.measure.workload import SLO, BenchRequest, arrival_offsets, mean_lengths

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestResult:
    success: bool = False
    latency: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    output_tokens: int = 0
    generated_text: str = ""
    start_time: float = 0.0
    error: str = ""


# ------------------------------------------------------------------------------ one request


async def send_request(session: Any, url: str, model: str, req: BenchRequest, *, chat: bool, api_key: str | None,
                       ignore_eos: bool, temperature: float, extra_body: dict[str, Any] | None = None
                       ) -> RequestResult:
    """Send one streaming request and time its chunks (vLLM's request function, both endpoints)."""
    payload: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "temperature": temperature,
                               "stream": True, "stream_options": {"include_usage": True}}
    if chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
        payload["max_completion_tokens"] = req.output_len
    else:
        payload["prompt"] = req.prompt
    if ignore_eos:
        payload["ignore_eos"] = True
    payload.update(extra_body or {})
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = RequestResult(prompt_len=req.prompt_len)
    st = time.perf_counter()
    out.start_time = last = st
    first = False
    text = []
    try:
        async with session.post(url, json=payload, headers=headers) as resp:
            if resp.status != 200:
                body = await resp.text()
                out.error = f"HTTP {resp.status}: {body[:300]}"
                return out
            buffer = ""
            async for raw in resp.content.iter_any():
                buffer += raw.decode("utf-8", errors="replace")
                while "\n\n" in buffer:
                    message, buffer = buffer.split("\n\n", 1)
                    for line in message.splitlines():
                        if not line.startswith("data:"):
                            continue  # SSE comments / pings
                        data = line[5:].strip()
                        if data == "[DONE]":
                            continue
                        chunk = json.loads(data)
                        if "error" in chunk:
                            out.error = str(chunk["error"])
                            return out
                        if choices := chunk.get("choices"):
                            now = time.perf_counter()
                            if not first:
                                first, out.ttft = True, now - st
                            else:
                                out.itl.append(now - last)
                            last = now
                            c = choices[0]
                            text.append((c.get("delta") or {}).get("content") or "" if chat else c.get("text") or "")
                        if usage := chunk.get("usage"):
                            out.output_tokens = usage.get("completion_tokens") or 0
                            if usage.get("prompt_tokens") is not None:
                                out.prompt_len = usage["prompt_tokens"]
        out.generated_text = "".join(text)
        out.success = first
        if not first:
            out.error = "no chunk with a choice arrived"
        out.latency = last - st
    except Exception as e:  # network errors are results here, not crashes
        out.error = f"{type(e).__name__}: {e}"
    return out


# ------------------------------------------------------------------------------ a run


async def _run(url: str, model: str, requests: Sequence[BenchRequest], *, chat: bool, api_key: str | None,
               concurrency: int | None, request_rate: float, burstiness: float, seed: int, ignore_eos: bool,
               temperature: float, warmup: int, timeout_s: float, extra_body: dict[str, Any] | None, progress: bool
               ) -> tuple[list[RequestResult], float]:
    import aiohttp
    from tqdm import tqdm

    limit = concurrency or 0
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    kw = dict(chat=chat, api_key=api_key, ignore_eos=ignore_eos, temperature=temperature, extra_body=extra_body)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        sem = asyncio.Semaphore(concurrency) if concurrency else None

        async def send(req: BenchRequest) -> RequestResult:
            if sem is None:
                return await send_request(session, url, model, req, **kw)
            async with sem:
                return await send_request(session, url, model, req, **kw)

        # as in `vllm bench serve`: the first request, `warmup` times at once under the run's concurrency
        # bound. Not the first `warmup` requests: a server with prefix caching (vLLM's default) would
        # then answer that many of the measured prompts from its cache.
        warm = await asyncio.gather(*(send(requests[0]) for _ in range(warmup)))
        failed = next((r for r in warm if not r.success), None)
        if failed is not None:
            raise FlapDeployError(f"warm-up request failed: {failed.error}")
        bar = tqdm(total=len(requests), desc=f"bench c={concurrency or 'inf'} rate={request_rate}", disable=not progress)

        async def one(req: BenchRequest) -> RequestResult:
            r = await send(req)
            bar.update()
            return r

        # the schedule is drawn before the clock starts, and each send waits for its time from the start
        # rather than for a gap after the previous send, so lateness does not accumulate
        offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
        tasks = []
        start = time.perf_counter()
        for req, at in zip(requests, offsets):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration


def _stats(values: list[float], percentiles: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values or [0.0]) * 1000.0
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(arr, p))
    return out


def calculate_metrics(results: list[RequestResult], duration: float, tokenizer: Any = None,
                      percentiles: Sequence[float] = PERCENTILES, slo: SLO | None = None) -> dict[str, Any]:
    """Aggregate per-request results the way `vllm bench serve` does (times in ms); with an SLO, its
    percentiles are among those reported, and goodput and whether the run met it are added."""
    if slo is not None:
        percentiles = sorted(set(percentiles) | slo.percentiles)
    ok = [r for r in results if r.success]
    out_lens = []
    tpots, itls, ttfts, e2els = [], [], [], []
    for r in ok:
        n = r.output_tokens
        if not n:
            n = len(tokenizer.encode(r.generated_text, add_special_tokens=False)) if tokenizer else 1
        out_lens.append(n)
        if n > 1:
            tpots.append((r.latency - r.ttft) / (n - 1))
        itls += r.itl
        ttfts.append(r.ttft)
        e2els.append(r.latency)
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(out_lens)
    good = sum(slo.good(r, n) for r, n in zip(ok, out_lens)) if slo is not None else None
    errors: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = r.error.splitlines()[0][:120] if r.error else "unknown"
            errors[key] = errors.get(key, 0) + 1
    metrics = {
        "completed": len(ok), "failed": len(results) - len(ok), "errors": errors,
        "duration_s": duration, "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "ttft_ms": _stats(ttfts, percentiles), "tpot_ms": _stats(tpots, percentiles),
        "itl_ms": _stats(itls, percentiles), "e2el_ms": _stats(e2els, percentiles),
    }
    if slo is not None:
        # a failed request met no SLO: a run with failures does not meet it, whatever its percentiles
        metrics.update(slo=str(slo), good=good, request_goodput=good / duration,
                       slo_met=slo.met_by(metrics) and not metrics["failed"])
    return metrics


def resolve_endpoint(base_url: str, chat: bool) -> str:
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return base + ("/chat/completions" if chat else "/completions")


def model_cards(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> tuple[str, list[dict[str, Any]]]:
    """The endpoint's /v1/models URL and its model cards (at least one)."""
    import httpx

    url = resolve_endpoint(base_url, False).rsplit("/", 1)[0] + "/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.get(url, headers=headers, timeout=timeout, trust_env=False)
    except httpx.HTTPError as e:
        raise FlapDeployError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise FlapDeployError(f"{url} answered HTTP {r.status_code}: {r.text[:200]}")
    cards = r.json().get("data") or []
    if not cards:
        raise FlapDeployError(f"{url} lists no model")
    return url, cards


def served_model(base_url: str, api_key: str | None = None, timeout: float = 30.0) -> str:
    """The first model id listed by the endpoint's /v1/models."""
    return model_cards(base_url, api_key, timeout)[1][0]["id"]


def run_bench(base_url: str, requests: Sequence[BenchRequest], *, model: str | None = None,
              concurrency: Sequence[int | None] = (None,), request_rate: float = float("inf"),
              burstiness: float = 1.0, slo: SLO | None = None, workload: str | None = None,
              chat: bool = False, api_key: str | None = None, seed: int = 0, ignore_eos: bool = True,
              temperature: float = 0.0, warmup: int = 1, timeout_s: float = 600.0, tokenizer: Any = None,
              percentiles: Sequence[float] = PERCENTILES, extra_body: dict[str, Any] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run the workload once per concurrency level; return the settings and a result per level.

    concurrency: max requests in flight per run (None = unbounded). request_rate: arrivals per
    second, gamma gaps of shape ``burstiness`` (1: Poisson; inf rate = all at once, the concurrency
    bound then sets the load). ``workload`` names the requests' workload in the result.
    """
    api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    model = model or served_model(base_url, api_key)
    url = resolve_endpoint(base_url, chat)
    if slo is not None:
        percentiles = sorted(set(percentiles) | slo.percentiles)
    runs = []
    for level in concurrency:
        results, duration = asyncio.run(_run(
            url, model, requests, chat=chat, api_key=api_key, concurrency=level, request_rate=request_rate,
            burstiness=burstiness, seed=seed, ignore_eos=ignore_eos, temperature=temperature, warmup=warmup, timeout_s=timeout_s,
            extra_body=extra_body, progress=progress))
        metrics = calculate_metrics(results, duration, tokenizer, percentiles, slo)
        runs.append({"max_concurrency": level, "request_rate": request_rate, "burstiness": burstiness, **metrics,
                     "requests": [asdict(r) | {"generated_text": None} for r in results]})
    return {
        "base_url": base_url, "endpoint": url, "model": model, "num_prompts": len(requests), "workload": workload,
        **mean_lengths(requests),
        "slo": str(slo) if slo is not None else None,
        "seed": seed, "ignore_eos": ignore_eos, "temperature": temperature, "warmup": warmup,
        "percentiles": list(percentiles), "runs": runs,
    }


def server_tokenizer(base_url: str, tokenizer: str | None, model: str | None, api_key: str | None = None
                     ) -> tuple[Any, str]:
    """The tokenizer to build prompts with, and the model id to request.

    Without `tokenizer`, the model's `root` from /v1/models is used when it is a local
    directory (our server and vLLM both report the model path there).
    """
    from flap_deploy.io.model_ref import load_tokenizer

    api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    url, cards = model_cards(base_url, api_key)
    card = next((c for c in cards if c["id"] == model), None) if model else cards[0]
    if card is None:
        raise FlapDeployError(f"model {model!r} is not served at {url} (it serves {', '.join(c['id'] for c in cards)})")
    if tokenizer is None:
        root = card.get("root")
        if not root or not Path(root).is_dir():
            raise ParameterError("tokenizer", f"is needed: {url} reports no local model directory")
        tokenizer = root
    return load_tokenizer(tokenizer), card["id"]
