"""Write a directory so that an interrupted run leaves nothing that looks finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flap_deploy.errors import FlapDeployError, ParameterError


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output path that exists and is not an empty directory, unless overwrite, or one
    whose nearest existing ancestor cannot take a new directory (probed, and removed at once)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise FlapDeployError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ParameterError("overwrite", f"is off and output directory {out} exists and is not empty")
    base = out.absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise FlapDeployError(f"output path {out}: {base} is not a directory")
    try:  # the write that atomic_directory will do, tried now rather than after hours of work
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=base))
    except OSError as e:
        raise FlapDeployError(f"output path {out}: cannot create a directory in {base} ({e.strerror or e})") from None
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
