"""Models on the Hugging Face Hub: a repository id fetched into huggingface_hub's own cache.

Only the files flap-deploy reads are fetched: config, tokenizer, safetensors weights and their
index, the JSON files beside them and the model card (for its license). Never pickle weights,
GGUF files or sub-folders such as Meta's ``original/``. huggingface_hub does the work and
keeps its own rules: the cache (``HF_HOME`` / ``HF_HUB_CACHE``), the token (``HF_TOKEN``),
offline mode (``HF_HUB_OFFLINE``), resumable downloads and progress bars. The config comes
first and is checked by the caller before the weights are fetched, so an unsupported model
costs a few kilobytes, not its weights. The Hub's failures become one-line errors that say
what to do.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flap_deploy.errors import FlapDeployError, ParameterError

METADATA = ("*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja", "README.md")
WEIGHTS = ("*.safetensors",)
# Root files only (original/, onnx/, gguf/ ... hold other formats of the same weights); Mistral's
# consolidated.safetensors is the mistral-format copy of the weights beside the HF shards.
IGNORE = ("*/*", "consolidated*")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def is_repo_id(arg: str) -> bool:
    """Whether ``arg`` is spelled as a Hub model id, ``namespace/name`` (the caller has made sure that no
    local directory has that name: a local directory wins)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if arg.count("/") != 1 or arg.startswith((".", "~")):
        return False
    try:
        validate_repo_id(arg)
    except HFValidationError:
        return False
    return True


def fetch(repo_id: str, revision: str | None, check: Callable[[dict[str, Any]], None]) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision`` (default: the main branch) with config,
    tokenizer and safetensors weights; ``check(config)`` runs before any weight file is fetched."""
    path = _snapshot(repo_id, revision, METADATA)
    config = path / "config.json"
    if config.is_file():
        try:
            check(json.loads(config.read_text()))
        except json.JSONDecodeError as e:
            raise FlapDeployError(f"{repo_id}: config.json is not valid JSON ({e})") from None
    # without a config.json the caller's own reading names the problem
    pickles = _pickle_only(repo_id, path)
    if pickles:
        raise FlapDeployError(
            f"model '{repo_id}' has only pickle weights ({', '.join(pickles[:3])}): flap-deploy reads safetensors "
            "only (unpickling can run arbitrary code, and safetensors are read one tensor at a time); pick a "
            "revision with safetensors (the Hub's conversion bot opens one as a pull request: --revision refs/pr/N)")
    return _snapshot(repo_id, revision, METADATA + WEIGHTS)


def _snapshot(repo_id: str, revision: str | None, patterns: tuple[str, ...]) -> Path:
    from huggingface_hub import constants, get_token, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from flap_deploy.version import __version__

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns),
                                      ignore_patterns=list(IGNORE), library_name="flap-deploy",
                                      library_version=__version__))
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        token = "the token in HF_TOKEN has no access yet" if get_token() else "no token is set"
        raise FlapDeployError(
            f"model '{repo_id}' is gated and {token}: accept its conditions at https://huggingface.co/{repo_id}, "
            "then set HF_TOKEN to a token of that account (https://huggingface.co/settings/tokens)") from None
    except RepositoryNotFoundError:
        private = "" if get_token() else " (a private one needs HF_TOKEN)"
        raise FlapDeployError(f"model '{repo_id}' not found: no such directory, and no Hugging Face Hub "
                              f"repository of that name{private}") from None
    except RevisionNotFoundError:
        raise ParameterError("revision", f"'{revision}' is not a branch, tag or commit of {repo_id}") from None
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the Hub cannot be reached ({type(e.__cause__ or e).__name__})")
        raise FlapDeployError(
            f"model '{repo_id}' not found: no such directory, and {'revision ' + revision if revision else 'it'} is "
            f"not in the Hugging Face cache {constants.HF_HUB_CACHE} while {why}; cached: {cached_models()}") from None
    except HfHubHTTPError as e:
        raise FlapDeployError(f"model '{repo_id}': the Hugging Face Hub answered "
                              f"{' '.join(str(e).split())[:200]}") from None


def _pickle_only(repo_id: str, snapshot: Path) -> list[str]:
    """The pickle weight files of a repository without safetensors (empty when it has safetensors):
    the repository's file list as huggingface_hub cached it, and what the snapshot holds."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    names = {p.name for p in snapshot.iterdir()}
    try:
        names |= {f.path for f in get_cached_repo_tree(repo_id, revision=snapshot.name) if "/" not in f.path}
    except CachedRepoTreeNotFoundError:  # an offline snapshot laid down by hand: its own files tell
        pass
    if any(n.endswith(".safetensors") for n in names):
        return []
    return sorted(n for n in names if Path(n).suffix in PICKLE_SUFFIXES)


def cached_models() -> str:
    """The models in the Hugging Face cache with their cached revisions, e.g. 'org/a (main), org/b (main, v2)'."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = [r for r in scan_cache_dir(constants.HF_HUB_CACHE).repos if r.repo_type == "model"]
    except CacheNotFound:
        return "none"
    listed = []
    for repo in sorted(repos, key=lambda r: r.repo_id):
        refs = sorted(ref for rev in repo.revisions for ref in rev.refs)
        listed.append(f"{repo.repo_id} ({', '.join(refs) or 'commits only'})")
    return ", ".join(listed) or "none"
