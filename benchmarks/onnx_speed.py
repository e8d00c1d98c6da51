"""ONNX Runtime decode speed: the gqa graph form vs past-present, dense vs FLAP-20 % pruned.

Models: the bundled SmolLM2-135M (dense) and its 20 % FLAP-pruned version
(``benchmarks/flap_model.py``). Runtimes: ONNX Runtime fp32 in each graph form
(``--forms``, ``exporters.onnx.contract.FORMS``), optionally blockwise int8 (``--int8``) and
PyTorch eager fp32 (``--eager``). For every context (prompt tokens, ``--contexts``) and batch
(``--batches``): the same prompts (token ids of WikiText-2 test, ``--text``) for every configuration, prefill
then ``--new-tokens`` greedy decode steps (EOS ignored) through the form's row cache
(``OnnxCausalLM.new_cache``: the gqa form decodes into IO-bound buffers in place, past-present
feeds each step's present back); runs interleaved round-robin, medians reported.

    python benchmarks/onnx_speed.py [--reps 5] [--threads 2] [--contexts 64 512 1536] [--batches 1 8]
    python benchmarks/onnx_speed.py --smoke     # one short round of everything, results not written

Writes benchmarks/results/onnx.md and onnx.json (``--out``). Exports are kept in ``--work``,
one directory per model, form (and its graph version) and weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # this checkout's packages, and flap_model

MODELS = ("dense", "pruned")
SMOKE = {"reps": 1, "contexts": [64], "batches": [1, 2], "new_tokens": 4}


def _prompts(tokenizer, text: Path, batch: int, length: int) -> list[list[int]]:
    """``batch`` different prompts of exactly ``length`` tokens of ``text``."""
    ids = tokenizer(text.read_text()[:400_000])["input_ids"]
    if (batch - 1) * 997 + length > len(ids):
        sys.exit(f"error: {text} is too short for {batch} prompts of {length} tokens")
    return [ids[i * 997: i * 997 + length] for i in range(batch)]


class OrtRunner:
    def __init__(self, path: Path, threads: int):
        from exporters.onnx import OnnxCausalLM

        # No spinning: ORT's idle workers would otherwise spin into the next configuration's run.
        self.lm = OnnxCausalLM.from_dir(path, threads=threads,
                                        session_config={"session.intra_op.allow_spinning": "0"})

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        rows = list(range(len(prompts)))
        # a cache made per run, as a server request batch would be; its allocation is not timed
        cache = self.lm.new_cache(len(rows), len(prompts[0]) + new_tokens)
        t0 = time.perf_counter()
        logits = np.stack(cache.prefill(rows, prompts, chunk_tokens=sum(map(len, prompts))))
        t1 = time.perf_counter()
        out = []
        for step in range(new_tokens):
            tokens = logits.argmax(-1)
            out.append(tokens)
            if step + 1 < new_tokens:
                logits = cache.decode(rows, tokens.tolist())
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, np.stack(out, 1).tolist()


class TorchRunner:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        x = torch.tensor(prompts)
        t0 = time.perf_counter()
        out = self.model(input_ids=x, use_cache=True)
        t1 = time.perf_counter()
        toks = []
        cache, logits = out.past_key_values, out.logits
        for step in range(new_tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok[:, 0])
            if step + 1 < new_tokens:
                out = self.model(input_ids=tok, past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, torch.stack(toks, 1).tolist()


def prepare(work: Path, forms: list[str], int8: bool, threads: int) -> dict:
    """Checkpoints and exports (reused when already in ``work``)."""
    from flap_model import flap_pruned_bundled

    from exporters.onnx.contract import FORMS
    from exporters.onnx.export import export_onnx, quantize_export
    from flap_deploy.io.model_ref import resolve_model

    refs = {"dense": resolve_model("smollm2-135m"), "pruned": resolve_model(flap_pruned_bundled())}
    dirs: dict[str, dict[str, Path]] = {}
    for name, ref in refs.items():
        dirs[name] = {}
        for form in forms:
            fp32 = work / f"{name}-{form}-{FORMS[form].version}-fp32"
            if not (fp32 / "flap_onnx.json").is_file():
                export_onnx(ref, fp32, threads=threads, overwrite=True, attention=form)
            dirs[name][f"ort-{form}-fp32"] = fp32
            if int8:
                q = fp32.with_name(fp32.name.replace("-fp32", "-int8"))
                if not (q / "flap_onnx.json").is_file():
                    quantize_export(fp32, q, threads=threads, overwrite=True)
                dirs[name][f"ort-{form}-int8"] = q
    return {"refs": refs, "dirs": dirs, "tokenizer": refs["dense"].tokenizer(),
            "decode_step_params": {m: ref.decode_step_params() for m, ref in refs.items()}}


def main() -> None:
    from exporters.onnx.contract import FORMS
    from flap_model import recipe
    from flap_deploy.io.bundled import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-onnx",
                    help="where the exports are kept (reused)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per configuration")
    ap.add_argument("--threads", type=int, default=2, help="threads for ORT and PyTorch")
    ap.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 1536], help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per run (decode steps + 1)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--forms", nargs="+", choices=list(FORMS), default=list(FORMS), help="ONNX graph forms")
    ap.add_argument("--int8", action="store_true", help="also each form's blockwise int8 export")
    ap.add_argument("--eager", action="store_true", help="also PyTorch eager fp32")
    ap.add_argument("--smoke", action="store_true",
                    help=f"a quick check that everything runs ({SMOKE}); results go to a temporary directory")
    ap.add_argument("--text", type=Path, default=None,
                    help="where the prompts come from (default: WikiText-2 test beside the checkout)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.text is None:
        from flap_model import WIKITEXT

        args.text = WIKITEXT / "test.txt"
    if not args.text.is_file():
        sys.exit(f"error: --text {args.text} is missing (the prompts come from it)")
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.out = Path(tempfile.mkdtemp(prefix="onnx_speed_smoke_"))
    if args.new_tokens < 2 or args.reps < 1 or min(args.contexts) < 1 or min(args.batches) < 1:
        sys.exit("error: --new-tokens >= 2, --reps >= 1 and positive --contexts / --batches are required")

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    env = prepare(args.work, args.forms, args.int8, args.threads)
    runners = {(m, rt): OrtRunner(d, args.threads) for m in MODELS for rt, d in env["dirs"][m].items()}
    if args.eager:
        for m in MODELS:
            runners[(m, "torch-eager-fp32")] = TorchRunner(env["refs"][m].load(torch.float32))
    runtimes = list(dict.fromkeys(rt for _, rt in runners))
    shapes = [(c, b) for c in args.contexts for b in args.batches]
    prompts = {(c, b): _prompts(env["tokenizer"], args.text, b, c) for c, b in shapes}

    for r in runners.values():  # warm-up: allocators, thread pools
        r.run(prompts[shapes[0]], 2)
    raw: dict[str, list[dict[str, float]]] = {}
    tokens = {}
    for rep in range(args.reps):
        for c, b in shapes:
            for (m, rt), r in runners.items():  # interleaved: one run of each configuration per round
                prefill, decode, toks = r.run(prompts[(c, b)], args.new_tokens)
                key = f"{m}|{rt}|{c}|{b}"
                raw.setdefault(key, []).append({"prefill_s": prefill, "decode_s": decode})
                tokens[key] = toks
        print(f"round {rep + 1}/{args.reps} done", flush=True)

    rows = []
    for key, runs in raw.items():
        m, rt, c, b = key.split("|")
        c, b = int(c), int(b)
        decode = statistics.median(x["decode_s"] for x in runs)
        rows.append({"model": m, "runtime": rt, "context": c, "batch": b,
                     "prefill_ms": 1000 * statistics.median(x["prefill_s"] for x in runs),
                     "decode_tok_s": b * (args.new_tokens - 1) / decode, "runs": len(runs)})
    get = {(r["model"], r["runtime"], r["context"], r["batch"]): r for r in rows}
    ideal = env["decode_step_params"]["dense"] / env["decode_step_params"]["pruned"]  # as in `compare`
    ratios = [{"runtime": rt, "context": c, "batch": b, "pruned_over_dense":
               get[("pruned", rt, c, b)]["decode_tok_s"] / get[("dense", rt, c, b)]["decode_tok_s"]}
              for rt in runtimes for c, b in shapes]
    for x in ratios:
        x["of_ideal"] = x["pruned_over_dense"] / ideal
    base = "ort-past-present-fp32"
    forms = [{"model": m, "runtime": rt, "context": c, "batch": b, "decode_speedup":
              get[(m, rt, c, b)]["decode_tok_s"] / get[(m, base, c, b)]["decode_tok_s"]}
             for m in MODELS for rt in runtimes if rt != base and (m, base) in runners for c, b in shapes]
    # the first runtime (gqa fp32 by default) is the reference of token agreement
    agree = {key: float((np.array(toks) == np.array(tokens["|".join([key.split("|")[0], runtimes[0],
                                                                      *key.split("|")[2:]])])).mean())
             for key, toks in tokens.items()}
    manifests = {m: {rt: json.loads((d / "flap_onnx.json").read_text()) for rt, d in env["dirs"][m].items()}
                 for m in MODELS}
    result = {
        "setup": {"threads": args.threads, "reps": args.reps, "contexts": args.contexts, "batches": args.batches,
                  "new_tokens": args.new_tokens, "smoke": args.smoke,
                  "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                  "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                  "note": "interleaved round-robin runs, medians; greedy decode, EOS ignored; same token-id prompts; "
                          "ORT thread spinning off; decode tok/s = batch x (new_tokens - 1) / decode seconds"},
        "pruned_model": str(env["refs"]["pruned"].path), "pruned_recipe": recipe(env["refs"]["pruned"].path),
        "decode_step_params": env["decode_step_params"],
        "ideal_ratio": ideal, "rows": rows, "pruned_over_dense": ratios, "vs_past_present": forms,
        "token_agreement": {"reference": runtimes[0], "by_run": agree},
        "exports": {m: {rt: {k: man.get(k) for k in ("attention", "export_seconds", "quantize_seconds", "size_bytes",
                                                      "verification")} for rt, man in per.items()}
                    for m, per in manifests.items()},
        "raw": raw,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "onnx.md").write_text(render(result))
    print(render(result))
    print(f"wrote {args.out / 'onnx.md'}", file=sys.stderr)


def render(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# ONNX Runtime decode speed: graph forms, dense vs pruned SmolLM2-135M",
        "",
        f"Pruned model: `flap-deploy prune smollm2-135m` with the shipped defaults (`benchmarks/flap_model.py`, "
        f"`{Path(r['pruned_model']).name}`): {r.get('pruned_recipe') or 'recipe not recorded'}.",
        "",
        f"`python benchmarks/onnx_speed.py` - {s['threads']} threads, contexts {s['contexts']}, batches "
        f"{s['batches']}, {s['new_tokens']} greedy tokens, {s['reps']} interleaved rounds, medians; "
        f"torch {s['torch']}, onnxruntime {s['onnxruntime']} (thread spinning off), {s['cpu_count']} CPUs."
        + (" **Smoke run: not a measurement.**" if s["smoke"] else ""),
        "",
        "| model | runtime | context | batch | prefill ms | decode tok/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in sorted(r["rows"], key=lambda x: (x["context"], x["batch"], x["runtime"], x["model"])):
        lines.append(f"| {row['model']} | {row['runtime']} | {row['context']} | {row['batch']} | "
                     f"{row['prefill_ms']:.1f} | {row['decode_tok_s']:.1f} |")
    if r["vs_past_present"]:
        lines += ["", "Decode speed-up over the past-present form:", "",
                  "| model | runtime | context | batch | decode speed-up |", "|---|---|---:|---:|---:|"]
        for x in r["vs_past_present"]:
            lines.append(f"| {x['model']} | {x['runtime']} | {x['context']} | {x['batch']} | "
                         f"{x['decode_speedup']:.2f}x |")
    lines += ["", f"Ideal pruned/dense ratio (weights read per decode step, dense / pruned, as in `compare`): "
              f"**{r['ideal_ratio']:.3f}**", "", "| runtime | context | batch | pruned/dense decode tok/s | of ideal |",
              "|---|---:|---:|---:|---:|"]
    for x in r["pruned_over_dense"]:
        lines.append(f"| {x['runtime']} | {x['context']} | {x['batch']} | {x['pruned_over_dense']:.3f} | "
                     f"{x['of_ideal']:.2f} |")
    lines += ["", "Export figures (from each directory's flap_onnx.json):", "",
              "| model | runtime | export s | size MB | max abs dlogit | rel. to range | greedy agreement |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for m, per in r["exports"].items():
        for rt, e in per.items():
            label = rt.rsplit("-", 1)[1]  # fp32 | int8: the verification entry
            v = (e.get("verification") or {}).get(label, {})
            secs = e.get("quantize_seconds") if label == "int8" else e.get("export_seconds")
            lines.append(f"| {m} | {rt} | {secs} | {e['size_bytes'] / 1e6:.1f} | "
                         f"{v.get('max_abs_logit_diff', float('nan')):.3g} | "
                         f"{v.get('relative_logit_diff', float('nan')):.2g} | "
                         f"{v.get('greedy_matches')}/{v.get('greedy_total')} |")
    agree = r["token_agreement"]
    lines += ["", f"Greedy-token agreement with {agree['reference']} in the timed runs: " + ", ".join(
        f"{k.replace('|', ' ')}: {v:.2f}" for k, v in agree["by_run"].items() if agree["reference"] not in k), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
