"""A server subprocess that owns its whole process tree (vLLM's engine core and workers too).

It starts in its own session (process group) and streams its log; ``wait_ready`` polls
``/health``; ``stop`` sends SIGTERM to the server (vLLM shuts its engine down), then to the
group, then SIGKILL, and returns only when no process of the tree is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from flap_deploy.errors import FlapDeployError


def check_port_free(host: str, port: int) -> None:
    """FlapDeployError if ``host:port`` cannot be bound (another server holds it): checked before a model loads."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise FlapDeployError(f"port {port} on {host} is not available ({e.strerror or e})") from None


def with_project_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this project's root first on PYTHONPATH: a server module (``python -m serving.onnx``,
    the vLLM guard) is imported from the project that starts it, installed or a source checkout."""
    root = str(Path(__file__).resolve().parents[1])  # the directory holding the serving package
    paths = [p for p in (env.get("PYTHONPATH") or os.environ.get("PYTHONPATH", "")).split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join([root] + [p for p in paths if p != root])}


def _tree(pid: int) -> set[int]:
    """pid and all its live descendants (psutil ships with vLLM)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        return {pid} | {c.pid for c in proc.children(recursive=True)}
    except Exception:  # noqa: BLE001  process gone or psutil missing
        return {pid}


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        # A zombie child of ours still answers kill(0); reap it if it is ours.
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                continue
        except ChildProcessError:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
            except OSError:
                continue
        alive.add(pid)
    return alive


class ManagedServer:
    """A running HTTP server subprocess: ``start()``, ``wait_ready()``, ``stop()``; a context manager."""

    def __init__(self, command: list[str], base_url: str, *, name: str = "server", env: dict[str, str] | None = None,
                 log: IO[str] | None = None, health: str = "/health"):
        self.command = list(command)
        self.base_url = base_url
        self.health = health  # the path that answers 200 once the server takes requests
        self.name = name
        self.env = dict(env or {})
        self.log = log if log is not None else sys.stderr
        self.proc: subprocess.Popen | None = None
        self._known: set[int] = set()
        self._pump: threading.Thread | None = None
        self.started_at = 0.0
        self.ready_after: float | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        self._known = {self.proc.pid}
        self._pump = threading.Thread(target=self._stream_log, daemon=True)
        self._pump.start()

    def _stream_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.log.write(line)
                self.log.flush()
            except ValueError:  # log closed while stopping
                break

    def wait_ready(self, timeout: float = 900.0, stop: threading.Event | None = None) -> float | None:
        """Poll the health path until it answers 200; seconds since start (None if ``stop`` was set).

        Raises FlapDeployError if the server exits first or is not ready within ``timeout``
        (the caller stops it).
        """
        assert self.proc is not None
        deadline = time.perf_counter() + timeout
        url = self.base_url + self.health
        while time.perf_counter() < deadline:
            if stop is not None and stop.is_set():
                return None
            self._known |= _tree(self.proc.pid)
            if self.proc.poll() is not None:
                raise FlapDeployError(f"{self.name} exited with code {self.proc.returncode} before it was ready "
                                      "(see its log)")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        self.ready_after = time.perf_counter() - self.started_at
                        self._known |= _tree(self.proc.pid)
                        return self.ready_after
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise FlapDeployError(f"{self.name} not ready after {timeout:.0f} s")

    def pids(self) -> set[int]:
        """The live processes of the server's tree (for vLLM: server, engine core, workers)."""
        if self.proc is None:
            return set()
        self._known |= _tree(self.proc.pid)
        return _alive(self._known)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server, then its process group, then SIGKILL; returns when no process is left."""
        if self.proc is None:
            return
        self._known |= _tree(self.proc.pid)
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        steps = ((lambda: self.proc.send_signal(signal.SIGTERM), grace),
                 (lambda: _killpg(pgid, signal.SIGTERM), 10.0),
                 (lambda: _killpg(pgid, signal.SIGKILL), 5.0))
        for send, wait in steps:
            if not _alive(self._known):
                break
            try:
                send()
            except ProcessLookupError:
                pass
            deadline = time.perf_counter() + wait
            while time.perf_counter() < deadline and _alive(self._known):
                self._known |= _tree(self.proc.pid) if self.proc.poll() is None else set()
                time.sleep(0.2)
        for pid in _alive(self._known):  # outside the group (a worker that called setsid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        if self._pump is not None:
            self._pump.join(timeout=5)
        left = _alive(self._known)
        if left:
            raise RuntimeError(f"{self.name}: processes still alive after stop: {sorted(left)}")

    def __enter__(self) -> "ManagedServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    os.killpg(pgid, sig)
