"""Soak test of the ONNX Runtime server: N concurrent streaming clients for T minutes.

    python benchmarks/soak.py [MODEL] --clients 64 --minutes 5 [--invalid 0.1] [--disconnect 0.1]

MODEL (default `smollm2-135m`, exported once by `ensure_onnx` in the `--attention` graph form,
default gqa: the KV cache is one preallocated slot buffer per layer, so RSS should stay flat)
is served by the ONNX backend's entry point (`python -m serving.onnx SETTINGS`, through
`serving.backends`) in a subprocess on 127.0.0.1. Each client loops:
with probability `--invalid` it sends a request drawn from a set of invalid ones (each must
get a 4xx in OpenAI's error shape), with probability `--disconnect` it starts a stream and
hangs up after a few chunks, otherwise it streams a valid completion to `[DONE]`. The
server's RSS is sampled every second. Written to benchmarks/results/soak.{md,json,png}:
completed requests, outcomes by class (expected 4xx by status, disconnects, *unexpected*:
5xx, transport errors, streams that end without `[DONE]` or carry an error event), RSS start /
peak / end and growth after warm-up (the first quarter of the run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import socket
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flap_deploy.streaming.memory import rss_bytes  # noqa: E402

WORDS = ("the river city light market winter story people garden music old new small great "
         "morning evening house road field water").split()

# (name, body or raw bytes): each must be refused with a 4xx in OpenAI's shape
INVALID = [
    ("negative_temperature", {"prompt": "Hi", "max_tokens": 4, "temperature": -1}),
    ("zero_max_tokens", {"prompt": "Hi", "max_tokens": 0}),
    ("too_long", {"prompt": "Hi", "max_tokens": 10**6}),
    ("seed_out_of_range", {"prompt": "Hi", "max_tokens": 4, "seed": 2**70}),
    ("unknown_model", {"model": "no-such-model", "prompt": "Hi", "max_tokens": 4}),
    ("n_beyond_queue", {"prompt": ["Hi"] * 200, "n": 16, "max_tokens": 1}),
    ("bad_json", b"{not json"),
    ("deep_json", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("empty_prompt", {"prompt": "", "max_tokens": 4}),
    ("bad_token_id", {"prompt": [10**9], "max_tokens": 4}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))


async def client(i: int, url: str, until: float, args, stats: collections.Counter, seed: int) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120)) as http:
        while time.monotonic() < until:
            draw = rng.random()
            try:
                if draw < args.invalid:
                    name, body = rng.choice(INVALID)
                    r = await (http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
                               if isinstance(body, bytes) else http.post("/v1/completions", json=body))
                    ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) >= {"message", "type"}
                    stats[f"invalid_{r.status_code}" if ok else f"UNEXPECTED_invalid_{name}_{r.status_code}"] += 1
                    continue
                hang_up = draw < args.invalid + args.disconnect
                body = {"prompt": prompt(rng), "max_tokens": rng.randint(8, args.max_tokens), "stream": True,
                        "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 1000)}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    if r.status_code == 503:
                        stats["overloaded_503"] += 1  # transient by contract; counted, not an error
                        await asyncio.sleep(0.5)
                        continue
                    if r.status_code != 200:
                        stats[f"UNEXPECTED_status_{r.status_code}"] += 1
                        continue
                    chunks, done, error = 0, False, False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                        elif '"error"' in line[:20]:
                            error = True
                        chunks += 1
                        if hang_up and chunks >= 2:
                            break
                    if hang_up:
                        stats["disconnected"] += 1
                    elif error:
                        stats["UNEXPECTED_error_event"] += 1
                    elif done:
                        stats["completed"] += 1
                    else:
                        stats["UNEXPECTED_no_done"] += 1
            except httpx.HTTPError as e:
                stats[f"UNEXPECTED_transport_{type(e).__name__}"] += 1


async def sample_rss(pid: int, until: float, series: list[tuple[float, int]], t0: float) -> None:
    while time.monotonic() < until:
        try:
            series.append((time.monotonic() - t0, rss_bytes(pid)))
        except OSError:
            return
        await asyncio.sleep(1.0)


async def soak(url: str, pid: int, args) -> tuple[collections.Counter, list[tuple[float, int]], float]:
    stats: collections.Counter = collections.Counter()
    series: list[tuple[float, int]] = []
    t0 = time.monotonic()
    until = t0 + args.minutes * 60
    await asyncio.gather(sample_rss(pid, until, series, t0),
                         *(client(i, url, until, args, stats, args.seed * 1000 + i) for i in range(args.clients)))
    series.append((time.monotonic() - t0, rss_bytes(pid)))
    return stats, series, time.monotonic() - t0


def report(stats, series, elapsed, args, out: Path) -> dict:
    gib = 1 << 30
    rss = [b for _, b in series]
    warm = [b for t, b in series if t >= elapsed / 4] or rss
    unexpected = {k: v for k, v in stats.items() if k.startswith("UNEXPECTED")}
    result = {
        "model": args.model, "attention": args.attention, "clients": args.clients, "minutes": args.minutes, "invalid": args.invalid,
        "disconnect": args.disconnect, "max_tokens": args.max_tokens, "seconds": round(elapsed, 1),
        "requests": sum(stats.values()), "completed": stats["completed"], "outcomes": dict(sorted(stats.items())),
        "unexpected_errors": sum(unexpected.values()),
        "rss_gib": {"start": round(rss[0] / gib, 3), "peak": round(max(rss) / gib, 3), "end": round(rss[-1] / gib, 3),
                    "after_warmup_first": round(warm[0] / gib, 3),
                    "growth_after_warmup": round((warm[-1] - warm[0]) / gib, 3)},
        "rss_series": [(round(t, 1), b) for t, b in series],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result["rss_gib"]
    lines = [f"# Soak: {args.clients} streaming clients, {args.minutes:g} min, {args.model} ({args.attention} form)", "",
             f"{args.invalid:.0%} invalid requests, {args.disconnect:.0%} disconnects, max_tokens up to "
             f"{args.max_tokens}; {result['seconds']} s.", "",
             "| outcome | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(stats.items())]
    lines += ["", f"Requests {result['requests']}, completed {result['completed']}, unexpected errors "
                  f"**{result['unexpected_errors']}**.", "",
              f"RSS (GiB): start {r['start']}, peak {r['peak']}, end {r['end']}; after warm-up "
              f"{r['after_warmup_first']} -> {r['end']} (growth {r['growth_after_warmup']}).", ""]
    (out / "soak.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t for t, _ in series], [b / gib for _, b in series])
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (GiB)")
    ax.set_title(f"soak: {args.clients} clients, {result['completed']} completed, "
                 f"{result['unexpected_errors']} unexpected")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=120)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--attention", choices=("gqa", "past-present"), default="gqa",
                    help="ONNX graph form of the export (exporters.onnx.contract.FORMS)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--invalid", type=float, default=0.1)
    ap.add_argument("--disconnect", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()

    from exporters.onnx.export import ensure_onnx

    model_dir = ensure_onnx(args.model, attention=args.attention)  # exported once, outside the timed run
    import tempfile

    from flap_deploy.errors import FlapDeployError
    from serving.backends import BACKENDS

    onnx = BACKENDS["onnx"]  # the soak probes the built-in server
    settings = onnx.settings_for(model_dir, port=free_port(), max_num_seqs=args.max_num_seqs,
                                 max_queue=args.max_queue, max_model_len=2048, threads=args.threads)
    url = settings.base_url
    with tempfile.NamedTemporaryFile("w", prefix="soak-server-", suffix=".log", delete=False) as log:
        print(f"server log: {log.name}", file=sys.stderr)
        server = onnx.process(settings, name="soak server", log=log)
        server.start()
        try:
            try:
                server.wait_ready(timeout=300)
            except FlapDeployError as e:
                raise SystemExit(f"the server did not start: {e}") from None
            stats, series, elapsed = asyncio.run(soak(url, server.proc.pid, args))
            alive = server.proc.poll() is None and httpx.get(url + "/health", timeout=5).status_code == 200
            if not alive:
                stats["UNEXPECTED_server_unhealthy_at_end"] += 1
        finally:
            server.stop(grace=60)
    result = report(stats, series, elapsed, args, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_series"}, indent=2))
    return 1 if result["unexpected_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
