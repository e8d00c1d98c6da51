"""The process's standard streams: a ``--json`` command's stdout carries only its JSON."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """Everything written to stdout (file descriptor 1: Python, C code, child processes) goes to stderr
    while active: lm-eval, vLLM and training loops print there, and a ``--json`` caller's stdout
    carries only its JSON."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
