"""``python -m serving.vllm SETTINGS``: every check, then vLLM's OpenAI server (settings as JSON, see serving.settings)."""

import sys

from serving.settings import run_entry_point
from serving.vllm.launcher import serve_vllm
from serving.vllm.settings import VllmServerSettings

if __name__ == "__main__":
    sys.exit(run_entry_point("serving.vllm", VllmServerSettings, serve_vllm))
