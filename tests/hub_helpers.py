"""A Hugging Face cache and a Hugging Face Hub, both local: what the Hub-id tests resolve against.

``lay_down`` writes model directories into a cache as huggingface_hub lays one out
(``models--org--name/{blobs,refs,snapshots/<commit>}``); ``FakeHub`` answers huggingface_hub's
HTTP requests in-process (repository info, file tree, file downloads, the Hub's error
headers), so its real download code runs with no network.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx2
import huggingface_hub
from huggingface_hub import constants


def lay_down(cache: Path, repo_id: str, revisions: dict[str, Path]) -> dict[str, str]:
    """Each ``ref -> directory`` as a snapshot of ``repo_id`` in ``cache``: ``blobs/<hash>`` (a link to the file,
    so that GB-sized weights are not copied), ``snapshots/<commit>/<file> -> ../../blobs/<hash>`` and
    ``refs/<ref>`` holding the commit. Returns ref -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commits = {}
    for ref, source in revisions.items():
        files = sorted(p for p in Path(source).iterdir() if p.is_file())
        listing = json.dumps([str(Path(source).resolve()), [(p.name, p.stat().st_size) for p in files]])
        commit = hashlib.sha1(listing.encode()).hexdigest()
        for file in files:
            blob = repo / "blobs" / hashlib.sha256(f"{file.resolve()}:{file.stat().st_size}".encode()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                blob.symlink_to(file.resolve())
            link = repo / "snapshots" / commit / file.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        commits[ref] = commit
    return commits


def hub_env(home: Path, cache: Path) -> dict[str, str]:
    """The environment of a subprocess that must find Hub ids in ``cache`` alone."""
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
            "HF_TOKEN": "", "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                             os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


class FakeHub:
    """The Hub's HTTP API for the repositories added to it; ``requests`` logs (method, path)."""

    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str]] = []

    def add(self, repo_id: str, files: dict[str, bytes], *, gated: bool = False) -> str:
        commit = hashlib.sha1(json.dumps(sorted(files)).encode() + repo_id.encode()).hexdigest()
        self.repos[repo_id] = (commit, files)
        if gated:
            self.gated.add(repo_id)
        return commit

    def downloaded(self) -> set[str]:
        return {path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in self.requests
                if method == "GET" and "/resolve/" in path}

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        for prefix in ("/api/models/", "/"):
            if path.startswith(prefix):
                parts = path[len(prefix):].split("/")
                repo_id = "/".join(parts[:2])
                if repo_id in self.repos:
                    return self._answer(repo_id, parts[2:], request)
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"})

    def _answer(self, repo_id: str, rest: list[str], request: httpx2.Request) -> httpx2.Response:
        if repo_id in self.gated:
            return httpx2.Response(403, headers={"X-Error-Code": "GatedRepo"})
        commit, files = self.repos[repo_id]
        if rest[:1] == ["revision"]:
            if rest[1] not in ("main", commit):
                return httpx2.Response(404, headers={"X-Error-Code": "RevisionNotFound"})
            return httpx2.Response(200, json={"id": repo_id, "sha": commit,
                                              "siblings": [{"rfilename": f} for f in files]})
        if rest[:1] == ["tree"]:
            return httpx2.Response(200, json=[{"type": "file", "path": f, "size": len(data),
                                               "oid": hashlib.sha1(data).hexdigest()} for f, data in files.items()])
        if rest[:1] == ["resolve"]:
            data = files["/".join(rest[2:])]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Length": str(len(data))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})

    def install(self, monkeypatch, cache: Path, *, token: str | None = None) -> None:
        """Route huggingface_hub's requests here (until ``uninstall``), its cache to ``cache``, online, with
        ``token`` (or none)."""
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache / "no-token-file"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(cache / "no-tokens-file"))
        if token is None:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        else:
            monkeypatch.setenv("HF_TOKEN", token)
        from huggingface_hub.utils._http import (
            hf_request_event_hook,  # offline mode is enforced there
        )

        huggingface_hub.set_client_factory(lambda: httpx2.Client(
            transport=httpx2.MockTransport(self.handle), event_hooks={"request": [hf_request_event_hook]}))

    @staticmethod
    def uninstall() -> None:
        from huggingface_hub.utils._http import default_client_factory

        huggingface_hub.set_client_factory(default_client_factory)
