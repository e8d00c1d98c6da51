"""What every command shares: one-line user errors, flow-ordered groups, one JSON printer, common flags."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import click

# Error classes are looked up in sys.modules rather than imported: a class that was never
# loaded cannot have been raised, and importing the library here would cost every --help.
USER_ERROR_CLASSES = (("flap_deploy.errors", "FlapDeployError"), ("flap_deploy.model.modeling_flap_llama", "FlapConfigError"))


def user_error_message(error: BaseException, command: click.Command) -> str | None:
    """The one-line message of a user error (None for a bug), with a library parameter named by its flag."""
    classes = tuple(getattr(sys.modules[m], name) for m, name in USER_ERROR_CLASSES if m in sys.modules)
    if not isinstance(error, classes):
        return None
    message = str(error)
    flags = {option.name: option.opts[0] for option in command.params if isinstance(option, click.Option)}
    param = getattr(error, "param", None)
    if param in flags:
        message = f"{flags[param]} {message.removeprefix(param + ' ')}"
    # Parameters the library names inside a message are `quoted`: they become flags too.
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(1)), message)


class FlapCommand(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:
            message = user_error_message(e, self)
            if message is None:
                raise
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


class FlapGroup(click.Group):
    """Lists its commands in the order they were added (the flow), not alphabetically."""

    command_class = FlapCommand
    group_class = type  # subgroups are FlapGroups too

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


def echo_json(data: Any, *, one_line: bool = False) -> None:
    """The only way a command prints JSON (stdout then carries nothing else)."""
    click.echo(json.dumps(data, indent=None if one_line else 2, default=str))


def options(declared: tuple) -> Any:
    """One decorator applying click options declared as a tuple, listed in their --help order."""
    def decorate(command: Any) -> Any:
        for option in reversed(declared):
            command = option(command)
        return command
    return decorate


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON on stdout (messages and progress go to stderr).")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace the output directory if it exists.")
revision_option = click.option(
    "--revision", default=None, metavar="REV",
    help="Branch, tag or commit of the MODEL arguments that are Hugging Face Hub ids (namespace/name) "
         "[default: main]. A Hub id is fetched into the Hugging Face cache (HF_HOME; HF_TOKEN for gated or "
         "private repositories; HF_HUB_OFFLINE=1 uses the cache alone); a local directory wins over an id "
         "of the same spelling.")


def at_revision(revision: str | None, *models: str | None, out: Any = None, overwrite: bool = False,
                **resolve: Any) -> list[Any]:
    """The MODEL arguments as the library takes them: as given without --revision (the library resolves
    each, Hub ids at their main branch); with it, each Hub id resolved at that revision (a ``ModelRef``,
    ``resolve`` passed on) and the others as given. --revision with no Hub id among them is an error.
    An output directory ``out`` is checked first, so that a refused OUT costs no download."""
    if out is not None:
        from flap_deploy.io.atomic import check_output_dir

        check_output_dir(out, overwrite)
    if revision is None:
        return list(models)
    from flap_deploy.io.model_ref import is_hub_id, resolve_model

    hub = [m is not None and is_hub_id(m) for m in models]
    if not any(hub):
        raise CliError(f"--revision {revision}: applies to Hugging Face Hub ids, and no MODEL argument is one "
                       f"({', '.join(m for m in models if m is not None)})")
    return [resolve_model(m, revision=revision, **resolve) if h else m for m, h in zip(models, hub)]


def int_list(text: str | None, flag: str) -> list[int | None]:
    """Comma-separated levels; 0 or 'inf' mean unbounded (None)."""
    if not text:
        return [None]
    try:
        return [None if v.strip() in ("inf", "0") else int(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,4,16") from None


class CliError(click.ClickException):
    """A flag combination the command refuses, printed like every user error: one line, exit 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)
