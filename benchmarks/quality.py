"""Quality of FLAP and the baselines on the bundled SmolLM2-135M, and the cost of pruning.

Calibration: WikiText-2 valid (random windows of --seqlen tokens); evaluation: the first
--max-tokens tokens of WikiText-2 test in windows of 512: perplexity, and mean KL(dense||pruned)
and top-1 agreement against the dense model on the same positions. Every pruned model is
evaluated window by window beside the dense one, so the dense logits are computed once.

Cost: wall time and peak RSS of one FLAP 20 % prune (calibration included), against the time of
one dense forward of the decoder over the same calibration windows (the work calibration cannot
avoid). The FLAP variants that share the calibration set reuse its statistics.

    python benchmarks/quality.py [--nsamples 128] [--max-tokens 40000] [--out benchmarks/results]

Results are rewritten after every evaluation batch, so an interrupted run leaves partial figures
(the token count says how far it got).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flap_deploy import PruneConfig, __version__, prune  # noqa: E402
from flap_deploy.evaluate import Tally, log_probs, token_windows  # noqa: E402
from flap_deploy.model_ref import load_model, load_tokenizer  # noqa: E402
from flap_deploy.pruning import linear_weights  # noqa: E402
from flap_deploy.text import load_text  # noqa: E402

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def dense_forward_s(model, calib_ids: torch.Tensor, batch_size: int) -> float:
    """Time of one dense decoder forward (no lm_head) over the calibration windows."""
    t = time.perf_counter()
    for s in range(0, len(calib_ids), batch_size):
        model.model(input_ids=calib_ids[s:s + batch_size], use_cache=False)
    return time.perf_counter() - t


def runs(calib: str, n: int, seqlen: int) -> list[tuple[str, dict]]:
    base = dict(calib=calib, nsamples=n, seqlen=seqlen, progress=True)
    return [
        ("FLAP 20 %", dict(base, ratio=0.2)),
        ("FLAP 30 %", dict(base, ratio=0.3)),
        ("FLAP 50 %", dict(base, ratio=0.5)),
        ("FLAP 20 % no bias", dict(base, ratio=0.2, bias=False)),
        ("FLAP 20 % head granularity", dict(base, ratio=0.2, attn_granularity="head")),
        ("FLAP 20 % --calib self", dict(base, ratio=0.2, calib="self")),
        ("Wanda-sp 20 %", dict(base, ratio=0.2, method="wanda-sp")),
        ("mag-sp 20 %", dict(base, ratio=0.2, method="mag-sp")),
    ]


def write(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(data, indent=2) + "\n")
    rows = data["models"]
    lines = [
        "# Quality: FLAP vs baselines on SmolLM2-135M",
        "",
        f"Calibration: WikiText-2 valid, {data['calibration']['nsamples']} windows x {data['calibration']['seqlen']} "
        f"tokens, seed 0. Evaluation: first {data['eval']['tokens_evaluated']:,} predicted tokens of WikiText-2 test "
        f"(target {data['eval']['max_tokens']:,}), windows of {data['eval']['seqlen']}. KL = mean KL(dense || pruned) "
        "per token; top-1 = agreement of the argmax with the dense model. Ratio = share of decoder linear weights removed.",
        "",
        "| model | ratio | params | perplexity | KL | top-1 | prune time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") else "-"
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "-"
        top1 = f"{100 * r['top1']:.2f} %" if r.get("top1") is not None else "-"
        lines.append(f"| {r['name']} | {100 * r['achieved_ratio']:.2f} % | {r['params'] / 1e6:.1f} M | {ppl} | {kl} | "
                     f"{top1} | {r['prune_s']:.1f} |" if r.get("prune_s") is not None else
                     f"| {r['name']} | {100 * r['achieved_ratio']:.2f} % | {r['params'] / 1e6:.1f} M | {ppl} | {kl} | {top1} | - |")
    c = data["cost"]
    lines += [
        "",
        "## Cost of pruning (FLAP 20 %, calibration included)",
        "",
        f"- prune wall time: {c['prune_s']:.1f} s (tokenizing the calibration text, layer-by-layer calibration, "
        "scoring, allocation, compression)",
        f"- one dense decoder forward over the same {data['calibration']['nsamples']} calibration windows: "
        f"{c['dense_forward_s']:.1f} s (mean of one before and one after the prune: {c['dense_forward_runs_s']})",
        f"- prune / dense forward: **{c['prune_over_dense_forward']:.2f}**",
        f"- peak RSS of the process at the end of the prune: {c['peak_rss_mib']:.0f} MiB (after loading the model: "
        f"{c['rss_after_load_mib']:.0f} MiB; the dense forward timed before the prune is included)",
        "",
        f"Machine: {data['machine']}. Shared CPU: other processes ran at the same time, so wall times are "
        "indicative; the ratio compares runs made back to back.",
    ]
    if data.get("granularity"):
        g = data["granularity"]
        lines += ["", f"Attention granularity at 20 %: group {g['group_perplexity']:.2f} vs head "
                      f"{g['head_perplexity']:.2f} perplexity; **{g['winner']}** wins (the default is group)."]
    (out / "quality.md").write_text("\n".join(lines) + "\n")


def summarize_granularity(data: dict) -> None:
    group, head = (next(r for r in data["models"] if r["name"] == n) for n in ("FLAP 20 %", "FLAP 20 % head granularity"))
    data["granularity"] = {"group_perplexity": group["perplexity"], "head_perplexity": head["perplexity"],
                           "group_kl": group["kl"], "head_kl": head["kl"],
                           "winner": "head" if head["perplexity"] < group["perplexity"] else "group"}


def plot(out: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["models"] if r.get("perplexity")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in rows]
    colors = ["#7f7f7f" if r["name"] == "dense" else "#3b75af" if r["name"].startswith("FLAP") else "#d62728"
              for r in rows]
    axes[0].barh(names, [r["perplexity"] for r in rows], color=colors)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("WikiText-2 test perplexity (log scale)")
    axes[0].invert_yaxis()
    flap = sorted([r for r in rows if r["name"] in ("FLAP 20 %", "FLAP 30 %", "FLAP 50 %", "dense")],
                  key=lambda r: r["achieved_ratio"])
    axes[1].plot([100 * r["achieved_ratio"] for r in flap], [r["perplexity"] for r in flap], "o-", label="FLAP (AL-AM)")
    for r in rows:
        if r["name"].startswith(("Wanda", "mag")):
            axes[1].plot(100 * r["achieved_ratio"], r["perplexity"], "s", label=r["name"])
    axes[1].set_yscale("log")
    axes[1].set_xlabel("decoder linear weights removed (%)")
    axes[1].set_ylabel("perplexity")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M on WikiText-2 ({data['eval']['tokens_evaluated']:,} test tokens)")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=40_000)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--replot", action="store_true", help="Only rewrite quality.md and quality.png from quality.json.")
    args = ap.parse_args()
    if args.replot:  # e.g. after an interrupted run
        data = json.loads((args.out / "quality.json").read_text())
        summarize_granularity(data)
        write(args.out, data)
        plot(args.out, data)
        return
    torch.set_num_threads(args.threads)

    dense = load_model("smollm2-135m", dtype=torch.float32)
    tok = load_tokenizer("smollm2-135m")
    rss_after_load = rss_mib()
    valid = str(WIKITEXT / "valid.txt")
    data = {
        "package_version": __version__, "torch": torch.__version__, "threads": args.threads,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "calibration": {"source": "wikitext-2 valid", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "eval": {"text": "wikitext-2 test", "max_tokens": args.max_tokens, "seqlen": args.eval_seqlen,
                 "tokens_evaluated": 0},
        "models": [], "cost": {},
    }
    dense_linear = linear_weights(dense)
    models = {"dense": dense}
    data["models"].append({"name": "dense", "achieved_ratio": 0.0, "params": sum(p.numel() for p in dense.parameters()),
                           "linear_weights": dense_linear, "prune_s": None})

    # Cost: dense forward, the timed FLAP prune, dense forward again (the machine is shared).
    first = None
    stats = None
    forward_runs = []
    for name, kw in runs(valid, args.nsamples, args.seqlen):
        if first is None:
            from flap_deploy.calibration import calibration_windows

            calib = calibration_windows(valid, dense, tok, args.nsamples, args.seqlen, 0, progress=False)
            forward_runs.append(dense_forward_s(dense, calib.input_ids, 8))
        reuse = stats if (kw.get("calib") == valid and kw.get("method", "flap") == "flap" and stats is not None) else None
        t = time.perf_counter()
        result = prune(dense, PruneConfig(**kw), tokenizer=tok, statistics=reuse)
        elapsed = time.perf_counter() - t
        if first is None:
            first = result
            stats = result.statistics
            peak = rss_mib()
            forward_runs.append(dense_forward_s(dense, calib.input_ids, 8))
            dense_s = sum(forward_runs) / len(forward_runs)
            data["cost"] = {
                "prune_s": elapsed,
                "dense_forward_s": dense_s, "dense_forward_runs_s": [round(x, 2) for x in forward_runs],
                "prune_over_dense_forward": elapsed / dense_s, "peak_rss_mib": peak,
                "rss_after_load_mib": rss_after_load,
            }
        p = result.provenance
        data["models"].append({
            "name": name, "achieved_ratio": p["achieved_ratio"], "params": p["pruned_params"],
            "linear_weights": p["pruned_linear_weights"], "prune_s": elapsed if reuse is None else None,
            "reused_statistics": reuse is not None,
            "widths": {"heads": result.model.config.num_attention_heads_per_layer,
                       "kv_heads": result.model.config.num_key_value_heads_per_layer,
                       "mlp": result.model.config.intermediate_size_per_layer},
        })
        models[name] = result.model
        print(f"{name}: ratio {p['achieved_ratio']:.4f}, {elapsed:.1f} s", flush=True)

    windows = token_windows(tok, load_text(WIKITEXT / "test.txt"), args.eval_seqlen, args.max_tokens)
    tallies = {name: Tally() for name in models}
    for w in range(len(windows)):
        batch = windows[w:w + 1]
        ref = log_probs(dense, batch)  # the dense logits once per window, shared by every model
        for name, model in models.items():
            tallies[name].add(ref if name == "dense" else log_probs(model, batch), batch[:, 1:], ref)
        for row in data["models"]:
            r = tallies[row["name"]].result(w + 1, args.eval_seqlen)
            row.update(perplexity=r.perplexity, kl=r.kl, top1=r.top1_agreement)
        data["eval"]["tokens_evaluated"] = tallies["dense"].count
        data["eval"]["windows_evaluated"] = w + 1
        summarize_granularity(data)
        write(args.out, data)
        print(f"eval window {w + 1}/{len(windows)}: " + ", ".join(
            f"{r['name']} {r['perplexity']:.2f}" for r in data["models"]), flush=True)
    write(args.out, data)
    plot(args.out, data)


if __name__ == "__main__":
    main()
