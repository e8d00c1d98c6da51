"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class FlapDeployError(Exception):
    """A problem with the user's input (path, config key, layer, value), not a bug."""


class ParameterError(FlapDeployError, ValueError):
    """A library argument out of range; .param names the parameter (the CLI maps it to its flag)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param} {message}")
        self.param = param
