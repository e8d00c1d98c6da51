"""`flap-deploy bench` and `flap-deploy compare`: how fast an endpoint is, and dense vs pruned."""

from __future__ import annotations

import click

from serving.backends import BACKENDS, SERVER_MODES

from .common import (
    CliError,
    FlapCommand,
    at_revision,
    echo_json,
    int_list,
    json_option,
    overwrite_option,
    revision_option,
)

workload_option = click.option(
    "--workload", default="fixed:128,64", show_default=True,
    help="Request lengths: fixed:IN,OUT; lognormal:IN_MEDIAN,IN_SIGMA,OUT_MEDIAN,OUT_SIGMA or "
         "uniform:IN_MIN,IN_MAX,OUT_MIN,OUT_MAX (seeded; prompt tokens from --prompts); sharegpt:FILE (ShareGPT "
         "JSON) or custom:FILE (vllm bench serve's custom JSONL: a prompt per line, optional output_tokens).")
burstiness_option = click.option(
    "--burstiness", default=1.0, show_default=True, type=float,
    help="Open loop: shape of the gamma-distributed gaps between arrivals, as vllm bench serve (1: Poisson, "
         "below 1 burstier, inf: evenly spaced).")
slo_option = click.option(
    "--slo", default=None,
    help="Latency SLO, e.g. ttft_p99=500ms,tpot_p99=50ms: METRIC_pP=BOUND joined by commas, METRIC ttft, tpot, "
         "itl or e2el, P 50, 90 or 99, BOUND in ms or s. Adds goodput (requests/s that met every bound).")

# flap_deploy.pruning.synthetic.SHAPES' names, restated so that --help needs no torch (a test keeps them equal)
SYNTHETIC_SHAPES = ("llama2-7b", "llama2-13b", "llama3-8b", "mistral-7b", "qwen2.5-7b", "llama3.2-1b", "smollm2-135m")


@click.command(cls=FlapCommand)
@click.option("--base-url", default="http://127.0.0.1:8000/v1", show_default=True,
              help="The OpenAI-compatible endpoint (ours, vLLM's, anyone's).")
@click.option("--model", default=None, help="Model id to request (default: the first of /v1/models).")
@click.option("--tokenizer", default=None,
              help="Tokenizer (directory or bundled name) for prompts and counting; default: the model root the "
                   "server reports, when it is a local directory.")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True,
              help="completions sends token-id prompts (exact input lengths); chat sends the decoded text.")
@workload_option
@click.option("--prompts", default="self", show_default=True,
              help="Prompt tokens of a length workload: 'self' (seeded random tokens) or a text FILE (seeded "
                   "windows of its tokens).")
@click.option("--num-prompts", default=64, show_default=True, type=int, help="Requests per run.")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Ask the server to generate exactly each request's output length.")
@click.option("--concurrency", default=None,
              help="Comma-separated max concurrency levels, one run each (e.g. 1,4,16); default: unbounded.")
@click.option("--request-rate", default=float("inf"), type=float,
              help="Open loop: requests/s sent whether or not answers came (default inf: all at once, "
                   "closed loop under --concurrency).")
@burstiness_option
@slo_option
@click.option("--warmup", default=1, show_default=True, type=int,
              help="Warm-up requests per run: the first request this many times, at once under the run's "
                   "concurrency bound (as vllm bench serve; no measured prompt reaches a prefix cache first).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of prompts and arrival times.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="Sampling temperature sent.")
@click.option("--percentiles", default="50,90,99", show_default=True, help="Latency percentiles to report.")
@click.option("--api-key", default=None, envvar="OPENAI_API_KEY", help="Bearer key (env OPENAI_API_KEY).")
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Seconds per request at most.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write bench.json, bench.md and bench.png here.")
@overwrite_option
@json_option
def bench(base_url: str, model: str | None, tokenizer: str | None, endpoint: str, workload: str, prompts: str,
          num_prompts: int, ignore_eos: bool, concurrency: str | None, request_rate: float, burstiness: float,
          slo: str | None, warmup: int, seed: int, temperature: float, percentiles: str, api_key: str | None,
          timeout: float, out_dir: str | None, overwrite: bool, as_json: bool) -> None:
    """Load-test an OpenAI-compatible endpoint: throughput, goodput, TTFT, TPOT, ITL, end-to-end latency."""
    from serving.measure.bench import run_bench, server_tokenizer
    from serving.measure.bench_report import format_console, summary_rows, write_report
    from serving.measure.workload import check_arrivals, parse_slo, parse_workload

    wl = parse_workload(workload)
    slo_ = parse_slo(slo) if slo else None
    check_arrivals(request_rate, burstiness)
    if out_dir:
        from flap_deploy.io.atomic import check_output_dir

        check_output_dir(out_dir, overwrite)
    try:
        pcts = [float(p) for p in percentiles.split(",")]
    except ValueError:
        raise CliError(f"--percentiles {percentiles!r}: expected numbers like 50,90,99") from None
    levels = int_list(concurrency, "--concurrency")
    tok, model = server_tokenizer(base_url, tokenizer, model, api_key)
    chat = endpoint == "chat"
    reqs = wl.requests(tok, num_prompts, prompts=prompts, seed=seed, chat=chat)
    result = run_bench(base_url, reqs, model=model, concurrency=levels, request_rate=request_rate,
                       burstiness=burstiness, slo=slo_, workload=str(wl), chat=chat, api_key=api_key, seed=seed, ignore_eos=ignore_eos, temperature=temperature,
                       warmup=warmup, timeout_s=timeout, tokenizer=tok, percentiles=pcts, progress=not as_json)
    if out_dir:
        write_report(result, out_dir, overwrite)
    if as_json:
        echo_json(summary_rows(result))
        return
    click.echo(format_console(result))
    if out_dir:
        click.echo(f"wrote {out_dir}/bench.json, bench.md, bench.png")


@click.command(cls=FlapCommand)
@click.argument("dense", required=False)
@click.argument("pruned", required=False)
@revision_option
@click.option("--backend", type=click.Choice(tuple(BACKENDS)), default=None,
              help="Server runtime for both models (see serve): the first installed of " + ", ".join(BACKENDS) + ".")
@click.option("--synthetic", default=None, type=click.Choice(SYNTHETIC_SHAPES),
              help="Instead of DENSE and PRUNED: a dense and a FLAP-shaped pruned checkpoint of this architecture's "
                   "shapes with random weights (vllm --load-format dummy).")
@click.option("--ratio", default=0.2, show_default=True, type=float,
              help="--synthetic: fraction of decoder linear weights the pruned shapes remove.")
@click.option("--tp-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="--synthetic: align the pruned widths to this tensor-parallel size.")
@click.option("--vllm-arg", "extra_args", multiple=True,
              help="Extra argument for both vLLM servers (repeatable), e.g. --vllm-arg=--enforce-eager; the "
                   "pass-through arguments of `serve ... -- ARGS`.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for report.json, report.md, throughput.png, latency.png (with --capacity: "
                   "capacity.json, capacity.md, capacity.png).")
@click.option("--concurrency", default="1,4,8", show_default=True,
              help="Comma-separated max concurrency levels (closed loop; not with --capacity).")
@click.option("--num-prompts", default=32, show_default=True, type=int,
              help="Requests per level (with --capacity: per rate).")
@workload_option
@slo_option
@click.option("--capacity", is_flag=True,
              help="Instead of concurrency levels: find each model's capacity, the highest open-loop request rate "
                   "at which --slo holds (needs --slo), and report capacities, their ratio, KV-cache figures, the "
                   "weight-only and the full ideal, and rate-latency curves.")
@burstiness_option
@click.option("--rate-start", default=1.0, show_default=True, type=float,
              help="--capacity: the first rate tried (req/s); the grid is RATE_START x (1 + RESOLUTION)^k.")
@click.option("--rate-min", default=0.05, show_default=True, type=float,
              help="--capacity: no lower rate is tried (a model failing there has no capacity).")
@click.option("--rate-max", default=256.0, show_default=True, type=float,
              help="--capacity: no higher rate is tried (a capacity there is reported as 'at least').")
@click.option("--resolution", default=0.1, show_default=True, type=float,
              help="--capacity: the grid's relative step; the knee lies within this fraction above the capacity.")
@click.option("--budget", default=1800.0, show_default=True, type=float,
              help="--capacity: seconds per model after which no further rate is measured.")
@click.option("--fleet-load", default=100.0, show_default=True, type=float,
              help="--capacity: the load (req/s) the report's replica counts are for.")
@click.option("--repeats", default=2, show_default=True, type=int,
              help="Interleaved repeats (dense, pruned, pruned, dense, ...); medians are reported. With "
                   "--capacity: runs per rate, which meets the SLO only when every run does.")
@click.option("--servers", type=click.Choice(SERVER_MODES), default="auto", show_default=True,
              help="together: start both servers first and keep them up for every repeat (one is under load "
                   "at a time; saves a start per repeat); in-turn: a fresh server per model and repeat, for "
                   "accelerators where two engines do not fit. auto: together for onnx and vllm-cpu, else in-turn.")
@click.option("--prompts", default="self", show_default=True,
              help="Prompt tokens of a length workload: 'self' or a text FILE (see bench).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the prompts.")
@click.option("--warmup", default=2, show_default=True, type=int,
              help="Warm-up requests per server and level (the first request repeated); at least the level's "
                   "concurrency, so the full batch has run once (0: none).")
@click.option("--max-num-seqs", default=8, show_default=True, type=int, help="Server batch bound (both models).")
@click.option("--max-model-len", default=None, type=int, help="Server context length (both models).")
@click.option("--threads", default=None, type=int, help="onnx: ONNX Runtime threads.")
@click.option("--eval-text", default=None, type=click.Path(exists=True),
              help="Also report perplexity, KL and top-1 agreement on this text.")
@click.option("--eval-max-tokens", default=16384, show_default=True, type=int, help="Tokens of --eval-text to use.")
@overwrite_option
@json_option
def compare(dense: str | None, pruned: str | None, revision: str | None, synthetic: str | None, ratio: float,
            tp_size: int, concurrency: str, capacity: bool, burstiness: float, rate_start: float, rate_min: float,
            rate_max: float, resolution: float, budget: float, fleet_load: float, as_json: bool, **settings) -> None:
    """Serve DENSE and PRUNED on the same settings, run the same workload on each, report measured vs ideal.

    With --capacity, find the highest request rate at which each meets --slo instead. The measured
    speed-up is added to PRUNED's model card (README.md) when PRUNED is a local pruned checkpoint or an
    export with a card; a Hub snapshot and a synthetic pair are left as they are."""
    from serving.measure.compare import compare as run_compare
    from serving.measure.compare import synthetic_pair
    from serving.measure.workload import parse_slo, parse_workload

    settings["workload"] = parse_workload(settings["workload"])
    settings["slo"] = parse_slo(settings["slo"]) if settings["slo"] else None
    if capacity:
        from serving.measure.capacity import CapacitySearch, check_capacity_args

        search = CapacitySearch(start=rate_start, min_rate=rate_min, max_rate=rate_max, resolution=resolution,
                                budget_s=budget)
        check_capacity_args(settings["slo"], burstiness, settings["repeats"], fleet_load)
    else:
        levels = [c for c in int_list(concurrency, "--concurrency") if c is not None]
        if not levels:
            raise CliError(f"--concurrency {concurrency!r}: give at least one positive level")
    if synthetic:
        if dense or pruned or revision:
            raise CliError("--synthetic builds its own DENSE and PRUNED: give neither (nor --revision)")
        dense, pruned, settings["extra_args"] = synthetic_pair(synthetic, ratio=ratio, tp_size=tp_size,
                                                               seed=settings["seed"], backend=settings["backend"],
                                                               extra_args=settings["extra_args"])
    elif dense and pruned:
        dense, pruned = at_revision(revision, dense, pruned, out=settings["out_dir"], overwrite=settings["overwrite"])
    else:
        raise CliError("compare needs DENSE and PRUNED (or --synthetic NAME)")
    if capacity:
        _capacity(dense, pruned, settings, search, burstiness, fleet_load, as_json)
        return
    report = run_compare(dense, pruned, concurrency=levels, progress=not as_json, **settings)
    if as_json:
        echo_json({"weights": report["weights"], "ratios": report["ratios"], "quality": report["quality"],
                   "card": report.get("card")})
        return
    click.echo(f"ideal ratio (weight bytes per decode step): {report['weights']['ideal_ratio']:.3f}")
    for r in report["ratios"]:
        click.echo(f"concurrency {r['max_concurrency']}: output throughput x{r['output_throughput_ratio']:.3f}, "
                   f"TPOT x{r['tpot_ratio']:.3f}")
    click.echo(f"wrote {settings['out_dir']}/report.md, report.json, throughput.png, latency.png")
    if report.get("card"):
        click.echo(f"added the speed-up to the model card {report['card']}")


# compare's closed-loop settings, which a capacity search does not take
_CLOSED_LOOP_ONLY = ("servers", "eval_text", "eval_max_tokens")


def _capacity(dense: str, pruned: str, settings: dict, search, burstiness: float, fleet_load: float,
              as_json: bool) -> None:
    from serving.measure.capacity import compare_capacity

    report = compare_capacity(dense, pruned, search=search, burstiness=burstiness, fleet_load=fleet_load,
                              progress=not as_json,
                              **{k: v for k, v in settings.items() if k not in _CLOSED_LOOP_ONLY})
    if as_json:
        echo_json({k: report[k] for k in ("capacity_ratio", "kv", "sentence")}
                  | {"capacity": {n: c["capacity"] for n, c in report["capacity"].items()}})
        return
    for name, c in report["capacity"].items():
        click.echo(f"{name}: capacity {c['capacity']} req/s at {report['workload']['slo']} "
                   f"({len(c['points'])} rates measured)")
    click.echo(report["sentence"])
    click.echo(f"wrote {settings['out_dir']}/capacity.md, capacity.json, capacity.png")
