"""The pruning vocabularies that are plain words, with nothing to run behind them (the methods and the
reconstruction modes are tables: ``methods``). No imports, so that the config, the allocation and the
CLI name them from one place without depending on each other."""

METRICS = ("WIFV", "IFV", "WIFN")  # importance.channel_metric
STRUCTURES = ("AL-AM", "AL-MM", "UL-MM", "UL-UM")  # allocation.allocate
MANUAL_MODULE_STRUCTURES = ("AL-MM", "UL-MM")  # attention and MLP get fixed shares of the budget
GRANULARITIES = ("group", "head")
DTYPES = ("float32", "bfloat16", "float16")
