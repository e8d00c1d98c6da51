"""`flap-deploy prune`: the first step of the flow.

Every pruning option is declared once, in ``PRUNE_OPTIONS``, under the name of the
``PruneConfig`` field it sets; the command passes them on as they are. Choices come from the
library's torch-free vocabularies (``flap_deploy.pruning.choices``, ``methods``), so `--help`
and a bad value cost no torch; tests/test_cli_help.py holds the defaults equal to the library's.
"""

from __future__ import annotations

from pathlib import Path

import click

from flap_deploy.pruning.choices import DTYPES, GRANULARITIES, METRICS, STRUCTURES
from flap_deploy.pruning.methods import METHODS, RECONSTRUCTIONS, SEARCHES

from .common import (
    CliError,
    FlapCommand,
    at_revision,
    echo_json,
    json_option,
    options,
    overwrite_option,
    revision_option,
)

PRUNE_OPTIONS = (
    click.option("--ratio", default=0.2, show_default=True, type=float,
                 help="Fraction of the decoder layers' linear weights (q/k/v/o, gate/up/down) to remove, in [0, 1)."),
    click.option("--method", default="flap", show_default=True, type=click.Choice(list(METHODS)),
                 help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + "."),
    click.option("--metric", default="WIFV", show_default=True, type=click.Choice(METRICS),
                 help="FLAP importance: weighted input feature variance, input feature variance, weighted input norm."),
    click.option("--structure", default="AL-AM", show_default=True, type=click.Choice(STRUCTURES),
                 help="Adaptive/Uniform across Layers, Adaptive/Manual/Uniform across Modules (FLAP paper)."),
    click.option("--attn-ratio", default=None, type=float,
                 help="Fraction of attention weights removed by UL-MM / AL-MM [default: 0.75 x ratio]."),
    click.option("--attn-granularity", default="group", show_default=True, type=click.Choice(GRANULARITIES),
                 help="Attention unit: a whole KV group, or query heads inside groups (equal group sizes per layer)."),
    click.option("--reconstruct", default="ls", show_default=True, type=click.Choice(list(RECONSTRUCTIONS)),
                 help="What replaces the removed inputs of o_proj / down_proj (FLAP only): "
                      + "; ".join(f"{r.name}, {r.help}" for r in RECONSTRUCTIONS.values())
                      + " (ls: covariances from a second calibration pass while writing, one layer at a time; "
                        "kept from the statistics pass instead when --max-memory is given and has room for them). --no-bias is an alias of --reconstruct none."),
    click.option("--ridge", default=0.03, show_default=True, type=float,
                 help="Shrinkage of the ls refit toward the paper's bias solution, in units of the kept channels' "
                      "mean variance (0: plain least squares; larger: closer to --reconstruct bias)."),
    click.option("--search", default="none", show_default=True, type=click.Choice(list(SEARCHES)),
                 help="How the per-layer widths are chosen: " + "; ".join(f"{s.name}, {s.help}" for s in SEARCHES.values())
                      + " (same menus, alignment and ratio; with ls, the covariances must fit in --max-memory)."),
    click.option("--search-budget", default="100", show_default=True,
                 help="What the search may spend: candidate evaluations (e.g. 200; one on the larger window set "
                      "counts as its share) or wall time (90s, 10m, 1h). The same seed and evaluations give the same "
                      "widths."),
    click.option("--search-windows", default=8, show_default=True, type=int,
                 help="Calibration windows most candidates are measured on; the start and the best of each "
                      "generation are measured on four times as many (at most --nsamples)."),
    click.option("--calib", default="self", show_default=True,
                 help="Calibration data: 'self' (model-generated, no data needed), 'hf:wikitext2' (needs `datasets` "
                      "and a network), or a text file / directory (WikiText is detokenized)."),
    click.option("--nsamples", default=1024, show_default=True, type=int, help="Calibration windows."),
    click.option("--seqlen", default=128, show_default=True, type=int, help="Tokens per calibration window."),
    click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration windows / sampling."),
    click.option("--mlp-multiple", default=1, show_default=True, type=int,
                 help="Keep every layer's MLP width a multiple of N (efficient GEMM shapes)."),
    click.option("--tp-size", default=1, show_default=True, type=int,
                 help="Keep every layer valid for vLLM tensor parallelism of size T (query heads and MLP width "
                      "divisible by T; KV heads divisible by T or dividing T)."),
    click.option("--batch-size", default=8, show_default=True, type=int, help="Calibration windows per forward."),
    click.option("--device", default="auto", show_default=True,
                 help="Where layers run: auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N. One "
                      "decoder layer is resident at a time, read from the checkpoint's safetensors."),
    click.option("--dtype", default=None, type=click.Choice(DTYPES),
                 help="Compute dtype [default: the checkpoint's on an accelerator, float32 on the CPU]; statistics "
                      "always accumulate in float64."),
    click.option("--max-memory", default=None,
                 help="Host memory the run may use, e.g. 12GiB [default: what the machine has available]. The plan "
                      "(every resident term, its peak phase) is printed and checked against it before any layer "
                      "runs: a limit below the run's peak is refused with the figure and what lowers it "
                      "(--nsamples, --seqlen, --batch-size, --reconstruct bias, --offload-buffer), and the run "
                      "stays under it. With --reconstruct ls, a limit with room for every layer's covariances "
                      "keeps them from the statistics pass (one dense forward fewer; the plan says from what "
                      "value); without --max-memory they come from a second pass, so memory stays flat in depth."),
    click.option("--offload-buffer/--no-offload-buffer", default=False, show_default=True,
                 help="Keep the calibration buffer in pinned host memory instead of on the device."),
)




@click.command("prune", cls=FlapCommand)
@click.argument("model")
@click.argument("out", type=click.Path(path_type=Path))
@revision_option
@options(PRUNE_OPTIONS)
@click.option("--no-bias", "no_bias", is_flag=True, hidden=True, help="Alias of --reconstruct none.")
@overwrite_option
@json_option
@click.pass_context
def prune(ctx: click.Context, model: str, out: Path, revision: str | None, overwrite: bool, as_json: bool,
          no_bias: bool, **options) -> None:
    """Prune MODEL (a directory, a Hugging Face Hub id or `smollm2-135m`) with FLAP (or a baseline) and write
    the pruned checkpoint, with its model card (README.md), to OUT."""
    from flap_deploy.pruning.config import PruneConfig

    if no_bias:
        if ctx.get_parameter_source("reconstruct") == click.core.ParameterSource.COMMANDLINE \
                and options["reconstruct"] != "none":
            raise CliError(f"--no-bias conflicts with --reconstruct {options['reconstruct']}")
        options["reconstruct"] = "none"

    config = PruneConfig(**options, progress=not as_json)
    config.validate()  # before the pipeline's imports (torch): a bad value is an error at once

    from flap_deploy.pruning.pipeline import prune as run_prune

    (model,) = at_revision(revision, model, out=out, overwrite=overwrite, accept=("dense",))
    result = run_prune(model, config, out=out, overwrite=overwrite)
    path = result.path
    if as_json:
        echo_json({"out": str(path), "provenance": result.provenance, "timings": result.timings,
                   "memory": result.memory})
        return
    p = result.provenance
    click.echo(f"pruned {p['source_model']} with {p['method']} ({p['structure']}): removed "
               f"{100 * p['achieved_ratio']:.2f} % of decoder linear weights (target {100 * p['target_ratio']:.1f} %), "
               f"{p['dense_params']:,} -> {p['pruned_params']:,} parameters in {result.timings['total_s']:.1f} s")
    if p.get("search"):
        s = p["search"]
        click.echo(f"searched widths ({s['name']}): KL to the dense model {s['start_kl']:.4f} -> {s['kl']:.4f} on "
                   f"{s['windows'][1]} calibration windows ({s['evaluations']:g} evaluations, {s['generations']} "
                   f"generations, {result.timings['search_s']:.1f} s)")
    click.echo(f"wrote {path} (per-layer report: {path / 'flap_report.txt'}, plot: {path / 'flap_widths.png'}); "
               f"peak memory {result.memory['peak_rss_bytes'] / 2**30:.2f} GiB")
