"""Shared pieces of the ONNX tests: a livelier tiny model and a tiny word-level tokenizer."""

from __future__ import annotations

import torch
from factories import VOCAB, tiny_dense, tiny_heterogeneous


def lively_tiny_heterogeneous(seed: int = 0):
    """tiny_heterogeneous() with larger weights, so greedy decoding does not settle on one token."""
    model = tiny_heterogeneous(seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[1] ** 0.5))
    return model


def tiny_hollow(compensated: bool, seed: int = 0):
    """A tiny Llama pruned so that layer 1 has neither attention nor MLP (compensation biases or nothing)."""
    from flap_deploy.model.layout import LayerMask
    from flap_deploy.pruning.compress import LayerMeans, compress

    dense = tiny_dense("llama", seed)
    g = torch.Generator().manual_seed(seed + 1)
    means = [LayerMeans(attn=0.1 * torch.randn(8 * 16, generator=g), mlp=0.1 * torch.randn(96, generator=g))
             for _ in range(3)] if compensated else None
    masks = [LayerMask(), LayerMask(heads=torch.zeros(8, dtype=torch.bool), mlp=torch.zeros(96, dtype=torch.bool)),
             LayerMask(mlp=torch.arange(96) % 3 == 0)]
    return compress(dense, masks, means)


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny vocabulary: words w0..w{VOCAB-3}, <unk>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab["<unk>"], vocab["</s>"] = VOCAB - 2, VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """PyTorch greedy continuation of left-padded prompts, ignoring EOS."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()
