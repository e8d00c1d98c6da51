"""The CLI as a user runs it, and the one check of how it refuses bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m flap_deploy_cli ARGS`` in a fresh interpreter (its imports, exit code and streams as a
    user sees them), with this checkout first on the path."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "flap_deploy_cli", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result, *needles: str) -> str:
    """The ``error: `` line of a refused command, a ``CliRunner`` result or a finished ``run_cli``.

    Checks the contract of bad input: exit code 2, no traceback, and on stderr exactly one error
    line, the last one (progress of work done before the problem showed may precede it), holding
    every needle. Returns the line for further checks."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, (code, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [part for line in result.stderr.splitlines() for part in line.split("\r") if part.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]
