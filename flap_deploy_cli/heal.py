"""`flap-deploy heal`: the step after pruning, a short distillation from the dense model.

Every option is declared once, in ``HEAL_OPTIONS``, under the name of the ``HealConfig`` field it sets;
tests/test_cli_help.py holds the defaults equal to the library's.
"""

from __future__ import annotations

from pathlib import Path

import click

from flap_deploy.heal.config import DTYPES, FULL_LR, LORA_LR

from .common import FlapCommand, echo_json, json_option, options, overwrite_option

HEAL_OPTIONS = (
    click.option("--teacher", default="", metavar="DENSE",
                 help="The dense checkpoint (directory or bundled name) PRUNED was pruned from: the student learns its "
                      "next-token distributions. Same tokenizer and vocabulary as PRUNED.  [required]"),
    click.option("--data", default="self", show_default=True,
                 help="Training text: 'self' (windows the teacher samples from BOS, no data needed) or a text file / "
                      "directory (windows at seeded random positions; WikiText is detokenized)."),
    click.option("--tokens", default=131_072, show_default=True, type=int,
                 help="Tokens to train on, in whole batches (at least one: --batch-size x --seqlen)."),
    click.option("--seqlen", default=128, show_default=True, type=int, help="Tokens per training window."),
    click.option("--batch-size", default=8, show_default=True, type=int, help="Windows per optimizer step."),
    click.option("--lm-weight", default=0.0, show_default=True, type=float,
                 help="Weight of the next-token cross-entropy on the data, added to the KL on the teacher's logits."),
    click.option("--temperature", default=1.0, show_default=True, type=float,
                 help="Softens both distributions in the KL (the loss is scaled back by its square)."),
    click.option("--full/--lora", default=False, show_default=True,
                 help="Train every decoder weight (norms and compensation biases included; embeddings and LM head "
                      "stay) instead of LoRA adapters on the kept linear layers, merged into the weights at the end."),
    click.option("--lora-rank", default=16, show_default=True, type=int, help="Rank of the LoRA adapters."),
    click.option("--lora-alpha", default=None, type=float, help="LoRA scale numerator [default: 2 x --lora-rank]."),
    click.option("--lr", default=None, type=float,
                 help=f"AdamW learning rate after the warm-up, then constant (a run to N tokens is the start of a longer "
                      f"one) [default: {LORA_LR:g} with LoRA, {FULL_LR:g} with --full]."),
    click.option("--warmup-steps", default=20, show_default=True, type=int, help="Steps of linear learning-rate warm-up."),
    click.option("--seed", default=0, show_default=True, type=int, help="Seed of the training windows."),
    click.option("--checkpoint-every", default=100, show_default=True, type=int,
                 help="Steps between resumable training states (in --state)."),
    click.option("--device", default="auto", show_default=True,
                 help="Where student and teacher run: auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N."),
    click.option("--dtype", default=None, type=click.Choice(DTYPES),
                 help="Autocast dtype [default: bfloat16 on an accelerator, float32 on the CPU]; weights and optimizer "
                      "state stay float32."),
    click.option("--max-memory", default=None,
                 help="Host memory the run may use, e.g. 12GiB [default: what the machine has available]; the teacher's "
                      "layers that do not fit beside the student are read from its safetensors on every forward."),
)




@click.command("heal", cls=FlapCommand)
@click.argument("pruned")
@click.argument("out", type=click.Path(path_type=Path))
@options(HEAL_OPTIONS)
@click.option("--state", "state_dir", default=None, type=click.Path(path_type=Path),
              help="Directory of the resumable training states [default: OUT.heal-state]; removed once OUT is written "
                   "unless --keep-state.")
@click.option("--resume", is_flag=True, help="Continue the newest training state in --state (same settings; --tokens "
                                             "may be larger).")
@click.option("--keep-state", is_flag=True, help="Keep the training state after writing OUT, so that a later --resume "
                                                 "trains on to more --tokens.")
@overwrite_option
@json_option
def heal(pruned: str, out: Path, state_dir: Path | None, resume: bool, keep_state: bool, overwrite: bool,
         as_json: bool, **options) -> None:
    """Distill PRUNED from its dense model (--teacher) and write the healed checkpoint to OUT.

    The loss is KL(teacher || student) on next-token distributions (plus --lm-weight x cross-entropy). OUT is a
    regular pruned checkpoint: same widths, compensation biases kept, provenance extended with the heal.
    """
    from flap_deploy.heal.config import HealConfig

    config = HealConfig(**options, progress=not as_json)
    config.validate()  # before torch: a bad value is an error at once

    from flap_deploy.heal.distill import heal as run_heal
    from flap_deploy.io.streams import stdout_to_stderr

    with stdout_to_stderr(as_json):
        result = run_heal(pruned, out, config, resume=resume, state_dir=state_dir, keep_state=keep_state,
                          overwrite=overwrite)
    r = result.record
    if as_json:
        echo_json({"out": str(result.path), "heal": r, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s,
                   "plan": result.plan})
        return
    click.echo(f"healed {pruned} from {r['teacher']}: {r['tokens']:,} tokens ({r['steps']} steps, {r['mode']}), "
               f"final loss {r['final_loss']:.4f}, {result.tokens_per_s:,.0f} tokens/s, {result.seconds:.1f} s training")
    click.echo(f"wrote {result.path}")
