"""The pruning vocabularies that are plain words, with nothing to run behind them (the methods and the
reconstruction modes are tables: ``methods``), and the search budget's units. Nothing from the pruning
package, so that the config, the allocation, the search and the CLI name them from one place without
depending on each other."""

from __future__ import annotations

from flap_deploy.errors import ParameterError

METRICS = ("WIFV", "IFV", "WIFN")  # importance.channel_metric
STRUCTURES = ("AL-AM", "AL-MM", "UL-MM", "UL-UM")  # allocation.allocate
MANUAL_MODULE_STRUCTURES = ("AL-MM", "UL-MM")  # attention and MLP get fixed shares of the budget
GRANULARITIES = ("group", "head")
DTYPES = ("float32", "bfloat16", "float16")
SECONDS = {"s": 1, "m": 60, "h": 3600}  # a search budget given as a wall time


def parse_budget(value: int | str, param: str = "search_budget") -> tuple[int | None, float | None]:
    """A search budget: a number of candidate evaluations (``200``) or a wall time (``90s``, ``10m``,
    ``1h``); returns (evaluations, seconds), one of them None."""
    text = str(value).strip().lower()
    unit = text[-1:] if text[-1:] in SECONDS else ""
    try:
        amount = float(text[:-1]) if unit else int(text)
    except ValueError:
        raise ParameterError(param, f"{value!r} is neither a number of evaluations (e.g. 200) nor a time "
                                    "(e.g. 90s, 10m, 1h)") from None
    if amount < 0:
        raise ParameterError(param, f"must not be negative, got {value!r}")
    return (None, amount * SECONDS[unit]) if unit else (amount, None)
