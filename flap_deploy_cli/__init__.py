"""The application layer: the `flap-deploy` command line and `make demo`.

It sits above the library (``flap_deploy`` → ``exporters`` → ``serving``) and imports each of
them only inside the command that needs it, so `flap-deploy --help` and usage errors answer
without loading torch. The library speaks in parameters, this layer in flags: a library
``ParameterError("ratio", ...)`` is printed as ``error: --ratio ...``.
"""

from .main import main

__all__ = ["main"]
