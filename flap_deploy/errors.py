"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class FlapDeployError(Exception):
    """A problem with the user's input (path, config key, layer, value), not a bug."""
