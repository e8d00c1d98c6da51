"""Write a directory so that an interrupted run leaves nothing that looks finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import FlapDeployError, ParameterError


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that exists and is not an empty directory, unless overwrite."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FlapDeployError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ParameterError("overwrite", f"is off and output directory {out} exists and is not empty")
    return out


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; rename it into place only if the block succeeds."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a finished output is an ordinary directory
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
