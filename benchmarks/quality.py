"""Quality of FLAP's reconstructions and the baselines on the bundled SmolLM2-135M, on two text
domains, and the cost of pruning.

Protocol (issue 12). Calibration: WikiText-2 valid, --nsamples random windows of --seqlen tokens,
seed 0. Evaluation on two domains, the first --max-tokens tokens of each in windows of
--eval-seqlen: WikiText-2 test, and python-docs (``flap_deploy.io.text.python_docs_text``: the Python
Language Reference topics the interpreter ships for ``help()``). Figures: perplexity, mean
KL(dense||pruned) per token and top-1 next-token agreement with the dense model on the same
positions (the dense logits are computed once per window and shared by every model of a group).

Main table, at every --ratios: Wanda-sp (group and head attention granularity), mag-sp, FLAP-bias
(the paper), FLAP with the library default (``PruneConfig()``'s reconstruct / ridge).
Study (--study), at every --study-ratios: the ls refit at every --ridges; attention-only /
MLP-only / both; one-pass (dense inputs) vs sequential refit (pruned inputs, dense targets);
calibration windows --study-nsamples; calibration source WikiText-2 valid / ``self`` / a mix
(half of each). All FLAP variants of one calibration set share one statistics pass that keeps
full covariances (``collect_statistics(covariance=True)``), so only the refits differ.
Levers (--levers, issue 25), at every --lever-ratios, beside the default of the main table (same
statistics, same reconstruction): the width search (``--search evo``) at every --search-budgets; the
default healed (``flap_deploy.heal``, KL to the dense model, LoRA) on WikiText-2 valid at every
--heal-tokens; the searched widths healed the same way (at every --heal-ratios). The heal budgets of one
model continue one training state (a run to N tokens is the start of a longer one), kept in --work with
the checkpoints, which a later run reuses. Each lever row
records its wall time: prune + search, or the heal's training time to its tokens (summed over the
runs that continued its state); both depend on the machine's load.

Cost (at 20 %): each method's ``flap-deploy prune smollm2-135m`` in a fresh process (streamed from the
bundled model's safetensors, calibration, reconstruction and the write included; the wall time of the
command) ÷ the time of one dense decoder forward over the same calibration windows (its own process,
mean of one before and one after the prunes), and the command's own peak RSS.

    python benchmarks/quality.py --study                     # the full run (see docs/pruning.md)
    python benchmarks/quality.py --smoke --out /tmp/q        # minutes: tiny sizes, proves it runs

Results are rewritten after every evaluated group, so an interrupted run leaves partial figures;
--resume continues it (rows already in quality.json are kept, not recomputed).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flap_deploy import PruneConfig, __version__, prune  # noqa: E402
from flap_deploy.evaluation.perplexity import Tally, log_probs, token_windows  # noqa: E402
from flap_deploy.heal import HealConfig, heal  # noqa: E402
from flap_deploy.io.model_ref import load_model, load_tokenizer  # noqa: E402
from flap_deploy.io.text import load_text, python_docs_text  # noqa: E402
from flap_deploy.pruning.calibration import calibration_windows  # noqa: E402
from flap_deploy.pruning.compress import compress  # noqa: E402
from flap_deploy.pruning.methods import RECONSTRUCTIONS  # noqa: E402
from flap_deploy.pruning.pipeline import PrunedModel, collect_statistics, linear_weights  # noqa: E402
from flap_deploy.pruning.reconstruct import refit_layers  # noqa: E402

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2"
DEFAULT = PruneConfig()
DOMAINS = ("wikitext2", "python_docs")


@torch.no_grad()
def dense_forward_s(model, calib_ids: torch.Tensor, batch_size: int) -> float:
    """Time of one dense decoder forward (no lm_head) over the calibration windows."""
    t = time.perf_counter()
    for s in range(0, len(calib_ids), batch_size):
        model.model(input_ids=calib_ids[s:s + batch_size], use_cache=False)
    return time.perf_counter() - t


METHOD_KEYS = ("wanda-group", "wanda-head", "mag", "bias", "default")


def main_methods(keys=METHOD_KEYS) -> list[tuple[str, dict]]:
    default = f"FLAP {DEFAULT.reconstruct}" + (f" ridge {DEFAULT.ridge:g}" if RECONSTRUCTIONS[DEFAULT.reconstruct].covariances else "")
    methods = {
        "wanda-group": ("Wanda-sp group", dict(method="wanda-sp", attn_granularity="group")),
        "wanda-head": ("Wanda-sp head", dict(method="wanda-sp", attn_granularity="head")),
        "mag": ("mag-sp", dict(method="mag-sp")),
        "bias": ("FLAP-bias", dict(reconstruct="bias")),
        "default": (f"{default} (default)", dict()),
    }
    return [methods[k] for k in keys]


# ---------------------------------------------------------------- cost (fresh processes, the CLI)

def cost_child(args) -> None:
    """The unit of the cost rows, in a fresh process: one dense decoder forward over the calibration windows."""
    torch.set_num_threads(args.threads)
    dense = load_model("smollm2-135m", dtype=torch.float32)
    calib = calibration_windows(str(WIKITEXT / "valid.txt"), dense, load_tokenizer("smollm2-135m"), args.nsamples,
                                args.seqlen, 0, progress=False)
    dense_forward_s(dense, calib.input_ids[:8], 8)  # warm-up: first-call allocations are not the forward's cost
    print(json.dumps({"dense_forward_s": dense_forward_s(dense, calib.input_ids, 8)}))


def dense_forward_cost(args) -> float:
    cmd = [sys.executable, __file__, "--cost-child", "dense", "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["dense_forward_s"]


def cli_prune_cost(args, kw: dict, work: Path) -> dict:
    """One method's prune as a user runs it: ``flap-deploy prune smollm2-135m`` in a fresh process (layers
    streamed from the bundled model's safetensors, calibration and reconstruction included, the checkpoint
    written). Wall time from the command's start (interpreter and imports included) to its exit; peak RSS as
    the command reports it (its own VmHWM)."""
    flags = [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, "-m", "flap_deploy_cli", "prune", "smollm2-135m", str(work), "--calib",
           str(WIKITEXT / "valid.txt"), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), *flags,
           "--overwrite", "--json"]
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    elapsed = time.perf_counter() - t
    result = json.loads(out)
    shown = ["OUT" if arg == str(work) else arg.replace(str(REPO.parent) + "/", "../") for arg in cmd[3:]]
    return {"command": "flap-deploy " + " ".join(shown), "prune_s": elapsed, "timings": result["timings"],
            "peak_rss_mib": result["memory"]["peak_rss_bytes"] / 2**20,
            "achieved_ratio": result["provenance"]["achieved_ratio"]}


def measure_costs(args, data: dict, save: Callable[[], None]) -> None:
    """The cost rows, dense forward measured before and after the prunes (each in its own process)."""
    import tempfile

    dense_runs = [dense_forward_cost(args)]
    methods = main_methods(args.methods)
    if args.levers:  # the search as a user runs it: the default's prune plus --search, in the same fresh process
        methods += [(f"search evo {b}", dict(search="evo", search_budget=b)) for b in args.search_budgets[:1]]
    todo = [(name, kw) for name, kw in methods if not (args.resume and name in data["cost"])]
    with tempfile.TemporaryDirectory() as tmp:
        costs = {name: cli_prune_cost(args, dict(kw, ratio=0.2), Path(tmp) / "pruned") for name, kw in todo}
    dense_runs.append(dense_forward_cost(args))
    dense_s = sum(dense_runs) / len(dense_runs)
    for name, cost in costs.items():
        data["cost"][name] = dict(cost, dense_forward_s=dense_s, dense_forward_runs_s=dense_runs,
                                  prune_over_dense_forward=cost["prune_s"] / dense_s)
        print(f"cost {name}: {data['cost'][name]['prune_over_dense_forward']:.2f} x dense forward", flush=True)
    save()


# ---------------------------------------------------------------- tasks (lm-eval, the checkpoints in --work)

TASKS = "offline"  # WikiText-2 cloze and sentence endings, built from ../shared/data (flap_deploy.evaluation.tasks)


def task_result(path: Path, cache: Path, limit: int | None = None) -> dict:
    """``run_tasks``' result for the checkpoint at ``path``, kept in ``cache`` (JSON) and read back from there, so
    the figures of a checkpoint can be taken while the lever rows still run."""
    from flap_deploy.evaluation.tasks import load_tasks, run_tasks, select_tasks
    from flap_deploy.io.model_ref import CHECKPOINTS, resolve_model

    if cache.exists():
        return json.loads(cache.read_text())
    result = run_tasks(resolve_model(str(path), accept=CHECKPOINTS), load_tasks(select_tasks(TASKS)), limit=limit,
                       batch_size=16, dtype="float32")
    cache.write_text(json.dumps(result))
    return result


def task_checkpoints(args, data: dict) -> list[tuple[dict, Path]]:
    """(row, checkpoint) of every row still without task figures that --tasks measures: the dense model; at
    --lever-ratios the default and the lever rows whose checkpoint is in --work, a heal only at the largest
    --heal-tokens (a smaller budget is the start of that run)."""
    from flap_deploy.io.bundled import materialize

    default = main_methods(("default",))[0][0]
    named = {f"{default} {ratio:.0%}": checkpoint_name(("default", ratio)) for ratio in args.lever_ratios}
    out = []
    for r in data["models"]:
        if "tasks" in r:
            continue
        if r["name"] == "dense":
            out.append((r, materialize("smollm2-135m")))
            continue
        name = named.get(r["name"]) if r["group"] == "main" else r.get("checkpoint")
        healed_less = r.get("heal") and r["heal"][-1]["tokens"] != max(args.heal_tokens)
        if name and not healed_less and r["target_ratio"] in args.lever_ratios and (args.work / name).is_dir():
            out.append((r, args.work / name))
    return out


def measure_tasks(args, data: dict, save: Callable[[], None]) -> None:
    """Accuracy ± stderr of every item of the offline tasks, hf backend, float32, one model at a time."""
    for r, path in task_checkpoints(args, data):
        name = "dense" if r["name"] == "dense" else path.name
        result = task_result(path, args.work / f"{name}.tasks.json", args.task_limit)
        r["tasks"] = {task: {"n": t["n"], **t["metrics"]} for task, t in result["tasks"].items()}
        r["tasks_seconds"] = result["seconds"]
        print(f"tasks {r['name']}: " + ", ".join(f"{task} {100 * t['acc']['value']:.1f}"
                                                 for task, t in r["tasks"].items()), flush=True)
        save()


# ---------------------------------------------------------------- evaluation

def eval_texts(tok, args) -> dict[str, torch.Tensor]:
    return {
        "wikitext2": token_windows(tok, load_text(WIKITEXT / "test.txt"), args.eval_seqlen, args.max_tokens),
        "python_docs": token_windows(tok, python_docs_text(), args.eval_seqlen, args.max_tokens),
    }


@torch.no_grad()
def evaluate_group(dense, models: dict, rows: dict, windows: dict, on_progress) -> None:
    """Every model of the group on both domains, window by window beside the dense model."""
    for domain, ids in windows.items():
        tallies = {name: Tally() for name in models}
        for w in range(len(ids)):
            batch = ids[w:w + 1]
            ref = log_probs(dense, batch)
            for name, model in models.items():
                tallies[name].add(ref if model is dense else log_probs(model, batch), batch[:, 1:], ref)
        for name, tally in tallies.items():
            r = tally.result(len(ids), ids.shape[1])
            rows[name][domain] = {"perplexity": r.perplexity, "kl": r.kl, "top1": r.top1_agreement,
                                  "tokens": r.tokens}
        on_progress()


def row(name: str, group: str, result, kw: dict) -> dict:
    p = result.provenance
    return {"name": name, "group": group, "method": p["method"], "target_ratio": p["target_ratio"],
            "achieved_ratio": p["achieved_ratio"], "params": p["pruned_params"],
            "reconstruct": p["reconstruction"]["mode"], "ridge": p["reconstruction"]["ridge"],
            "attn_granularity": p["attn_granularity"], "calibration": p["calibration"],
            "search": p.get("search"), "heal": p.get("heal"),
            **{k: v for k, v in kw.items()
               if k in ("modules", "refit", "seconds", "search_s", "checkpoint") and v is not None}}


# ---------------------------------------------------------------- report

def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def write(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(data, indent=2) + "\n")
    c, e = data["calibration"], data["eval"]
    lines = [
        "# Quality: FLAP reconstructions vs baselines on SmolLM2-135M, two domains",
        "",
        f"Calibration: WikiText-2 valid, {c['nsamples']} windows x {c['seqlen']} tokens, seed 0 (study rows say "
        f"otherwise). Evaluation: first {e['max_tokens']:,} tokens of WikiText-2 test and of python-docs (the "
        f"Python {platform.python_version()} Language Reference topics, `flap_deploy.io.text.python_docs_text`), windows of "
        f"{e['seqlen']}. KL = mean KL(dense || pruned) per token; top-1 = argmax agreement with the dense model. "
        "Ratio = share of decoder linear weights removed.",
        "",
    ]
    for group, title in (("main", "Methods at the same budget"), ("study", "Study (FLAP masks; reconstruction variants)"),
                         ("levers", "Levers: width search and heal (wall time on the machine named below)")):
        rows = [r for r in data["models"] if r["group"] in (group, "dense")]
        if len(rows) <= 1:
            continue
        lines += [f"## {title}", "",
                  "| model | ratio | calibration | WikiText-2 ppl | KL | top-1 | python-docs ppl | KL | top-1 |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            cal = r.get("calibration") or {}
            cal_s = f"{Path(str(cal.get('source', '-'))).name} x{cal.get('samples', '-')}" if cal else "-"
            cells = []
            for d in DOMAINS:
                m = r.get(d) or {}
                cells += [fmt(m.get("perplexity"), ".2f"), fmt(m.get("kl"), ".4f"),
                          fmt(100 * m["top1"], ".2f") + " %" if m.get("top1") is not None else "-"]
            wall = f" ({r['seconds']:.0f} s)" if r.get("seconds") is not None else ""
            lines.append(f"| {r['name']}{wall} | {100 * r['achieved_ratio']:.2f} % | {cal_s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += lever_recipes(data)
    lines += task_table(data)
    if data.get("cost"):
        lines += ["## Cost of pruning (20 %, `flap-deploy prune smollm2-135m` in a fresh process per method)", "",
                  "Each method pruned as a user runs it: layers streamed from the bundled model's safetensors, "
                  "calibration, reconstruction and the checkpoint write included, wall time from the command's "
                  "start to its exit (interpreter and imports included); peak RSS as the command reports it. "
                  "Dense forward: one decoder forward over the same calibration windows in its own process, the "
                  "mean of one run before and one after the prunes.", "",
                  "| method | prune (s) | dense forward (s) | prune / dense forward | of which search / dense forward "
                  "| peak RSS (MiB) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, cst in data["cost"].items():
            search_s = cst["timings"].get("search_s")
            search = f"{search_s / cst['dense_forward_s']:.2f} ({search_s:.0f} s)" if search_s is not None else "-"
            lines.append(f"| {name} | {cst['prune_s']:.1f} | {cst['dense_forward_s']:.1f} | "
                         f"**{cst['prune_over_dense_forward']:.2f}** | {search} | {cst['peak_rss_mib']:.0f} |")
        lines.append("")
    lines += [f"Machine: {data['machine']}; torch {data['torch']}; flap-deploy {data['package_version']}."]
    (out / "quality.md").write_text("\n".join(lines) + "\n")


def lever_recipes(data: dict) -> list[str]:
    """What each lever row ran, from its provenance: the search's budget and KL, the heal's settings and speed."""
    lines = []
    for r in data["models"]:
        if r["group"] != "levers":
            continue
        parts = []
        if r.get("search"):
            s = r["search"]
            parts.append(f"`--search {s['name']} --search-budget {s['budget']}` (seed {s['seed']}, windows "
                         f"{s['windows'][0]}/{s['windows'][1]}, {s['evaluations']:g} evaluations, {s['generations']} "
                         f"generations, {s['improvements']} improvements; KL on the large set {s['start_kl']:.4f} → "
                         f"{s['kl']:.4f}" + (f"; search {r['search_s']:.0f} s" if r.get("search_s") else "") + ")")
        for h in r.get("heal") or []:
            lora = f"LoRA rank {h['lora_rank']}" if h["mode"] == "lora" else "full"
            speed = f", {h['tokens'] / r['seconds']:.0f} tokens/s" if r.get("seconds") else ""
            source = f"{Path(str(h['data']['source'])).name} x{h['data']['windows']}"
            parts.append(f"heal on {source} ({h['tokens']:,} tokens = {h['steps']} steps of "
                         f"{h['batch_size']} x {h['seqlen']}, {lora}, lr {h['lr']:g}, {h['loss']}; final loss "
                         f"{h['final_loss']:.4f}{speed})")
        lines.append(f"- {r['name']}: the default's prune (ls ridge {r['ridge']:g}) + " + " + ".join(parts))
    return ["Lever recipes:", "", *lines, ""] if lines else []


def task_table(data: dict) -> list[str]:
    """The rows with task figures: accuracy ± one standard error (in points), the difference to dense."""
    rows = [r for r in data["models"] if r.get("tasks")]
    dense = next((r["tasks"] for r in rows if r["name"] == "dense"), None)
    if not rows or dense is None:
        return []
    cols = [(task, metric) for task, t in dense.items() for metric in t if metric != "n"]
    n = ", ".join(f"{task} {t['n']}" for task, t in dense.items())
    lines = ["## Tasks: offline lm-eval set (items: " + n + "; accuracy in points ± one standard error, "
             "difference to dense)", "",
             "| model | " + " | ".join(f"{task} {metric}" for task, metric in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for task, metric in cols:
            m, d = r["tasks"][task][metric], dense[task][metric]
            diff = "" if r["name"] == "dense" else f" ({100 * (m['value'] - d['value']):+.1f})"
            cells.append(f"{100 * m['value']:.1f} ± {100 * m['stderr']:.1f}{diff}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(out: Path, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in data["models"] if r["name"] == "dense")
    main = [r for r in data["models"] if r["group"] == "main"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, domain, title in zip(axes, DOMAINS, ("WikiText-2 test", "python-docs")):
        for method in dict.fromkeys(r["method_name"] for r in main):
            pts = sorted((r["achieved_ratio"], r[domain]["perplexity"]) for r in main
                         if r["method_name"] == method and r.get(domain))
            if pts:
                ax.plot([0] + [100 * x for x, _ in pts], [dense[domain]["perplexity"]] + [y for _, y in pts], "o-",
                        label=method)
        ax.set_yscale("log")
        ax.set_xlabel("decoder linear weights removed (%)")
        ax.set_ylabel("perplexity")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M: perplexity vs removed fraction")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the run

def calibration_sets(args, dense, tok) -> list[tuple[str, Callable[[], torch.Tensor], dict]]:
    """(label, windows, description): the main set first, then the study's. ``windows()`` makes
    the windows on its first call, so a resumed run whose rows all exist makes none (the
    self-generated set takes minutes of generation)."""
    valid = str(WIKITEXT / "valid.txt")

    @functools.cache
    def text(n):
        return calibration_windows(valid, dense, tok, n, args.seqlen, 0, progress=False).input_ids

    @functools.cache
    def own():
        return calibration_windows("self", dense, tok, args.nsamples, args.seqlen, 0, progress=False).input_ids

    def mix():
        half = args.nsamples // 2
        return torch.cat([text(args.nsamples)[:half], own()[: args.nsamples - half]])

    def described(source, n=args.nsamples):
        return {"source": source, "samples": n, "seqlen": args.seqlen, "seed": 0}

    sets = [("valid", lambda: text(args.nsamples), described(valid))]
    if args.study:
        for n in args.study_nsamples:
            if n != args.nsamples:
                sets.append((f"valid x{n}", lambda n=n: text(n), described(valid, n)))
        if args.study_calib:
            sets.append(("self", own, described("self")))
            sets.append(("mix", mix, described("mix: WikiText-2 valid + self, half each")))
    return sets


def fresh_data(args, dense, windows) -> dict:
    return {
        "package_version": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.machine()}, {args.threads} torch threads",
        "default": {"reconstruct": DEFAULT.reconstruct, "ridge": DEFAULT.ridge},
        "calibration": {"source": "wikitext-2 valid", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "eval": {"domains": list(DOMAINS), "max_tokens": args.max_tokens, "seqlen": args.eval_seqlen,
                 "windows": {d: len(w) for d, w in windows.items()}},
        "models": [{"name": "dense", "group": "dense", "method_name": "dense", "achieved_ratio": 0.0,
                    "params": sum(p.numel() for p in dense.parameters()), "linear_weights": linear_weights(dense)}],
        "cost": {},
    }


def resumed_data(args) -> dict:
    """The figures of an earlier run with the same protocol; its rows are kept, not recomputed."""
    path = args.out / "quality.json"
    data = json.loads(path.read_text())
    want = {"calibration.nsamples": args.nsamples, "calibration.seqlen": args.seqlen,
            "eval.max_tokens": args.max_tokens, "eval.seqlen": args.eval_seqlen,
            "default.reconstruct": DEFAULT.reconstruct, "default.ridge": DEFAULT.ridge}
    for key, value in want.items():
        section, field = key.split(".")
        if data.get(section, {}).get(field) != value:
            sys.exit(f"quality.py: --resume: {path} has {key} = {data.get(section, {}).get(field)!r}, "
                     f"this run {value!r}; use another --out")
    return data


def run(args) -> None:
    torch.set_num_threads(args.threads)
    dense = load_model("smollm2-135m", dtype=torch.float32)
    tok = load_tokenizer("smollm2-135m")
    windows = eval_texts(tok, args)
    resume = args.resume and (args.out / "quality.json").exists()
    data = resumed_data(args) if resume else fresh_data(args, dense, windows)
    rows = {r["name"]: r for r in data["models"]}

    def save():
        write(args.out, data)

    if any(d not in rows["dense"] for d in DOMAINS):
        evaluate_group(dense, {"dense": dense}, rows, windows, save)
    base = dict(seqlen=args.seqlen, progress=False, batch_size=8)
    for label, ids, desc in calibration_sets(args, dense, tok):
        main_set = label == "valid"
        cache = {}

        def stats():  # one statistics pass per set, taken only if some row of the set still needs it
            if "stats" not in cache:
                cache["stats"] = collect_statistics(dense, PruneConfig(**base), tok, covariance=True, windows=ids(),
                                                    calibration=desc)
            return cache["stats"]

        models = {}

        def flush():  # evaluate the pending models together (the dense logits once per window), then free them
            if models:
                evaluate_group(dense, models, rows, windows, save)
                models.clear()
                gc.collect()

        def add(name, group, method_name, make, **extra):
            if name in rows:
                return
            started = time.perf_counter()
            result = make()
            if group == "levers":  # a heal's training time to its tokens, not its base prune's (shared)
                extra = {**extra, "seconds": result.timings.get("heal_s", time.perf_counter() - started),
                         "search_s": result.timings.get("search_s")}
            r = row(name, group, result, extra)
            r["method_name"] = method_name
            data["models"].append(r)
            rows[name] = r
            models[name] = result.model
            print(f"{name}: ratio {r['achieved_ratio']:.4f}", flush=True)
            if len(models) >= args.group_size:
                flush()

        ratios = sorted(set(args.ratios if main_set else []) | set(args.study_ratios if args.study else []))
        for ratio in ratios:
            cfg = PruneConfig(**base, ratio=ratio, calib=desc["source"], nsamples=desc["samples"])

            def bias(cfg=cfg, key=("bias", ratio)):  # FLAP's masks and means at this ratio, pruned once
                if key not in cache:
                    cache[key] = prune(dense, replace(cfg, reconstruct="bias"), tokenizer=tok, statistics=stats())
                return cache[key]

            def default(cfg=cfg, key=("default", ratio)):  # the default's prune, shared with the lever rows
                if key not in cache:
                    cache[key] = prune(dense, cfg, tokenizer=tok, statistics=stats())
                return cache[key]

            def ls(cfg=cfg, **kw):
                return lambda: prune(dense, replace(cfg, reconstruct="ls", **kw), tokenizer=tok, statistics=stats())

            def variant(mode, ridge, refits, means=True, bias=bias):
                b = bias()
                return replace(b, _model=compress(dense, b.masks, b.means if means else None, refits=refits),
                               _cleanup=None,
                               provenance={**b.provenance, "reconstruction": {"mode": mode, "ridge": ridge}})

            if main_set and ratio in args.ratios:
                for name, kw in main_methods(args.methods):
                    if not replace(cfg, **kw).pruning_method.reuses_statistics:
                        # the baselines calibrate (Wanda-sp) on the same windows through their own pass
                        make = lambda kw=kw: prune(dense, replace(cfg, **kw), tokenizer=tok)  # noqa: E731
                    elif kw.get("reconstruct") == "bias":
                        make = bias
                    elif not kw:
                        make = default
                    else:
                        make = lambda kw=kw, cfg=cfg: prune(dense, replace(cfg, **kw), tokenizer=tok,  # noqa: E731
                                                            statistics=stats())
                    add(f"{name} {ratio:.0%}", "main", name, make)
            if main_set and args.levers and ratio in args.lever_ratios:
                levers(args, ratio, add, cache, ls)
            if not args.study or ratio not in args.study_ratios:
                continue
            tag = f"{ratio:.0%}" + ("" if main_set else f" calib {label}")
            if not main_set:
                add(f"FLAP-bias {tag}", "study", "FLAP-bias", bias)
                add(f"ls ridge {DEFAULT.ridge:g} {tag}", "study", "ls", ls(), refit="one-pass")
                continue
            for ridge in args.ridges:
                if ridge != DEFAULT.ridge:
                    add(f"ls ridge {ridge:g} {tag}", "study", "ls", ls(ridge=ridge), refit="one-pass")
            for modules in (("attn",), ("mlp",)):
                add(f"ls {modules[0]}-only ridge {DEFAULT.ridge:g} {tag}", "study", "ls",
                    lambda modules=modules, variant=variant, bias=bias: variant(
                        "ls", DEFAULT.ridge, refit_layers(dense, ids(), bias().masks, DEFAULT.ridge, modules=modules,
                                                          covariances=stats().covariances)),
                    modules=modules[0], refit="one-pass")
            if args.sequential:
                for ridge in args.sequential_ridges:
                    add(f"ls sequential ridge {ridge:g} {tag}", "study", "ls-sequential",
                        lambda ridge=ridge, variant=variant, bias=bias: variant(
                            "ls-sequential", ridge, refit_layers(dense, ids(), bias().masks, ridge, pruned_inputs=True,
                                                                 progress=False), means=False),
                        refit="sequential")
        cache.clear()
        flush()
        save()

    if args.tasks:
        measure_tasks(args, data, save)
    if args.cost:
        measure_costs(args, data, save)
    save()
    plot(args.out, data)


def levers(args, ratio: float, add, cache: dict, ls) -> None:
    """The lever rows at one ratio: ``ls`` is the default's prune on the shared statistics (``ls(**overrides)``
    makes the prune)."""
    tag = f"{ratio:.0%}"

    def pruned(key, **kw):  # the checkpoint a lever starts from, pruned once and kept in --work (for --tasks)
        path = args.work / checkpoint_name(key)
        if key not in cache and (path / "config.json").is_file():  # a later run heals on: no second search
            provenance = json.loads((path / "config.json").read_text())["flap"]
            cal = provenance["calibration"]
            if (cal["samples"], cal["seqlen"], provenance["target_ratio"]) == (args.nsamples, args.seqlen, ratio):
                cache[key] = PrunedModel(path=path, masks=[], provenance=provenance)
        if key not in cache:
            cache[key] = ls(**kw)()
        cache[key].save(path, overwrite=True)  # nothing to do where it already is
        return cache[key]

    def healed(key, tokens, **kw):
        base = pruned(key, **kw)
        state = args.work / f"{checkpoint_name(key)}.heal-state"
        out = args.work / checkpoint_name(key, tokens)
        done = heal(str(base.path), out, HealConfig(teacher="smollm2-135m", data=str(WIKITEXT / "valid.txt"),
                                                      tokens=tokens, seqlen=args.seqlen, progress=False),
                    state_dir=state, resume=state.is_dir(), keep_state=True, overwrite=True)
        model = load_model(done.path, dtype=torch.float32)
        return replace(base, path=done.path, _model=model, _cleanup=None,
                       provenance={**base.provenance, "heal": [done.record]},
                       timings={**base.timings, "heal_s": done.seconds})

    searches = [(("search", ratio, b), dict(search="evo", search_budget=str(b)), f"search evo {b}")
                for b in args.search_budgets]
    if args.tasks:  # the default kept at every lever ratio, so that its task figures stand beside the levers'
        pruned(("default", ratio))
    for key, kw, name in searches:
        add(f"{name} {tag}", "levers", name, lambda key=key, kw=kw: pruned(key, **kw), checkpoint=checkpoint_name(key))
    for key, kw, name in [(("default", ratio), {}, "default"), *searches[:1]]:
        for tokens in sorted(args.heal_tokens) if ratio in args.heal_ratios else []:
            size = f"{tokens // 1024}k" if tokens % 1024 == 0 else f"{tokens}"
            label = f"{'' if name == 'default' else name + ' + '}heal {size}"
            add(f"{label} {tag}", "levers", label, lambda key=key, kw=kw, tokens=tokens: healed(key, tokens, **kw),
                checkpoint=checkpoint_name(key, tokens))


def checkpoint_name(key: tuple, heal_tokens: int | None = None) -> str:
    """The directory in --work of a lever's checkpoint: its prune (``key``), healed to ``heal_tokens``."""
    return "-".join(map(str, key)) + (f"-heal-{heal_tokens}" if heal_tokens else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--ratios", type=floats, default=[0.2, 0.3, 0.5],
                    help="Removed fractions of the methods table, comma-separated (default 0.2,0.3,0.5).")
    ap.add_argument("--nsamples", type=int, default=128,
                    help="Calibration windows of WikiText-2 valid (default 128; the study varies it).")
    ap.add_argument("--seqlen", type=int, default=128, help="Tokens per calibration window (default 128).")
    ap.add_argument("--max-tokens", type=int, default=40_000,
                    help="Evaluation tokens from the start of each domain's text (default 40,000).")
    ap.add_argument("--eval-seqlen", type=int, default=512, help="Evaluation window length (default 512).")
    ap.add_argument("--study", action="store_true", help="Also the study rows.")
    ap.add_argument("--study-ratios", type=floats, default=[0.2, 0.3, 0.5],
                    help="Removed fractions the study runs at (default 0.2,0.3,0.5).")
    ap.add_argument("--ridges", type=floats, default=[0.0, 0.01, 0.1, 1.0, 10.0],
                    help="Ridge values of the study's one-pass ls rows, besides the default's (default 0,0.01,0.1,1,10).")
    ap.add_argument("--study-nsamples", type=ints, default=[32, 128, 512],
                    help="Calibration sizes of the study's WikiText-2 valid sets (default 32,128,512).")
    ap.add_argument("--no-sequential", dest="sequential", action="store_false",
                    help="Skip the sequential-refit rows of the study.")
    ap.add_argument("--no-study-calib", dest="study_calib", action="store_false",
                    help="Skip the self / mix calibration sources of the study.")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHOD_KEYS),
                    help=f"Main-table methods, comma-separated among {','.join(METHOD_KEYS)}.")
    ap.add_argument("--sequential-ridges", type=floats, default=[0.01, 1.0],
                    help="Ridge values of the sequential-refit rows (default 0.01,1).")
    ap.add_argument("--levers", action="store_true", help="Also the lever rows (width search, heal; issue 25).")
    ap.add_argument("--lever-ratios", type=floats, default=[0.2, 0.3, 0.5],
                    help="Ratios of the lever rows (default 0.2,0.3,0.5; among --ratios).")
    ap.add_argument("--search-budgets", type=ints, default=[100],
                    help="Width-search budgets in evaluations (default 100); the first is also healed.")
    ap.add_argument("--heal-tokens", type=ints, default=[65_536, 262_144],
                    help="Heal token budgets (default 65536,262144), one training state continued.")
    ap.add_argument("--heal-ratios", type=floats,
                    help="Ratios of the heal rows (default: every --lever-ratios; among them).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/flap-quality-levers"),
                    help="Healed checkpoints and their training states (default /tmp/flap-quality-levers).")
    ap.add_argument("--tasks", action="store_true",
                    help=f"Also the offline lm-eval tasks ({TASKS}: cloze, sentence endings; every item, hf backend, "
                         "float32) of the dense model and, at --lever-ratios, of the default and the lever rows whose "
                         "checkpoint is in --work (a heal at the largest --heal-tokens only).")
    ap.add_argument("--no-cost", dest="cost", action="store_false",
                    help="Skip the cost rows (each method's prune timed in a fresh process; run them alone).")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2).")
    ap.add_argument("--group-size", type=int, default=8,
                    help="Pruned models held and evaluated together (memory: about 0.5 GB each).")
    ap.add_argument("--smoke", action="store_true",
                    help="Tiny sizes (8 windows of 32, 1,024 eval tokens in windows of 256, 20 %% only, 8 items a "
                         "task) to prove it runs.")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                    help="Directory of quality.{json,md,png} (default benchmarks/results).")
    ap.add_argument("--replot", action="store_true", help="Only rewrite quality.md and quality.png from quality.json.")
    ap.add_argument("--resume", action="store_true",
                    help="Keep the rows (and cost entries) already in --out's quality.json, measured with the same "
                         "protocol, and add only the missing ones.")
    ap.add_argument("--cost-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.task_limit = None
    if args.cost_child:
        return cost_child(args)
    if args.heal_ratios is None:
        args.heal_ratios = args.lever_ratios
    if args.smoke:
        args.ratios, args.study_ratios, args.nsamples, args.seqlen = [0.2], [0.2], 8, 32
        args.max_tokens, args.eval_seqlen, args.study_nsamples = 1024, 256, [4, 8]
        args.ridges, args.sequential_ridges = [0.1, 1.0], [1.0]
        args.lever_ratios, args.search_budgets = [0.2], [6]
        if args.heal_tokens == ap.get_default("heal_tokens"):  # a given list is kept: it proves --resume heals on
            args.heal_tokens = [256, 512]
        args.task_limit = 8
    if args.replot:
        data = json.loads((args.out / "quality.json").read_text())
        write(args.out, data)
        plot(args.out, data)
        return
    run(args)


if __name__ == "__main__":
    main()
