"""Dense and FLAP-shaped pruned checkpoints of real architectures, for speed measurements.

We cannot download a 7B model here, but speed depends on shapes, not on weight values. A
synthetic pair is the config of a real architecture (dense) and a pruned config whose
per-layer widths come from FLAP's own allocation (``allocation.allocate``, AL-AM) run on
synthetic standardized scores shaped like the paper's: first and last layers matter most.
The checkpoints hold configs and a tokenizer, no weight files: vLLM fills the weights
with random values (``--load-format dummy``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.io.atomic import atomic_directory
from flap_deploy.io.checkpoint import TOKENIZER_FILES
from flap_deploy.model.adapters import get_adapter
from flap_deploy.model.config import flap_config
from flap_deploy.model.layout import LayerWidths
from flap_deploy.model.params import layer_linear_params
from flap_deploy.pruning.allocation import Alignment, allocate


@dataclass(frozen=True)
class Shape:
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096


SHAPES: dict[str, Shape] = {
    "llama2-7b": Shape("LlamaForCausalLM", 4096, 11008, 32, 32, 32, 128),
    "llama2-13b": Shape("LlamaForCausalLM", 5120, 13824, 40, 40, 40, 128),
    "llama3-8b": Shape("LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128, rope_theta=500000.0, max_position_embeddings=8192),
    "mistral-7b": Shape("MistralForCausalLM", 4096, 14336, 32, 32, 8, 128, rope_theta=1000000.0),
    "qwen2.5-7b": Shape("Qwen2ForCausalLM", 3584, 18944, 28, 28, 4, 128, rope_theta=1000000.0),
    # Llama-3.2-1B layout (~1.07B parameters with the shipped 49k-token tokenizer): weight reads dominate a
    # decode step even on CPU, unlike smollm2-135m.
    "llama3.2-1b": Shape("LlamaForCausalLM", 2048, 8192, 16, 32, 8, 64, rope_theta=500000.0,
                         max_position_embeddings=8192),
    "smollm2-135m": Shape("LlamaForCausalLM", 576, 1536, 30, 9, 3, 64, rope_theta=100000.0, max_position_embeddings=8192),
}


def source_config(shape: Shape, vocab_size: int, bos: int | None, eos: int | None) -> Any:
    """A transformers config of the dense architecture (vocabulary of the tokenizer we ship)."""
    import transformers

    cls = {"LlamaForCausalLM": transformers.LlamaConfig, "MistralForCausalLM": transformers.MistralConfig,
           "Qwen2ForCausalLM": transformers.Qwen2Config}[shape.architecture]
    return cls(
        vocab_size=vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        bos_token_id=bos, eos_token_id=eos, architectures=[shape.architecture], dtype="bfloat16",
    )


def synthetic_scores(num_layers: int, units: int, seed: int, layer: int) -> torch.Tensor:
    """Standardized unit scores whose layer mean rises towards the first and last layers."""
    g = torch.Generator().manual_seed(seed * 100_003 + layer)
    edge = abs(2 * layer / max(num_layers - 1, 1) - 1)  # 1 at the ends, 0 in the middle
    return torch.randn(units, generator=g, dtype=torch.float64) + 1.5 * edge**2


def flap_like_widths(config: Any, ratio: float, seed: int = 0, tp_size: int = 1,
                     mlp_multiple: int = 64) -> list[LayerWidths]:
    """Per-layer widths from FLAP's AL-AM allocation on synthetic scores, at ``ratio``."""
    geom = get_adapter(config).geometry(config)
    attn = [synthetic_scores(geom.num_layers, geom.num_heads, seed, i) for i in range(geom.num_layers)]
    mlp = [synthetic_scores(geom.num_layers, geom.intermediate_size, seed + 1, i) for i in range(geom.num_layers)]
    alloc = allocate(attn, mlp, geom, ratio=ratio, structure="AL-AM",
                     align=Alignment(mlp_multiple=mlp_multiple, tp_size=tp_size))
    widths = []
    for mask in alloc.masks:
        heads = int(mask.heads.sum())
        kv = int(mask.heads.view(geom.num_kv_heads, geom.group_size).any(dim=1).sum())
        widths.append(LayerWidths(heads=heads, kv_heads=kv, mlp=int(mask.mlp.sum())))
    return widths


def build_synthetic_pair(name: str, out: str | os.PathLike, ratio: float = 0.2, *, tokenizer_from: str | os.PathLike,
                         seed: int = 0, tp_size: int = 1, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``out/dense`` and ``out/pruned`` config-only checkpoints; return their paths."""
    if name not in SHAPES:
        raise FlapDeployError(f"unknown synthetic shape '{name}'; choose from {', '.join(SHAPES)}")
    if not 0 < ratio < 1:
        raise ParameterError("ratio", f"must be in (0, 1), got {ratio}")
    tok_dir = Path(tokenizer_from)
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    source = source_config(SHAPES[name], tok_cfg["vocab_size"], tok_cfg.get("bos_token_id"), tok_cfg.get("eos_token_id"))
    widths = flap_like_widths(source, ratio, seed=seed, tp_size=tp_size)
    g = get_adapter(source).geometry(source)
    kept = sum(layer_linear_params(g.hidden_size, g.head_dim, w.heads, w.kv_heads, w.mlp) for w in widths)
    dense = g.num_layers * layer_linear_params(g.hidden_size, g.head_dim, g.num_heads, g.num_kv_heads,
                                               g.intermediate_size)
    removed = 1 - kept / dense
    pruned = flap_config(source, widths, o_proj_bias=True, down_proj_bias=True, provenance={
        "method": "flap-synthetic", "structure": "AL-AM", "target_ratio": ratio, "achieved_ratio": removed,
        "source_model": f"synthetic:{name}", "synthetic": True, "seed": seed,
        "alignment": {"mlp_multiple": 64, "tp_size": tp_size}})
    pruned.dtype = "bfloat16"
    with atomic_directory(out, overwrite) as tmp:
        for sub, cfg in (("dense", source), ("pruned", pruned)):
            d = tmp / sub
            d.mkdir()
            cfg.save_pretrained(d)
            for f in TOKENIZER_FILES:
                if (tok_dir / f).is_file() and f != "generation_config.json":
                    shutil.copy2(tok_dir / f, d / f)
    out = Path(out)
    return out / "dense", out / "pruned"


def cached_synthetic_pair(name: str, ratio: float, *, tp_size: int = 1, seed: int = 0) -> tuple[Path, Path]:
    """The synthetic pair in the cache directory (rebuilt each time: configs only, instant)."""
    from flap_deploy.io.bundled import cache_dir, materialize

    out = cache_dir() / "synthetic" / f"{name}-r{ratio:g}-tp{tp_size}-s{seed}"
    return build_synthetic_pair(name, out, ratio, tokenizer_from=materialize("smollm2-135m"), seed=seed,
                                tp_size=tp_size, overwrite=True)


def write_random_checkpoint(out: str | os.PathLike, shape: Shape, *, tokenizer_from: str | os.PathLike,
                            dtype: torch.dtype = torch.float32, seed: int = 0, max_shard_bytes: int | None = None,
                            overwrite: bool = False) -> Path:
    """A dense checkpoint of ``shape`` with random weights (std 0.02, unit norms), written tensor by
    tensor so that no more than one tensor is ever in memory; sharded past ``max_shard_bytes``.

    Speed and memory depend on shapes, not values: this is how sizes we cannot download are measured.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from flap_deploy.io.shards import MAX_SHARD_BYTES, ShardWriter

    tok_dir = Path(tokenizer_from)
    tok_cfg = json.loads((tok_dir / "config.json").read_text())
    config = source_config(shape, tok_cfg["vocab_size"], tok_cfg.get("bos_token_id"), tok_cfg.get("eos_token_id"))
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layout = [(name, tuple(p.shape), dtype) for name, p in skeleton.named_parameters()]
    g = torch.Generator().manual_seed(seed)
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardWriter(tmp, layout, max_shard_bytes or MAX_SHARD_BYTES)
        for name, dims, _ in layout:
            if name.endswith("norm.weight"):
                writer.write(name, torch.ones(dims, dtype=dtype))
            else:
                writer.write(name, (torch.randn(dims, generator=g) * 0.02).to(dtype))
        writer.close()
        config.save_pretrained(tmp)
        for f in TOKENIZER_FILES:
            if (tok_dir / f).is_file():
                shutil.copy2(tok_dir / f, tmp / f)
    return Path(out)
