"""vLLM offline throughput of the plugin model with and without the fused add + RMSNorm (paired runs).

    PYTHONPATH=. python benchmarks/fused_norm.py [--pairs 3] [--model DIR] [--dtype bfloat16]

The model (default: the bundled SmolLM2-135M pruned 20 % by FLAP, ``benchmarks/flap_model.py``)
runs through ``serving.vllm.offline`` twice per pair, in fresh interpreters: once from this
checkout (fused: every norm is ``RMSNorm(x, residual)``), once from a copy of its packages in
which ``add_norm`` is the plain path (``residual = residual + x; x = norm(residual)``), which is
what the model did before the fused norm. Nothing else differs. The order alternates (fused,
plain, plain, fused, ...) so drift in the machine falls on both sides.

Writes benchmarks/results/fused_norm.{json,md}. Run alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from flap_model import flap_pruned_bundled, recipe  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PACKAGES = ("flap_deploy", "exporters", "serving")
FUSED = '''    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)
'''
PLAIN = '''    residual = hidden_states if residual is None else residual + hidden_states
    return norm(residual), residual
'''


def plain_copy(dst: Path) -> Path:
    """This checkout's packages with ``add_norm`` unfused; the model logs that it is the plain variant."""
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    model = dst / "exporters" / "vllm" / "model.py"
    text = model.read_text()
    if FUSED not in text:
        raise SystemExit(f"{model}: add_norm is not the expected fused body; update this benchmark")
    model.write_text(text.replace(FUSED, PLAIN).replace('"FlapLlamaForCausalLM built', '"FlapLlamaForCausalLM (plain adds) built'))
    return dst


def run(root: Path, request: dict, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    (work / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, PYTHONPATH=str(root), VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    proc = subprocess.run([sys.executable, "-m", "serving.vllm.offline", str(work / "request.json"),
                           str(work / "result.json")], cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"vLLM offline run failed ({root}):\n{proc.stderr[-4000:]}")
    built = [line for line in (proc.stdout + proc.stderr).splitlines() if "FlapLlamaForCausalLM" in line and "built" in line]
    result = json.loads((work / "result.json").read_text())
    result["plain"] = any("(plain adds)" in line for line in built)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the FLAP-pruned bundled model)")
    ap.add_argument("--pairs", type=int, default=3, help="fused/plain pairs, order alternating")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=32, help="prompts decoding together (32 random tokens each)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fused-norm-"))
    model = args.model or flap_pruned_bundled()
    roots = {"fused": REPO, "plain": plain_copy(work / "plain")}
    request = {"model": str(model), "prompts": [[1, 2, 3]], "max_tokens": 1, "dtype": args.dtype,
               "max_model_len": 512, "prompt_logprobs": False, "throughput_prompts": args.prompts,
               "throughput_tokens": args.new_tokens}
    runs: dict[str, list[dict]] = {"fused": [], "plain": []}
    for i in range(args.pairs):
        for variant in (("fused", "plain") if i % 2 == 0 else ("plain", "fused")):
            print(f"pair {i + 1}/{args.pairs}: {variant}", file=sys.stderr, flush=True)
            r = run(roots[variant], request, work / f"{variant}-{i}")
            if r["plain"] != (variant == "plain"):
                raise SystemExit(f"the {variant} run did not load the {variant} model (check PYTHONPATH)")
            runs[variant].append({"tokens_per_s": r["throughput"]["tokens_per_s"], "engine_start_s": r["engine_start_s"]})
    ratios = [f["tokens_per_s"] / p["tokens_per_s"] for f, p in zip(runs["fused"], runs["plain"])]
    data = {"model": str(model), "recipe": recipe(model) if (Path(model) / "config.json").is_file() else None,
            "dtype": args.dtype, "prompts": args.prompts, "new_tokens": args.new_tokens,
            "runs": runs, "fused_over_plain": ratios, "median_fused_over_plain": statistics.median(ratios),
            "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                        "load_average_end": os.getloadavg()},
            "command": "PYTHONPATH=. python benchmarks/fused_norm.py " + " ".join(sys.argv[1:])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fused_norm.json").write_text(json.dumps(data, indent=2) + "\n")
    (args.out / "fused_norm.md").write_text(report(data))
    print(report(data))


def report(d: dict) -> str:
    rows = "\n".join(f"| {i + 1} | {f['tokens_per_s']:.1f} | {p['tokens_per_s']:.1f} | {r:.3f} |"
                     for i, (f, p, r) in enumerate(zip(d["runs"]["fused"], d["runs"]["plain"], d["fused_over_plain"])))
    return f"""# Fused add + RMSNorm vs plain residual adds (vLLM offline)

`{Path(d['model']).name}`{": " + d["recipe"] if d.get("recipe") else ""}; served as {d['dtype']}, {d['prompts']} prompts x (32 + {d['new_tokens']}) tokens decoding together,
vllm-cpu, enforce_eager, {d['machine']['cpus']} CPUs; load average at the end {d['machine']['load_average_end'][0]:.2f}.
Command: `{d['command']}`.

| pair | fused tokens/s | plain tokens/s | fused ÷ plain |
|---|---|---|---|
{rows}

Median fused ÷ plain: **{d['median_fused_over_plain']:.3f}**.
"""


if __name__ == "__main__":
    main()
