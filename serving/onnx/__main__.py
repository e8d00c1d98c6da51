"""``python -m serving.onnx SETTINGS``: the ONNX Runtime server from its settings (JSON, see serving.settings)."""

import sys

from serving.onnx.app import serve_onnx
from serving.onnx.settings import OnnxServerSettings
from serving.settings import run_entry_point

if __name__ == "__main__":
    sys.exit(run_entry_point("serving.onnx", OnnxServerSettings, serve_onnx))
