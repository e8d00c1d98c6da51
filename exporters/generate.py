"""Generate text from a directory with whichever runtime it holds.

An ONNX export (``flap_onnx.json`` present) runs on ONNX Runtime through
``OnnxCausalLM``; any other model directory (pruned FlapLlama or a dense checkpoint of a
supported family, or the bundled model name) runs on PyTorch through transformers. Both
take the same ``SamplingParams`` and return the same ``Generation`` records.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from flap_deploy.errors import FlapDeployError

from .onnx.manifest import MANIFEST_NAME
from .onnx.padding import left_pad
from .onnx.runtime import Generation
from .onnx.sampling import SamplingParams, find_stop


def runtime_of(model: str | os.PathLike) -> str:
    """"onnx" for an export directory, "pytorch" for anything else."""
    return "onnx" if (Path(model) / MANIFEST_NAME).is_file() else "pytorch"


def generate(model: str | os.PathLike, prompts: Sequence[str], params: SamplingParams,
             threads: int | None = None, chat: bool = False) -> tuple[str, list[Generation]]:
    """(runtime name, one Generation per prompt). ``chat`` applies the tokenizer's chat template."""
    if runtime_of(model) == "onnx":
        from .onnx.runtime import OnnxCausalLM

        lm = OnnxCausalLM.from_dir(model, threads=threads)
        if lm.tokenizer is None:
            raise FlapDeployError(f"{model}: the export has no tokenizer files, so it cannot take text prompts")
        return "onnx", lm.generate([_encode(lm.tokenizer, p, chat) for p in prompts], params=params)
    return "pytorch", _generate_torch(model, prompts, params, threads, chat)


def _encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise FlapDeployError("--chat: the tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer(prompt)["input_ids"])


def _generate_torch(model_name: str | os.PathLike, prompts: Sequence[str], params: SamplingParams,
                    threads: int | None, chat: bool) -> list[Generation]:
    import torch

    from flap_deploy.models import load_model, load_tokenizer

    from transformers.utils import logging as hf_logging

    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # keep stdout/stderr to the generated text
    model = load_model(model_name)
    tokenizer = load_tokenizer(model_name)
    batch = [_encode(tokenizer, p, chat) for p in prompts]
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    ids, mask = left_pad(batch, pad)
    kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad)
    if params.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        if params.seed is not None:
            torch.manual_seed(params.seed)
    if params.ignore_eos:
        kwargs.update(eos_token_id=None, min_new_tokens=params.max_new_tokens)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs)
    results = []
    for r, prompt in enumerate(batch):
        new = out[r, ids.shape[1]:].tolist()
        reason = "length"
        for i, t in enumerate(new):
            if t in eos and not params.ignore_eos:
                new, reason = new[: i + 1], "stop"
                break
        text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
        cut = find_stop(text, params.stop) if params.stop else None
        if cut is not None:
            text, reason = text[:cut], "stop"
        results.append(Generation(prompt, new, text, reason))
    return results
