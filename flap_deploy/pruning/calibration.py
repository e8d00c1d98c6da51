"""Calibration sources: token windows [nsamples, seqlen] for the layer-by-layer statistics.

* a text file or directory (WikiText is detokenized when it looks like WikiText): random
  windows of the tokenized text, positions drawn from ``seed``;
* ``hf:wikitext2``: the WikiText-2 (raw) train split through the ``datasets`` library
  (needs the package and a network, or its cache);
* ``self``: samples the model generates itself from BOS with seeded sampling (no data).

The same source, sizes and seed give the same windows, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flap_deploy.errors import FlapDeployError, ParameterError

HF_SOURCES = {"hf:wikitext2": ("wikitext", "wikitext-2-raw-v1", "train")}
SELF_BATCH = 128  # sequences self-generated at a time (part of the recipe: the sampling order depends on it)


@dataclass
class Calibration:
    """Token windows and a description of where they came from (for provenance)."""

    input_ids: torch.Tensor  # int64 [nsamples, seqlen]
    source: str

    def describe(self, seed: int) -> dict[str, Any]:
        n, s = self.input_ids.shape
        return {"source": self.source, "samples": n, "seqlen": s, "seed": seed}


def random_windows(ids: list[int] | torch.Tensor, nsamples: int, seqlen: int, seed: int, name: str) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random positions of a token stream."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() < seqlen:
        raise FlapDeployError(f"calibration text {name} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


TOKENIZE_CHARS = 1 << 16  # text per tokenizer call: a fast tokenizer holds ~250 B a character while it runs


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of about ``TOKENIZE_CHARS``, each ending with a line break that starts a word (the
    next line begins with a non-space, or one space and a non-space): byte-level BPE tokenizers (GPT-2,
    Llama 3, Qwen, SmolLM) split there anyway, so the pieces' ids are the whole text's."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + TOKENIZE_CHARS)
        while end != -1 and not _starts_a_word(text, end + 1):
            end = text.find("\n", end + 1)
        end = len(text) if end == -1 else end + 1
        yield text[start:end]
        start = end


def _starts_a_word(text: str, i: int) -> bool:
    return i < len(text) and (not text[i].isspace() or (text[i] == " " and i + 1 < len(text)
                                                         and not text[i + 1].isspace()))


def _tokens(tokenizer: Any, text: str) -> list[int]:
    """The token ids of ``text``, tokenized a piece at a time (``_pieces``), so that a calibration file of any
    size costs the tokenizer's working memory of one piece."""
    ids: list[int] = []
    for piece in _pieces(text):
        ids += tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return ids


def text_windows(path: str | Path, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    from flap_deploy.io.text import load_text

    return random_windows(_tokens(tokenizer, load_text(path)), nsamples, seqlen, seed, str(path))


def hf_windows(name: str, tokenizer: Any, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    try:
        import datasets  # lazy: an optional dependency (pip install 'flap-deploy[data]')
    except ImportError:
        raise ParameterError(
            "calib", f"{name} needs the 'datasets' package (pip install datasets), or use a text file or 'self'"
        ) from None
    path, config, split = HF_SOURCES[name]
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # network, hub or cache errors all mean the same to the user
        raise ParameterError(
            "calib", f"{name}: cannot load {path}/{config} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "no network? use a text file or 'self'"
        ) from None
    return random_windows(_tokens(tokenizer, "\n\n".join(data["text"])), nsamples, seqlen, seed, name)


def start_token(model: torch.nn.Module, tokenizer: Any | None) -> int:
    for source in (tokenizer, model.config, getattr(model, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(source, key, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
    return 0


@torch.no_grad()
def self_generated(model: torch.nn.Module, tokenizer: Any | None, nsamples: int, seqlen: int, seed: int,
                   batch_size: int = SELF_BATCH, progress: bool = True) -> torch.Tensor:
    """Windows sampled from the model itself, starting at BOS (temperature 1, EOS suppressed so
    every window is full length). Batches are drawn in a fixed order from one seeded generator."""
    device = next(model.parameters()).device
    bos = start_token(model, tokenizer)
    eos = {int(e) for e in ([model.config.eos_token_id] if isinstance(model.config.eos_token_id, int)
                            else (model.config.eos_token_id or []))}
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.empty(nsamples, seqlen, dtype=torch.long)
    bar = tqdm(total=nsamples * (seqlen - 1), desc="self-calibration", unit="tok", disable=not progress)
    for start in range(0, nsamples, batch_size):
        n = min(batch_size, nsamples - start)
        ids = torch.full((n, 1), bos, dtype=torch.long, device=device)
        out[start : start + n, 0] = bos
        past = None
        step_ids = ids
        for pos in range(1, seqlen):
            res = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[:, -1].float().cpu()
            if eos and len(eos) < logits.shape[-1]:
                logits[:, sorted(eos)] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=g)
            out[start : start + n, pos] = nxt[:, 0]
            step_ids = nxt.to(device)
            bar.update(n)
    bar.close()
    return out


def calibration_windows(source: str, model: torch.nn.Module, tokenizer: Any | None, nsamples: int, seqlen: int,
                        seed: int, progress: bool = True) -> Calibration:
    """Token windows for a ``calib`` value: ``self``, ``hf:wikitext2``, or a text file/directory."""
    if source == "self":
        return Calibration(self_generated(model, tokenizer, nsamples, seqlen, seed, progress=progress), "self")
    if tokenizer is None:
        raise ParameterError("calib", f"{source} needs a tokenizer (the model directory has none); use calib='self'")
    if source.startswith("hf:"):
        if source not in HF_SOURCES:
            raise FlapDeployError(f"unknown calibration dataset '{source}'; known: {', '.join(HF_SOURCES)}")
        return Calibration(hf_windows(source, tokenizer, nsamples, seqlen, seed), source)
    path = Path(source)
    if not path.exists():
        raise FlapDeployError(f"calibration source '{source}': no such file or directory (or use 'self', 'hf:wikitext2')")
    return Calibration(text_windows(path, tokenizer, nsamples, seqlen, seed), str(path))
