"""Zero-shot task accuracy through EleutherAI's lm-evaluation-harness (``lm_eval.simple_evaluate``).

What the FLAP paper reports besides perplexity: accuracy on commonsense tasks, dense vs
pruned. This module chooses the tasks and runs lm-eval; lm-eval does the scoring (no task
runner of our own). Three kinds of task spec, comma-separated:

* lm-eval task or group names (``boolq``, ``arc_easy``) and the preset ``paper`` (the paper's
  seven tasks): lm-eval's own configs, whose datasets come from the Hugging Face Hub
  (needs the network, or a filled ``datasets`` cache);
* a path to an lm-eval task YAML with local JSON/JSONL data files (``dataset_path: json``,
  ``dataset_kwargs.data_files``): offline evaluation on one's own data;
* the preset ``offline``: the task set made here (``build_offline_tasks``) from WikiText-2
  text read in place, generated at run time into the cache, for tests and the demo.

The pruned checkpoint is loaded by lm-eval's own HF backend: ``import flap_deploy`` has
registered ``flap_llama`` with transformers' Auto classes. The vLLM backend
(``serving.vllm.tasks``) calls ``run_tasks`` with lm-eval's ``vllm`` model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flap_deploy.errors import FlapDeployError, ParameterError

PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
OFFLINE_TASKS = ("wikitext_cloze", "wikitext_ending")
PRESETS = {"paper": PAPER_TASKS, "offline": OFFLINE_TASKS}
METRICS = ("acc", "acc_norm")
DTYPES = ("float32", "bfloat16", "float16")
# Tasks scored by the log-likelihood of given continuations (accuracy); not generation or rolling perplexity.
OUTPUT_TYPES = ("multiple_choice", "loglikelihood")

# Bump when the items change: it is part of the cache key of the generated set.
OFFLINE_VERSION = 3
OFFLINE_ITEMS = 500
CHOICES = 4


# ---------------------------------------------------------------- the offline task set

def default_task_text() -> Path:
    """The text of the offline set: $FLAP_DEPLOY_TASK_TEXT, else WikiText-2 test in the
    ``shared/data`` folder beside this checkout (read in place, never copied)."""
    env = os.environ.get("FLAP_DEPLOY_TASK_TEXT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "test.txt"


def _sentences(text: str) -> list[list[str]]:
    """WikiText sentences as word lists: paragraph lines split after " . ", headings and
    sentences with ``<unk>`` left out."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for sentence in re.split(r"(?<= \.) ", " " + line):
            words = sentence.split()
            if words and words[-1] == "." and "<unk>" not in words:
                out.append(words)
    return out


def _detok(words: list[str]) -> str:
    from flap_deploy.io.text import detokenize_wikitext

    return detokenize_wikitext(" " + " ".join(words) + " ").strip()


def _is_word(word: str) -> bool:
    return word.isalpha() and len(word) >= 3


def _clean_cut(words: list[str], k: int) -> bool:
    """Context ``words[:k]`` and continuation ``words[k:]`` join with one plain space: the
    continuation starts with a letter or digit and the context does not end in a WikiText
    joiner (@-@, @,@, @.@)."""
    return 0 < k < len(words) and words[k][0].isalnum() and not words[k - 1].startswith("@")


def _shuffled_choices(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def cloze_items(sentences: list[list[str]], n: int, seed: int) -> list[dict[str, Any]]:
    """Next-word cloze: a sentence's first words, then its true next word vs ``CHOICES - 1``
    words drawn (frequency-weighted) from the same text. Chance: 1 / CHOICES."""
    rng = random.Random(seed)
    stream = [w for s in sentences for w in s if _is_word(w)]
    order = list(range(len(sentences)))
    rng.shuffle(order)
    items = []
    for i in order:
        words = sentences[i]
        cuts = [k for k in range(6, min(len(words) - 1, 30)) if _is_word(words[k]) and _clean_cut(words, k)]
        if not cuts:
            continue
        k = rng.choice(cuts)
        answer = words[k]
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            w = rng.choice(stream)
            if w.lower() != answer.lower() and w not in distractors:
                distractors.append(w)
        choices, label = _shuffled_choices(rng, answer, distractors)
        items.append({"context": _detok(words[:k]), "choices": choices, "label": label})
        if len(items) == n:
            break
    return items


def ending_items(sentences: list[list[str]], n: int, seed: int) -> list[dict[str, Any]]:
    """Sentence endings (HellaSwag-like multiple choice): a sentence's beginning, then its true
    last ``m`` words vs the last ``m`` words of nearby sentences (same article, same topic).
    Chance: 1 / CHOICES."""
    rng = random.Random(seed)
    pool = [s for s in sentences if 12 <= len(s) <= 40]
    order = list(range(len(pool)))
    rng.shuffle(order)
    items = []
    for i in order:
        words = pool[i]
        m = rng.randint(4, 8)
        if not _clean_cut(words, len(words) - m):
            continue
        answer = _detok(words[-m:])
        nearby = [_detok(pool[j][-m:]) for j in range(max(0, i - 20), min(len(pool), i + 21))
                  if j != i and _clean_cut(pool[j], len(pool[j]) - m)]
        nearby = sorted(set(nearby) - {answer})
        if len(nearby) < CHOICES - 1:
            continue
        choices, label = _shuffled_choices(rng, answer, rng.sample(nearby, CHOICES - 1))
        items.append({"context": _detok(words[:-m]), "choices": choices, "label": label})
        if len(items) == n:
            break
    return items


_TASK_YAML = """\
# Generated by flap_deploy.evaluation.tasks.build_offline_tasks from {source} (read in place).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def build_offline_tasks(text: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                        n_items: int = OFFLINE_ITEMS, seed: int = 0) -> Path:
    """Generate the offline task set (lm-eval YAML + JSONL per task) from ``text`` (default
    ``default_task_text()``) into ``root`` (default: the flap-deploy cache); return the folder.

    Deterministic: the folder is keyed by the text's hash, the generator version, the item
    count and the seed, and is reused when it exists."""
    from flap_deploy.io.atomic import atomic_directory
    from flap_deploy.io.bundled import cache_dir

    source = Path(text) if text is not None else default_task_text()
    if not source.is_file():
        raise ParameterError("task_text", f"{source}: no such file (the offline task set is built from it; "
                                          "WikiText-2 test.txt, or set FLAP_DEPLOY_TASK_TEXT)")
    raw = source.read_bytes()
    key = hashlib.sha256(raw + f"|v{OFFLINE_VERSION}|{n_items}|{seed}".encode()).hexdigest()[:16]
    out = Path(root) if root is not None else cache_dir() / "tasks"
    out = out / f"offline-{key}"
    if all((out / f"{t}.yaml").is_file() for t in OFFLINE_TASKS):
        return out
    try:
        sentences = _sentences(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ParameterError("task_text", f"{source}: not UTF-8 text") from None
    makers = {"wikitext_cloze": cloze_items, "wikitext_ending": ending_items}
    with atomic_directory(out, overwrite=True) as tmp:
        for offset, task in enumerate(OFFLINE_TASKS):
            items = makers[task](sentences, n_items, seed + offset)
            if len(items) < 10:
                raise ParameterError("task_text", f"{source}: too little text for the offline tasks "
                                                  f"({len(items)} {task} items)")
            with open(tmp / f"{task}.jsonl", "w", encoding="utf-8") as f:
                for item in items:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
            (tmp / f"{task}.yaml").write_text(_TASK_YAML.format(
                source=source, task=task, data=json.dumps(str(out / f"{task}.jsonl")), version=OFFLINE_VERSION))
    return out


# ---------------------------------------------------------------- choosing the tasks

@dataclass
class TaskSelection:
    """What ``--tasks`` named: ``specs`` for lm-eval's TaskManager (names, YAML paths), whether
    lm-eval's own task configs are needed, and the chance accuracy of tasks that state one."""

    specs: list[str]
    defaults: bool = False
    chance: dict[str, float] = field(default_factory=dict)


def _data_files(cfg: dict[str, Any]) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    return list(files or [])


def check_task_yaml(path: str | os.PathLike) -> str:
    """Check a local lm-eval task YAML before anything runs (parses, names a task or group,
    its local data files exist); return the task's name."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path)
    if not path.is_file():
        raise ParameterError("tasks", f"{path}: no such task YAML")
    try:
        cfg = load_yaml(path, resolve_func=False)
    except Exception as e:  # noqa: BLE001  (yaml errors, bad includes: the user's file)
        raise FlapDeployError(f"task YAML {path}: cannot be read ({str(e).splitlines()[0]})") from None
    name = (cfg.get("group") or cfg.get("task")) if isinstance(cfg, dict) else None
    if not isinstance(name, str):
        raise FlapDeployError(f"task YAML {path}: no 'task' (or 'group') name")
    for f in _data_files(cfg):
        if not Path(f).expanduser().exists():
            raise FlapDeployError(f"task YAML {path}: dataset_kwargs.data_files {f}: no such file"
                                  + ("" if Path(f).is_absolute() else " (relative to the working directory)"))
    return name


def select_tasks(tasks: str, *, task_text: str | os.PathLike | None = None) -> TaskSelection:
    """Parse ``--tasks``: comma-separated lm-eval task/group names, presets (``paper``,
    ``offline``), the offline tasks by name and paths to task YAMLs. Checks everything it can
    without a model: YAMLs and their data files, and names against lm-eval's task index."""
    items = [t.strip() for t in tasks.split(",") if t.strip()]
    if not items:
        raise ParameterError("tasks", "is empty: give task names, 'paper', 'offline' or a task YAML")
    selection = TaskSelection(specs=[])
    names: list[str] = []
    for item in items:
        if item == "offline" or item in OFFLINE_TASKS:
            root = build_offline_tasks(task_text)
            chosen = OFFLINE_TASKS if item == "offline" else (item,)
            selection.specs += [str(root / f"{t}.yaml") for t in chosen]
            selection.chance.update({t: 1 / CHOICES for t in chosen})
        elif item in PRESETS:
            names += PRESETS[item]
        elif item.endswith((".yaml", ".yml")) or os.sep in item:
            check_task_yaml(item)
            selection.specs.append(str(Path(item).expanduser().resolve()))
        else:
            names.append(item)
    if names:
        known = lm_eval_task_names()
        for name in names:
            if name not in known:
                raise ParameterError("tasks", f"'{name}': not an lm-eval task, group or tag, a preset "
                                              f"({', '.join(PRESETS)}) or a task YAML path")
        selection.specs += names
        selection.defaults = True
    if len(set(selection.specs)) != len(selection.specs):
        raise ParameterError("tasks", "names a task twice")
    return selection


def lm_eval_task_names() -> set[str]:
    """Every task, group and tag name that lm-eval's own configs define."""
    return set(_task_manager(True).all_tasks)


_MANAGERS: dict[bool, Any] = {}


def _task_manager(defaults: bool) -> Any:
    """lm-eval's TaskManager (indexing its own ~15k configs takes seconds: built once)."""
    if defaults not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[defaults] = TaskManager(include_defaults=defaults)
    return _MANAGERS[defaults]


def load_tasks(selection: TaskSelection) -> list[Any]:
    """lm-eval Task objects for a selection, datasets loaded (so a dataset that cannot be
    reached fails here, before any model loads). Groups are expanded to their tasks."""
    manager = _task_manager(selection.defaults)
    loaded: dict[str, Any] = {}
    for spec in selection.specs:
        try:
            tasks = manager.load([spec])["tasks"]
        except ConnectionError as e:
            raise FlapDeployError(
                f"task {spec}: its dataset cannot be downloaded ({str(e).splitlines()[0]}); lm-eval's own "
                "tasks need the Hugging Face Hub (or its datasets cache); offline, use --tasks offline or "
                "a task YAML with local data files") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FlapDeployError(f"task {spec}: lm-eval cannot load it ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''})") from None
        for name, task in tasks.items():
            kind = task.get_config("output_type")
            if kind not in OUTPUT_TYPES:
                raise FlapDeployError(f"task {name}: output_type {kind}; only scored-choice tasks "
                                      f"({', '.join(OUTPUT_TYPES)}) are supported")
            loaded[name] = task
    return list(loaded.values())


# ---------------------------------------------------------------- running lm-eval

def hf_model_args(ref: Any, dtype: str = "float32", max_length: int = 2048) -> dict[str, Any]:
    """lm-eval ``hf`` backend arguments: it loads the checkpoint itself through
    AutoModelForCausalLM (flap_llama registered by ``import flap_deploy``)."""
    return {"pretrained": str(ref.path), "dtype": dtype, "device": "cpu", "max_length": max_length}


def run_tasks(ref: Any, tasks: list[Any], *, lm: Any = None, backend: str = "hf", limit: int | None = None,
              batch_size: int | str = 16, dtype: str = "float32", progress: bool = False) -> dict[str, Any]:
    """Evaluate one model (a ``ModelRef``) on loaded lm-eval ``tasks`` with ``simple_evaluate``;
    return per task ``n``, each metric's value and stderr, and per item the predicted choice
    (``predictions``) and the choices' log-likelihoods.

    ``lm``: an lm-eval LM built by the caller (``serving.vllm.tasks`` builds lm-eval's ``vllm``
    model, ``backend`` then names it); by default lm-eval's ``hf`` backend loads ``ref`` itself."""
    import logging
    import time

    from flap_deploy.model.registration import register_auto_classes
    register_auto_classes()
    from lm_eval import simple_evaluate

    check_limit(limit)
    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    model, args = (lm, None) if lm is not None else ("hf", hf_model_args(ref, dtype))
    t0 = time.perf_counter()
    out = simple_evaluate(model=model, model_args=args, tasks=tasks, limit=limit, batch_size=batch_size,
                          log_samples=True)
    seconds = time.perf_counter() - t0
    return {"model": ref.name, "path": str(ref.path), "backend": backend if lm is not None else "hf",
            "dtype": dtype, "limit": limit, "seconds": seconds, "lm_eval_version": out.get("lm_eval_version"),
            "tasks": {name: _task_result(out, name) for name in out["results"] if name in out["samples"]}}


def _task_result(out: dict[str, Any], name: str) -> dict[str, Any]:
    raw = out["results"][name]
    metrics = {}
    for metric in METRICS:
        if f"{metric},none" in raw:
            value, stderr = raw[f"{metric},none"], raw.get(f"{metric}_stderr,none")
            metrics[metric] = {"value": value, "stderr": stderr if isinstance(stderr, (int, float)) else None}
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    loglik = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    if out["configs"][name].get("output_type") == "multiple_choice":
        predictions = [max(range(len(ll)), key=ll.__getitem__) for ll in loglik]  # the chosen answer
    else:  # loglikelihood: whether the continuation is the greedy one
        predictions = [int(bool(s["filtered_resps"][0][1])) for s in samples]
    return {"n": len(samples), "metrics": metrics, "targets": [s["target"] for s in samples],
            "predictions": predictions, "loglikelihoods": loglik}


def check_limit(limit: int | None) -> None:
    """``limit``: None (every item) or a positive number of items per task."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ParameterError("limit", f"must be a positive number of items per task, got {limit}")
