"""`python serve_tiny.py PORT SHUTDOWN_TIMEOUT`: the server on the slow numpy model, as a real process."""

import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

from serving_fakes import TinyNumpyLM  # noqa: E402
from serving_util import tiny_tokenizer  # noqa: E402

from serving.onnx.app import run_server  # noqa: E402
from serving.onnx.server import OnnxServer  # noqa: E402
from serving.onnx.settings import OnnxServerSettings  # noqa: E402


class Slow(TinyNumpyLM):
    def forward(self, *args):
        time.sleep(0.05)
        return super().forward(*args)


if __name__ == "__main__":
    tok = tiny_tokenizer()
    settings = OnnxServerSettings(model="tiny", max_model_len=256, max_num_seqs=4, port=int(sys.argv[1]),
                                  shutdown_timeout_s=float(sys.argv[2]), log_level="warning")
    sys.exit(run_server(OnnxServer(Slow(vocab=len(tok)), tok, settings)))
