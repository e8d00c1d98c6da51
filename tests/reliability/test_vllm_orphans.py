"""vLLM cannot outlive its launcher, and its API key is not on any command line (probes of issue 13)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving_util import free_port
from vllm_helpers import needs_vllm, vllm_env

from serving.vllm.launcher import SERVER_MODULE, VllmServerConfig, build_command, build_env

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]


def test_api_key_goes_through_the_environment_not_argv():
    cfg = VllmServerConfig(model=Path("/m"), served_model_name="m", api_key="sk-secret")
    assert not any("sk-secret" in a for a in build_command(cfg))
    assert build_env(cfg)["VLLM_API_KEY"] == "sk-secret"


def _tree(pid: int) -> set[int]:
    import psutil

    try:
        return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _live(pids: set[int]) -> set[int]:
    import psutil

    live = set()
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                live.add(p)
        except psutil.NoSuchProcess:
            pass
    return live


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_sigkill_of_the_launcher_leaves_no_vllm_process(bundled_dir):
    """The launcher is killed once vLLM's engine core exists (API server + engine core: the tree that
    used to survive with parent 1); waiting for readiness would prove nothing more."""
    import psutil

    port = free_port()
    cmd = [sys.executable, "-m", "flap_deploy_cli", "serve", str(bundled_dir), "--backend", "vllm", "--port",
           str(port), "--api-key", "sk-secret", "--", "--max-model-len", "256", "--enforce-eager",
           "--load-format", "dummy"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=vllm_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: set[int] = set()
    try:
        deadline = time.time() + 600
        api = None
        while time.time() < deadline and launcher.poll() is None:
            seen |= _tree(launcher.pid)
            api = next((p for p in _live(seen) if SERVER_MODULE in " ".join(psutil.Process(p).cmdline())), api)
            if api is not None and _tree(api) - {api}:  # the engine core has started
                break
            time.sleep(0.2)
        assert api is not None and _tree(api) - {api}, "vLLM's engine core never started"
        seen |= _tree(launcher.pid)
        # on the real process too: the key is in the environment, not on the command line
        assert not any("sk-secret" in a for a in psutil.Process(api).cmdline())
        assert b"VLLM_API_KEY=sk-secret" in Path(f"/proc/{api}/environ").read_bytes()
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        seen.discard(launcher.pid)
        gone_by = time.time() + 30
        while _live(seen) and time.time() < gone_by:
            time.sleep(0.5)
        assert not _live(seen), f"left behind: {[psutil.Process(p).cmdline()[:4] for p in _live(seen)]}"
    finally:
        for p in _live(seen | {launcher.pid}):
            os.kill(p, signal.SIGKILL)
