"""Hugging Face Hub ids as MODEL arguments: fetched through huggingface_hub (an in-process Hub or a
local cache, never the network), only the files flap-deploy reads, and the Hub's failures as
one-line errors that write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from factories import tiny_dense
from hub_helpers import FakeHub, hub_env, lay_down
from huggingface_hub import ModelCard, constants

from flap_deploy.errors import FlapDeployError
from flap_deploy.io.model_ref import resolve_model
from flap_deploy_cli import main

README = "---\nlicense: apache-2.0\n---\n# tiny\n"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    path = tmp_path_factory.mktemp("tiny")
    tiny_dense("llama").save_pretrained(path)
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    hub = FakeHub()
    hub.install(monkeypatch, tmp_path / "hf-cache")
    yield hub
    hub.uninstall()


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [part for line in res.output.splitlines() for part in line.split("\r") if part.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.output
    return errors[0]


def test_a_hub_id_fetches_config_tokenizer_safetensors_and_card_only(hub, tiny_files):
    commit = hub.add("org/tiny", {**tiny_files, "README.md": README.encode(), "tokenizer.json": b"{}",
                                  "pytorch_model.bin": b"pickle", "model.gguf": b"gguf", "original/params.json": b"{}",
                                  "original/consolidated.00.pth": b"pickle", "consolidated.safetensors": b"copy",
                                  "onnx/model.onnx": b"onnx"})
    ref = resolve_model("org/tiny")
    assert (ref.kind, ref.name, ref.revision, ref.path.name) == ("dense", "org/tiny", commit, commit)
    wanted = {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json"}
    assert hub.downloaded() == wanted
    assert {p.name for p in ref.path.iterdir()} == wanted
    # the config (and the rest of the metadata) came before any weight file
    gets = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert gets[-1].endswith("model.safetensors")


def test_an_unsupported_architecture_fetches_no_weights(hub):
    hub.add("org/gpt", {"config.json": json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}).encode(),
                        "model.safetensors": b"weights"})
    with pytest.raises(FlapDeployError, match="unsupported architecture 'GPT2LMHeadModel'"):
        resolve_model("org/gpt")
    assert hub.downloaded() == {"config.json"}


def test_a_checkpoint_of_the_wrong_kind_fetches_no_weights(hub, tiny_files):
    hub.add("org/tiny", tiny_files)
    with pytest.raises(FlapDeployError, match="org/tiny: a dense checkpoint; expected pruned"):
        resolve_model("org/tiny", accept=("pruned",))
    assert "model.safetensors" not in hub.downloaded()


def test_missing_repository_is_one_line_and_writes_nothing(hub, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune", "org/missing", str(out)])
    assert one_line_error(res) == ("error: model 'org/missing' not found: no such directory, and no Hugging Face "
                                   "Hub repository of that name (a private one needs HF_TOKEN)")
    assert not out.exists()


@pytest.mark.parametrize("token, says", [(None, "no token is set"), ("hf_x", "the token in HF_TOKEN has no access yet")])
def test_gated_repository_says_how_to_get_access(hub, monkeypatch, tmp_path, tiny_files, token, says):
    hub.install(monkeypatch, tmp_path / "hf-cache", token=token)
    hub.add("org/gated", tiny_files, gated=True)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune", "org/gated", str(out)])
    assert one_line_error(res) == (f"error: model 'org/gated' is gated and {says}: accept its conditions at "
                                   "https://huggingface.co/org/gated, then set HF_TOKEN to a token of that account "
                                   "(https://huggingface.co/settings/tokens)")
    assert not out.exists()


def test_offline_and_not_cached_names_hf_hub_offline_and_the_cache(hub, monkeypatch, tmp_path, tiny_files):
    cache = tmp_path / "hf-cache"
    source = tmp_path / "cached-model"
    source.mkdir()
    for name, data in tiny_files.items():
        (source / name).write_bytes(data)
    lay_down(cache, "org/cached", {"main": source, "v2": source})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune", "org/elsewhere", str(out)])
    assert one_line_error(res) == (f"error: model 'org/elsewhere' not found: no such directory, and it is not in the "
                                   f"Hugging Face cache {cache} while HF_HUB_OFFLINE is set; cached: org/cached "
                                   "(main, v2)")
    res = CliRunner().invoke(main, ["prune", "org/cached", str(out), "--revision", "v3"])
    assert "revision v3 is not in the Hugging Face cache" in one_line_error(res)
    assert not out.exists() and hub.requests == []


def test_pickle_only_repository_says_safetensors_are_required_and_why(hub, tmp_path, tiny_files):
    hub.add("org/pickled", {"config.json": tiny_files["config.json"], "pytorch_model.bin": b"pickle"})
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["prune", "org/pickled", str(out)])
    assert one_line_error(res) == (
        "error: model 'org/pickled' has only pickle weights (pytorch_model.bin): flap-deploy reads safetensors only "
        "(unpickling can run arbitrary code, and safetensors are read one tensor at a time); pick a revision with "
        "safetensors (the Hub's conversion bot opens one as a pull request: --revision refs/pr/N)")
    assert "pytorch_model.bin" not in hub.downloaded() and not out.exists()


def test_unknown_revision_names_the_flag(hub, tmp_path, tiny_files):
    hub.add("org/tiny", tiny_files)
    res = CliRunner().invoke(main, ["info", "org/tiny", "--revision", "nope"])
    assert one_line_error(res) == "error: --revision 'nope' is not a branch, tag or commit of org/tiny"


def test_a_local_directory_wins_over_a_hub_id_of_the_same_spelling(hub, monkeypatch, tmp_path, tiny_files):
    hub.add("org/tiny", tiny_files)
    monkeypatch.chdir(tmp_path)
    tiny_dense("qwen3").save_pretrained(tmp_path / "org" / "tiny")
    ref = resolve_model("org/tiny")
    assert ref.config["model_type"] == "qwen3" and ref.revision is None and hub.requests == []
    res = CliRunner().invoke(main, ["info", "org/tiny", "--revision", "main"])
    assert one_line_error(res) == ("error: --revision applies to a Hugging Face Hub id (namespace/name); 'org/tiny' "
                                   "is not one")


def test_revision_with_no_hub_id_among_the_arguments_is_an_error(tmp_path):
    dense, pruned = tmp_path / "a", tmp_path / "b"
    res = CliRunner().invoke(main, ["compare", str(dense), str(pruned), "--revision", "v1", "--backend", "onnx",
                                    "--out", str(tmp_path / "cmp")])
    assert one_line_error(res) == (f"error: --revision v1: applies to Hugging Face Hub ids, and no MODEL argument is "
                                   f"one ({dense}, {pruned})")


def test_the_cache_alone_resolves_each_revision(monkeypatch, tmp_path):
    cache = tmp_path / "hf-cache"
    for family in ("llama", "qwen3"):
        tiny_dense(family).save_pretrained(tmp_path / family)
    commits = lay_down(cache, "org/tiny", {"main": tmp_path / "llama", "v2": tmp_path / "qwen3"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/tiny").config["model_type"] == "llama"
    for revision in ("v2", commits["v2"]):
        ref = resolve_model("org/tiny", revision=revision)
        assert (ref.config["model_type"], ref.revision, ref.arg) == ("qwen3", commits["v2"], "org/tiny")


# ------------------------------------------------------------------ the commands, on the bundled model

REPO_ID = "flap-test/smollm2-135m"


@pytest.fixture(scope="module")
def hub_cache(bundled_dir, flap20_dir, tmp_path_factory):
    """A Hugging Face cache holding the bundled model as REPO_ID's main branch and the FLAP-20 % model as its
    'flap20' branch (files linked, not copied). Its snapshots' ONNX exports are those of the linked directories
    (``ensure_onnx`` keys on where the weight bytes live), cached like every other test model's."""
    from flap_deploy.io.bundled import cache_dir

    cache = cache_dir() / f"test-hf-hub-{flap20_dir.name}"
    commits = lay_down(cache, REPO_ID, {"main": bundled_dir, "flap20": flap20_dir})
    return cache, commits, hub_env(tmp_path_factory.mktemp("hf-home"), cache)


def cli(env, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "flap_deploy_cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_prune_takes_a_hub_id_and_records_its_revision(hub_cache, tmp_path):
    _, commits, env = hub_cache
    out = tmp_path / "pruned"
    res = cli(env, "prune", REPO_ID, out, "--method", "mag-sp", "--ratio", "0.2", "--json")
    assert res.returncode == 0, res.stderr
    provenance = json.loads(res.stdout)["provenance"]
    assert (provenance["source_model"], provenance["source_revision"]) == (REPO_ID, commits["main"])
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == REPO_ID and f"commit `{commits['main']}`" in card.text
    refused = tmp_path / "refused"
    res = cli(env, "prune", REPO_ID, refused, "--revision", "flap20")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == \
        f"error: {REPO_ID}: a pruned checkpoint; expected dense"
    assert not refused.exists()


TEXT = Path(__file__).resolve().parent.parent / "README.md"  # any English text will do


@pytest.mark.slow
def test_eval_at_a_revision_measures_that_snapshot(hub_cache, flap20_dir):
    _, _, env = hub_cache
    res = cli(env, "eval", REPO_ID, "--revision", "flap20", "--text", TEXT, "--max-tokens", 1024, "--seqlen", 128,
              "--json")
    assert res.returncode == 0, res.stderr
    from flap_deploy.evaluation.perplexity import evaluate
    from flap_deploy.io.text import load_text

    ref = resolve_model(flap20_dir)
    local = evaluate(ref, ref.tokenizer(), load_text(TEXT), seqlen=128, max_tokens=1024, progress=False)
    measured = json.loads(res.stdout)
    assert measured["model"] == REPO_ID
    assert measured["perplexity"] == pytest.approx(local.perplexity, rel=1e-5)


@pytest.mark.slow
def test_serve_answers_under_the_hub_id(hub_cache, flap20_dir, tmp_path):
    """The ONNX backend: the snapshot is exported once into the flap-deploy cache, then served."""
    from serving_util import free_port

    from serving.process import ManagedServer

    _, _, env = hub_cache
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = ManagedServer([sys.executable, "-m", "flap_deploy_cli", "serve", REPO_ID, "--revision", "flap20",
                            "--backend", "onnx", "--port", str(port), "--threads", "2", "--max-model-len", "256"],
                           f"http://127.0.0.1:{port}", env=env, log=log)
    with server:
        server.wait_ready(timeout=900)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [REPO_ID]
        done = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                          json={"model": REPO_ID, "prompt": "The capital of France is", "max_tokens": 4}).json()
        assert done["usage"]["completion_tokens"] == 4
    from exporters.onnx.export import ensure_onnx

    cache, commits, _ = hub_cache
    snapshot = cache / ("models--" + REPO_ID.replace("/", "--")) / "snapshots" / commits["flap20"]
    assert ensure_onnx(snapshot, progress=False) == ensure_onnx(flap20_dir, progress=False)  # one export, shared


@pytest.mark.slow
def test_compare_takes_a_hub_id_at_a_revision(hub_cache, bundled_dir, flap20_dir, tmp_path):
    from serving.measure.compare import ideal_ratio

    _, _, env = hub_cache
    out = tmp_path / "cmp"
    res = cli(env, "compare", "smollm2-135m", REPO_ID, "--revision", "flap20", "--backend", "onnx", "--out", out,
              "--concurrency", "1", "--num-prompts", "2", "--workload", "fixed:8,4", "--repeats", "1",
              "--warmup", "0", "--threads", "2", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["dense"], report["pruned"]) == ("smollm2-135m", REPO_ID)
    assert report["weights"]["ideal_ratio"] == pytest.approx(ideal_ratio(bundled_dir, flap20_dir, "onnx")["ideal_ratio"])
    assert json.loads(res.stdout)["card"] is None  # a Hub snapshot stays as it was fetched
