"""The model card of every pruned checkpoint and export: README.md with the Hub's YAML metadata.

One writer. A card is rendered from ``flap_card.json`` beside it, which holds everything the card
says: the facts of the checkpoint (its provenance and what its config implies: parameter counts,
KV-cache bytes per token), the form of the directory (which decides how it is loaded and
served), the source's license, and the results measured on this directory (``eval --card``,
``compare``). A card never states a figure that is not in one of those.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flap_deploy.errors import FlapDeployError

CARD = "README.md"
CARD_STATE = "flap_card.json"
WIDTHS_PLOT = "flap_widths.png"
KV_ELEMENT_BYTES = 2  # a bf16 / fp16 KV cache, what serving engines keep


@dataclass(frozen=True)
class Form:
    """What kind of directory a card describes, and how it runs."""

    library: str
    tags: tuple[str, ...]
    title: str
    usage: str  # markdown; {path} is the directory


FORMS = {
    "pruned": Form("transformers", (), "pruned checkpoint (flap_llama)", """\
transformers (`import flap_deploy` registers the architecture; without flap-deploy pass
`trust_remote_code=True`, which runs the `modeling_flap_llama.py` shipped here):

```python
import flap_deploy
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{path}")
tokenizer = AutoTokenizer.from_pretrained("{path}")
```

vLLM (flap-deploy installed beside it: its plugin registers `FlapLlamaForCausalLM`), or
flap-deploy's own OpenAI-compatible server:

```bash
vllm serve {path}{vllm_tp}
flap-deploy serve {path}{flap_tp}
```
"""),
    "quantized": Form("transformers", ("compressed-tensors",), "quantized pruned checkpoint (compressed-tensors)", """\
vLLM (flap-deploy installed beside it: its plugin registers `FlapLlamaForCausalLM`):

```bash
vllm serve {path}{vllm_tp}
flap-deploy serve {path} --backend vllm{flap_tp}
```
"""),
    "onnx": Form("onnx", ("onnx",), "ONNX Runtime export", """\
flap-deploy's OpenAI-compatible server on ONNX Runtime, or one generation:

```bash
flap-deploy serve {path} --backend onnx
flap-deploy generate {path} "The capital of France is"
```

```python
from exporters.onnx import OnnxCausalLM

model = OnnxCausalLM.from_dir("{path}")
```
"""),
    "hf": Form("transformers", ("per-layer-config",), "checkpoint in transformers' per-layer form", """\
`config.json` is the source family's, with transformers' `per_layer_config` (transformers >= 5.19
reads it: `AutoConfig.from_pretrained("{path}").per_layer_config[i]`). Stock modeling classes
do not build per-layer widths yet (transformers #45332, vLLM #36512), and the compensation
biases (`o_proj_bias` / `down_proj_bias`) are flap-deploy's; today flap-deploy's class loads it:

```python
from flap_deploy.model.modeling_flap_llama import FlapLlamaForCausalLM

model = FlapLlamaForCausalLM.from_pretrained("{path}")
```
"""),
}


def write_card(out: str | os.PathLike, config: dict[str, Any], *, form: str = "pruned",
               source: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
               tp_size: int = 1) -> Path:
    """Write the card of directory ``out``, made as ``form`` from a checkpoint whose flap_llama config is
    ``config`` (its provenance under ``flap``); ``source``: the directory it was made from (its
    license and widths plot are carried over); ``path``: the directory's final name, shown in the
    commands (default ``out``); ``tp_size``: the tensor-parallel size it was checked for. Results
    measured on ``out`` before stay."""
    out = Path(out)
    if form not in FORMS:
        raise ValueError(f"unknown card form {form!r}")
    if source is not None and (Path(source) / WIDTHS_PLOT).is_file() and not (out / WIDTHS_PLOT).is_file():
        import shutil

        shutil.copy2(Path(source) / WIDTHS_PLOT, out / WIDTHS_PLOT)
    state = {"form": form, "path": str(path or out), "tp_size": tp_size, "license": _license(source),
             "facts": card_facts(config), "measured": _read_state(out).get("measured", [])}
    _save(out, state)
    return out / CARD


def rewrite_card(source: str | os.PathLike, out: str | os.PathLike, *, path: str | os.PathLike | None = None) -> Path | None:
    """The card of ``out``, a copy of directory ``source`` made into another form of the same checkpoint (an
    int8 copy of a float ONNX export): the same facts and license, shown at ``path`` (default ``out``); results
    measured on ``source`` do not carry over. None when ``source`` has no card (made before cards were)."""
    state = _read_state(Path(source))
    if not state:
        return None
    out = Path(out)
    _save(out, {**state, "path": str(path or out), "measured": []})
    return out / CARD


def card_facts(config: dict[str, Any]) -> dict[str, Any]:
    """What a card states about a flap_llama checkpoint: its provenance (whatever it holds) and what its
    config implies (parameters, KV-cache bytes per token; the dense source's where the provenance
    names its shapes)."""
    from flap_deploy.model.config import dense_config
    from flap_deploy.model.params import count_params, kv_bytes_per_token

    provenance = config.get("flap") or {}
    heads, mlp = config["num_attention_heads_per_layer"], config["intermediate_size_per_layer"]
    dense = dense_config(config) if provenance.get("source_config") else None
    return {
        "provenance": provenance,
        "layers": config["num_hidden_layers"],
        "attention_removed": sum(h == 0 for h in heads),
        "mlp_removed": sum(m == 0 for m in mlp),
        "parameters": count_params(config).total,
        "kv_bytes_per_token": {"element_bytes": KV_ELEMENT_BYTES,
                               "dense": kv_bytes_per_token(dense, KV_ELEMENT_BYTES) if dense else None,
                               "pruned": kv_bytes_per_token(config, KV_ELEMENT_BYTES)},
    }


def add_measurement(out: str | os.PathLike, kind: str, record: dict[str, Any]) -> Path:
    """Add a result measured on ``out`` (``kind``: perplexity, tasks or speedup) to its card, replacing
    an earlier one of the same kind and settings (``record["settings"]``)."""
    out = Path(out)
    state = _read_state(out)
    if not state:
        raise FlapDeployError(f"{out}: no model card ({CARD_STATE}) to add to")
    record = {"kind": kind, **record, "measured_on": time.strftime("%Y-%m-%d"),
              "measured_with": f"flap-deploy {_version()}"}
    key = (kind, json.dumps(record.get("settings"), sort_keys=True))
    state["measured"] = [m for m in state["measured"]
                         if (m["kind"], json.dumps(m.get("settings"), sort_keys=True)) != key] + [record]
    _save(out, state)
    return out / CARD


def has_card(out: str | os.PathLike) -> bool:
    return (Path(out) / CARD_STATE).is_file()


def card_problem(ref: Any) -> str | None:
    """Why results measured on a model (a ``ModelRef``) cannot go into its card; None when they can: a local
    directory with a card, or a pruned checkpoint (made before cards were, its card is written first)."""
    if ref.revision:
        return f"'{ref.arg}' is a Hugging Face Hub snapshot, left as it was fetched"
    if has_card(ref.path) or ref.kind == "pruned":
        return None
    return f"{ref.path} is a {ref.kind} {'export' if ref.kind == 'onnx' else 'checkpoint'} without a model card"


def add_result(ref: Any, kind: str, record: dict[str, Any]) -> Path:
    """``add_measurement`` into the card of a model (a ``ModelRef``), written first if it has none."""
    problem = card_problem(ref)
    if problem:
        raise FlapDeployError(problem)
    if not has_card(ref.path):
        write_card(ref.path, ref.config, form="quantized" if ref.config.get("quantization_config") else "pruned")
    return add_measurement(ref.path, kind, record)


def _save(out: Path, state: dict[str, Any]) -> None:
    (out / CARD_STATE).write_text(json.dumps(state, indent=2) + "\n")
    (out / CARD).write_text(render(state, plot=(out / WIDTHS_PLOT).is_file()))


def _read_state(out: Path) -> dict[str, Any]:
    file = out / CARD_STATE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise FlapDeployError(f"{file}: invalid JSON ({e})") from None


def _license(source: str | os.PathLike | None) -> dict[str, str]:
    """The source's license as its card's metadata states it (license, license_name, license_link), else
    as its config.json does; empty when neither does."""
    if source is None:
        return {}
    source = Path(source)
    if (source / CARD).is_file():
        from huggingface_hub import metadata_load

        try:
            meta = metadata_load(source / CARD) or {}
        except Exception:  # a card whose YAML does not parse states no license we could carry over
            meta = {}
        found = {k: str(meta[k]) for k in ("license", "license_name", "license_link") if meta.get(k)}
        if found:
            return found
    config = source / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("license")
        if isinstance(value, str) and value:
            return {"license": value}
    return {}


def _version() -> str:
    from flap_deploy.version import __version__

    return __version__


# ------------------------------------------------------------------------------ rendering


def render(state: dict[str, Any], plot: bool = True) -> str:
    """The README.md of a card state: YAML metadata, what was done, sizes, how to run it, measured results.
    Rows whose facts the provenance does not hold (an imported checkpoint has no pruning run) are left out."""
    form, facts = FORMS[state["form"]], state["facts"]
    p = facts["provenance"]
    pruned_here = "achieved_ratio" in p  # a pruning run of flap-deploy, not an import of another's output
    family = p.get("source_architecture", "").removesuffix("ForCausalLM").lower()
    meta = {**({"base_model": p["source_model"], "base_model_relation": "pruned"} if pruned_here else {}),
            "library_name": form.library, "pipeline_tag": "text-generation", **state.get("license", {}),
            "tags": [*(["flap", "pruned", "structured-pruning"] if pruned_here else []), "flap-deploy",
                     *([family] if family else []), *form.tags]}
    if pruned_here:
        what = (f"`{p['source_model']}` with {_pct(p['achieved_ratio'])} of its decoder linear weights removed by "
                f"structured pruning ({_method(p)}), made with flap-deploy {p.get('package_version', '?')}")
    elif p.get("method") == "imported":
        what = f"A per-layer-width checkpoint imported from `{p['source_model']}` by flap-deploy"
    elif p.get("method") == "dense":
        what = f"`{p['source_model']}`, unpruned"
    else:
        what = "A checkpoint in flap-deploy's per-layer-width format (flap_llama)"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {Path(state['path']).name}", "",
             f"{what}; this directory is its {form.title}.", ""]
    rows = [("source", p.get("source_model") and (
                f"`{p['source_model']}`" + (f" at commit `{p['source_revision']}`" if p.get("source_revision") else "")
                + (f" ({p['source_architecture']})" if p.get("source_architecture") else ""))),
            ("method", pruned_here and _method(p)),
            ("pruning ratio", pruned_here and f"{_pct(p['achieved_ratio'])} of decoder linear weights removed "
                                              f"(target {_pct(p['target_ratio'])})"),
            ("reconstruction", pruned_here and _reconstruction(p)),
            ("calibration", pruned_here and _calibration(p.get("calibration") or {})),
            ("width alignment", ", ".join(f"{k} {v}" for k, v in (p.get("alignment") or {}).items())),
            ("removed modules", f"attention in {facts['attention_removed']} and MLP in {facts['mlp_removed']} "
                                f"of {facts['layers']} layers"),
            ("package", p.get("package_version") and f"flap-deploy {p['package_version']}")]
    lines += ["## What was done", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows if v), ""]
    kv = facts["kv_bytes_per_token"]
    kv_row = f"KV cache per token ({8 * kv['element_bytes']}-bit)"
    if pruned_here and kv["dense"]:
        lines += ["## Size", "", "| | dense | pruned | saving |", "|---|---:|---:|---:|",
                  f"| parameters | {p['dense_params']:,} | {p['pruned_params']:,} | "
                  f"{_pct(1 - p['pruned_params'] / p['dense_params'])} |",
                  f"| {kv_row} | {kv['dense']:,} B | {kv['pruned']:,} B | {_pct(1 - kv['pruned'] / kv['dense'])} |", ""]
    else:
        lines += ["## Size", "", "| | |", "|---|---:|", f"| parameters | {facts['parameters']:,} |",
                  f"| {kv_row} | {kv['pruned']:,} B |", ""]
    if plot:
        lines += [f"![per-layer widths]({WIDTHS_PLOT})", ""]
    tp = state.get("tp_size", 1)
    usage = form.usage.format(path=state["path"], vllm_tp=f" --tensor-parallel-size {tp}" if tp > 1 else "",
                              flap_tp=f" --tp-size {tp}" if tp > 1 else "")
    lines += ["## How to run it", "", usage.rstrip(), ""]
    lines += _measured(state["measured"])
    return "\n".join(lines).rstrip() + "\n"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _method(p: dict[str, Any]) -> str:
    return f"{p['method']}, {p.get('metric')} importance, {p.get('structure')} structure, {p.get('attn_granularity')} heads"


def reconstruction_of(p: dict[str, Any]) -> tuple[str, float | None]:
    """The reconstruction mode and ridge a provenance records (checkpoints from before the record: bias or none)."""
    rec = p.get("reconstruction") or {}
    return rec.get("mode", "bias" if p.get("bias_compensation") else "none"), rec.get("ridge")


def _reconstruction(p: dict[str, Any]) -> str:
    mode, ridge = reconstruction_of(p)
    return mode + (f" (ridge {ridge:g})" if ridge is not None else "")


def _calibration(c: dict[str, Any]) -> str:
    if not c:
        return "none"
    source = str(c.get("source", "?"))
    return (f"{Path(source).name if os.sep in source else source}, {c.get('samples', '?')} windows × "
            f"{c.get('seqlen', '?')} tokens, seed {c.get('seed', '?')}")


def _measured(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    lines = ["## Measured", ""]
    for kind, title, head, row in (
        ("perplexity", "Perplexity", "| text | tokens × window | perplexity | reference | reference perplexity "
                                     "| KL (nats/token) | top-1 agreement | measured |\n|---|---|---:|---|---:|---:|---:|---|",
         _perplexity_row),
        ("tasks", "Task accuracy", "| task | metric | this model | reference | reference score | items | measured |"
                                   "\n|---|---|---:|---|---:|---:|---|", _task_rows),
        ("speedup", "Speed-up over the dense model", "| backend | concurrency | output throughput | TPOT | ideal "
                                                     "| workload | measured |\n|---|---:|---:|---:|---:|---|---|",
         _speedup_rows),
    ):
        of_kind = [r for r in records if r["kind"] == kind]
        if of_kind:
            lines += [f"### {title}", "", head, *(line for r in of_kind for line in row(r)), ""]
    return lines


def _when(r: dict[str, Any]) -> str:
    return f"{r['measured_on']}, {r['measured_with']}"


def _num(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _perplexity_row(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    return [f"| {Path(s['text']).name} | {r['tokens']:,} × {s['seqlen']} | {r['perplexity']:.3f} | "
            f"{s.get('reference') or ''} | {_num(r.get('reference_perplexity'), '.3f')} | {_num(r.get('kl'), '.4f')} | "
            f"{'' if r.get('top1_agreement') is None else _pct(r['top1_agreement'])} | {_when(r)} |"]


def _task_rows(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    return [f"| {t['task']} | {t['metric']} | {t['score']:.4f} | {s.get('reference') or ''} | "
            f"{_num(t.get('reference_score'), '.4f')} | {t.get('items', '')} | {_when(r)} |" for t in r["results"]]


def _speedup_rows(r: dict[str, Any]) -> list[str]:
    s = r["settings"]
    # cards written before workloads had a name state the fixed lengths
    lengths = s.get("workload") or f"fixed:{s['input_len']},{s['output_len']}"
    workload = f"{s['num_prompts']} × {lengths}, vs {s['dense']}"
    return [f"| {s['backend']} | {x['max_concurrency']} | ×{_num(x['output_throughput_ratio'], '.3f')} | "
            f"×{_num(x['tpot_ratio'], '.3f')} | ×{x['ideal_ratio']:.3f} | {workload} | {_when(r)} |"
            for x in r["ratios"]]
