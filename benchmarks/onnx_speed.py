"""ONNX Runtime vs PyTorch eager, dense vs pruned: decode tokens/s and prefill latency.

Models: the bundled SmolLM2-135M (dense) and its 20 % FLAP-pruned version
(``benchmarks/flap_model.py``). Runtimes: ONNX Runtime fp32, ONNX Runtime int8 (blockwise
``MatMulNBits`` weights, ``--quantize int8``) and PyTorch eager fp32 (transformers, DynamicCache). Batch 1 and 8, the
same prompts (token ids) for every configuration, runs interleaved round-robin, medians
reported. Greedy decoding of a fixed number of tokens (EOS ignored).

    python benchmarks/onnx_speed.py [--work DIR] [--reps 5] [--threads 2]

Writes benchmarks/results/onnx.md and onnx.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # this checkout's packages, and flap_model


def _prompts(tokenizer, batch: int, length: int) -> np.ndarray:
    """``batch`` different prompts of exactly ``length`` tokens (WikiText-2 when present)."""
    from flap_model import WIKITEXT

    wikitext = WIKITEXT / "test.txt"
    if not wikitext.is_file():
        sys.exit(f"error: {wikitext} is missing (the prompts come from WikiText-2 test)")
    ids = tokenizer(wikitext.read_text()[:200_000])["input_ids"]
    return np.array([ids[i * 997: i * 997 + length] for i in range(batch)], dtype=np.int64)


class OrtRunner:
    def __init__(self, path: Path, threads: int):
        from exporters.onnx import OnnxCausalLM

        # No spinning: ORT's idle workers would otherwise spin into the next (PyTorch) run.
        self.lm = OnnxCausalLM.from_dir(path, threads=threads,
                                        session_config={"session.intra_op.allow_spinning": "0"})

    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[list[int]]]:
        lm = self.lm
        b, s = ids.shape
        mask = np.ones((b, s), dtype=np.int64)
        pos = np.tile(np.arange(s, dtype=np.int64), (b, 1))
        t0 = time.perf_counter()
        logits, past = lm.forward(ids, mask, pos, lm.empty_past(b))
        t1 = time.perf_counter()
        out = []
        for _ in range(new_tokens):
            tok = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
            out.append(tok[:, 0])
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            pos = pos[:, -1:] + 1
            logits, past = lm.forward(tok, mask, pos, past)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, np.stack(out, 1).tolist()


class TorchRunner:
    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.inference_mode()
    def run(self, ids: np.ndarray, new_tokens: int) -> tuple[float, float, list[list[int]]]:
        x = torch.from_numpy(ids)
        t0 = time.perf_counter()
        out = self.model(input_ids=x, use_cache=True)
        t1 = time.perf_counter()
        toks = []
        cache, logits = out.past_key_values, out.logits
        for _ in range(new_tokens):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(tok[:, 0])
            out = self.model(input_ids=tok, past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, torch.stack(toks, 1).tolist()


def prepare(work: Path, threads: int) -> dict:
    """Checkpoints and exports (reused when already in ``work``)."""
    from exporters.onnx.export import export_onnx, quantize_export
    from flap_model import flap_pruned_bundled

    from flap_deploy.io.model_ref import resolve_model

    dense_ref = resolve_model("smollm2-135m")
    pruned_ref = resolve_model(flap_pruned_bundled())
    dense = dense_ref.load(torch.float32)
    tokenizer = dense_ref.tokenizer()
    pruned = pruned_ref.load(torch.float32)
    dirs = {}
    for name, src in (("dense", dense_ref), ("pruned", pruned_ref)):
        fp32, int8 = work / f"{name}-fp32", work / f"{name}-int8"
        if not (fp32 / "flap_onnx.json").is_file():
            export_onnx(src, fp32, threads=threads, overwrite=True)
        if not (int8 / "flap_onnx.json").is_file():
            quantize_export(fp32, int8, threads=threads, overwrite=True)
        dirs[name] = {"fp32": fp32, "int8": int8}
    return {"tokenizer": tokenizer, "models": {"dense": dense, "pruned": pruned}, "dirs": dirs,
            "pruned_dir": str(pruned_ref.path),
            "decode_step_params": {"dense": dense_ref.decode_step_params(), "pruned": pruned_ref.decode_step_params()}}


def main() -> None:
    from flap_model import recipe
    from flap_deploy.io.bundled import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-onnx",
                    help="where the pruned checkpoint and the exports are kept (reused)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per configuration")
    ap.add_argument("--threads", type=int, default=2, help="threads for ORT and PyTorch")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    env = prepare(args.work, args.threads)
    runners = {}
    for name in ("dense", "pruned"):
        runners[(name, "ort-fp32")] = OrtRunner(env["dirs"][name]["fp32"], args.threads)
        runners[(name, "ort-int8")] = OrtRunner(env["dirs"][name]["int8"], args.threads)
        runners[(name, "torch-eager-fp32")] = TorchRunner(env["models"][name])
    prompts = {b: _prompts(env["tokenizer"], b, args.prompt_len) for b in args.batches}

    for key, r in runners.items():  # warm-up: allocators, ORT arenas, thread pools
        r.run(prompts[1], 4)
    raw = {f"{m}|{rt}|{b}": [] for (m, rt) in runners for b in args.batches}
    tokens = {}
    for rep in range(args.reps):
        for b in args.batches:
            for (m, rt), r in runners.items():  # interleaved: one run of each config per round
                prefill, decode, toks = r.run(prompts[b], args.new_tokens)
                raw[f"{m}|{rt}|{b}"].append({"prefill_s": prefill, "decode_s": decode})
                tokens[f"{m}|{rt}|{b}"] = toks
        print(f"round {rep + 1}/{args.reps} done", flush=True)

    rows = []
    for key, runs in raw.items():
        m, rt, b = key.split("|")
        b = int(b)
        prefill = statistics.median(x["prefill_s"] for x in runs)
        decode = statistics.median(x["decode_s"] for x in runs)
        rows.append({"model": m, "runtime": rt, "batch": b, "prefill_ms": 1000 * prefill,
                     "decode_tok_s": b * args.new_tokens / decode, "runs": len(runs)})
    get = {(r["model"], r["runtime"], r["batch"]): r for r in rows}
    ideal = env["decode_step_params"]["dense"] / env["decode_step_params"]["pruned"]  # as in `compare`
    ratios = []
    for rt in ("ort-fp32", "ort-int8", "torch-eager-fp32"):
        for b in args.batches:
            d, p = get[("dense", rt, b)], get[("pruned", rt, b)]
            r = p["decode_tok_s"] / d["decode_tok_s"]
            ratios.append({"runtime": rt, "batch": b, "pruned_over_dense": r, "of_ideal": r / ideal})
    speedups = []
    for m in ("dense", "pruned"):
        for b in args.batches:
            e = get[(m, "torch-eager-fp32", b)]["decode_tok_s"]
            for rt in ("ort-fp32", "ort-int8"):
                speedups.append({"model": m, "batch": b, "runtime": rt,
                                 "decode_speedup_vs_eager": get[(m, rt, b)]["decode_tok_s"] / e,
                                 "prefill_speedup_vs_eager": get[(m, "torch-eager-fp32", b)]["prefill_ms"]
                                 / get[(m, rt, b)]["prefill_ms"]})
    agree = {}
    for m in ("dense", "pruned"):
        for b in args.batches:
            ref = np.array(tokens[f"{m}|torch-eager-fp32|{b}"])
            for rt in ("ort-fp32", "ort-int8"):
                agree[f"{m}|{rt}|{b}"] = float((np.array(tokens[f"{m}|{rt}|{b}"]) == ref).mean())
    manifests = {m: {q: json.loads((env["dirs"][m][q] / "flap_onnx.json").read_text()) for q in ("fp32", "int8")}
                 for m in ("dense", "pruned")}
    result = {
        "setup": {"threads": args.threads, "reps": args.reps, "prompt_len": args.prompt_len,
                  "new_tokens": args.new_tokens, "batches": args.batches, "machine": platform.processor() or platform.machine(),
                  "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
                  "onnxruntime": __import__("onnxruntime").__version__,
                  "note": "interleaved round-robin runs, medians; greedy decode, EOS ignored; same token-id prompts; "
                          "ORT thread spinning off"},
        "pruned_model": env["pruned_dir"], "pruned_recipe": recipe(env["pruned_dir"]), "decode_step_params": env["decode_step_params"],
        "ideal_ratio": ideal,
        "rows": rows, "pruned_over_dense": ratios, "ort_vs_eager": speedups, "token_agreement_vs_eager": agree,
        "exports": {m: {q: {k: manifests[m][q].get(k) for k in ("export_seconds", "trace_seconds", "quantize_seconds",
                                                               "size_bytes", "graph_bytes", "verification")}
                        for q in ("fp32", "int8")} for m in ("dense", "pruned")},
        "raw": raw,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "onnx.md").write_text(render(result))
    print(render(result))


def render(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# ONNX Runtime speed: dense vs pruned SmolLM2-135M",
        "",
        f"Pruned model: `flap-deploy prune smollm2-135m` with the shipped defaults (`benchmarks/flap_model.py`, "
        f"`{Path(r['pruned_model']).name}`): {r.get('pruned_recipe') or 'recipe not recorded'}.",
        "",
        f"`python benchmarks/onnx_speed.py` - {s['threads']} threads, prompt {s['prompt_len']} tokens, "
        f"{s['new_tokens']} greedy tokens, {s['reps']} interleaved rounds, medians; "
        f"torch {s['torch']}, onnxruntime {s['onnxruntime']} (thread spinning off), {s['cpu_count']} CPUs.",
        "",
        "| model | runtime | batch | prefill ms | decode tok/s |",
        "|---|---|---:|---:|---:|",
    ]
    for row in sorted(r["rows"], key=lambda x: (x["batch"], x["runtime"], x["model"])):
        lines.append(f"| {row['model']} | {row['runtime']} | {row['batch']} | {row['prefill_ms']:.1f} | "
                     f"{row['decode_tok_s']:.1f} |")
    lines += ["", f"Ideal pruned/dense ratio (weights read per decode step, dense / pruned, as in `compare`): "
              f"**{r['ideal_ratio']:.3f}**", "", "| runtime | batch | pruned/dense decode tok/s | of ideal |",
              "|---|---:|---:|---:|"]
    for x in r["pruned_over_dense"]:
        lines.append(f"| {x['runtime']} | {x['batch']} | {x['pruned_over_dense']:.3f} | {x['of_ideal']:.2f} |")
    lines += ["", "| model | batch | runtime | decode speed-up vs eager | prefill speed-up vs eager |",
              "|---|---:|---|---:|---:|"]
    for x in r["ort_vs_eager"]:
        lines.append(f"| {x['model']} | {x['batch']} | {x['runtime']} | {x['decode_speedup_vs_eager']:.2f}x | "
                     f"{x['prefill_speedup_vs_eager']:.2f}x |")
    lines += ["", "Export figures (from each directory's flap_onnx.json):", "",
              "| model | graph | export s | size MB | max abs dlogit | rel. to range | greedy agreement |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for m, per in r["exports"].items():
        for q, e in per.items():
            v = (e.get("verification") or {}).get(q, {})
            secs = e.get("export_seconds") if q == "fp32" else e.get("quantize_seconds")
            lines.append(f"| {m} | {q} | {secs} | {e['size_bytes'] / 1e6:.1f} | {v.get('max_abs_logit_diff', float('nan')):.3g} | "
                         f"{v.get('relative_logit_diff', float('nan')):.2g} | {v.get('greedy_matches')}/{v.get('greedy_total')} |")
    lines += ["", "Greedy-token agreement with PyTorch eager in the timed runs: " + ", ".join(
        f"{k.replace('|', ' ')}: {v:.2f}" for k, v in r["token_agreement_vs_eager"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
