"""Tiny random models shared by the tests of every package."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers

from flap_deploy.model.adapters import get_adapter
from flap_deploy.model.layout import LayerMask
from flap_deploy.model.modeling_flap_llama import FlapLlamaForCausalLM
from flap_deploy.pruning.compress import LayerMeans, compress
from flap_deploy.pruning.config import PruneConfig
from flap_deploy.streaming.layers import hooks

VOCAB = 128

FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        architectures=["LlamaForCausalLM"],
    ),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=None,
        architectures=["MistralForCausalLM"],
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        architectures=["Qwen2ForCausalLM"],
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, tie_word_embeddings=True,
        architectures=["Qwen3ForCausalLM"],
    ),
}


def _randomize_small_params(model: torch.nn.Module, seed: int) -> None:
    """Give biases and norm weights non-trivial values, so that slicing mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))


def tiny_dense(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A random dense model of a supported family, float32, eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family](), dtype=torch.float32)
    _randomize_small_params(model, seed)
    return model.eval()


def tiny_heterogeneous(seed: int = 0, head_dim: int = 16) -> FlapLlamaForCausalLM:
    """A pruned model exercising every per-layer case.

    Layer 0: 8 query / 2 KV heads (GQA 4), full MLP. Layer 1: attention removed.
    Layer 2: 2 query / 1 KV heads (GQA 2), MLP removed. Layer 3: 2 query / 2 KV (GQA 1),
    MLP halved. q/k/v biases from the source, o_proj/down_proj compensation biases.
    ``head_dim=32`` gives a model vLLM's CPU attention accepts (it has no 16-wide kernel).
    """
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256, attention_bias=True,
        tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )
    dense = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize_small_params(dense, seed)
    b = lambda *v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
    masks = [
        LayerMask(),
        LayerMask(heads=torch.zeros(8, dtype=torch.bool)),
        LayerMask(heads=b(0, 0, 0, 0, 1, 0, 1, 0), mlp=torch.zeros(96, dtype=torch.bool)),
        LayerMask(heads=b(1, 0, 0, 0, 0, 0, 0, 1), mlp=torch.arange(96) % 2 == 0),
    ]
    g = torch.Generator().manual_seed(seed + 1)
    means = [LayerMeans(attn=0.1 * torch.randn(8 * head_dim, generator=g), mlp=0.1 * torch.randn(96, generator=g))
             for _ in range(4)]
    return compress(dense, masks, means)


def small(**kw) -> PruneConfig:
    """A PruneConfig for tiny models: few short calibration windows, no progress bars."""
    return PruneConfig(**{**dict(nsamples=12, seqlen=24, batch_size=5, progress=False), **kw})


def masked_dense_logits(dense, result, x):
    """The dense model's logits with a pruning result's units zeroed and its compensation (mean biases or
    refits) applied: what the pruned checkpoint must compute. Its own column expansion
    (``repeat_interleave``), independent of the slicing it checks."""
    adapter = get_adapter(dense.config)
    geom = adapter.geometry(dense.config)
    outputs = []
    for i, mask in enumerate(result.masks):
        m = adapter.layer_modules(dense, i)
        mean = result.means[i] if result.means else None
        refit = result.refits[i] if result.refits else None
        for mod, keep, mu, fit in ((m.o_proj, mask.heads.repeat_interleave(geom.head_dim), mean.attn if mean else None,
                                    refit.attn if refit else None),
                                   (m.down_proj, mask.mlp, mean.mlp if mean else None, refit.mlp if refit else None)):
            def output(mod, args, out, keep=keep, mu=mu, fit=fit):
                weight, bias = mod.weight, mod.bias
                if fit is not None:  # the recorded refit, scattered onto the kept columns
                    weight = torch.zeros_like(mod.weight)
                    weight[:, fit.kept] = fit.weight.to(weight.dtype)
                    bias = fit.bias.to(weight.dtype)
                y = F.linear(args[0] * keep.to(args[0].dtype), weight, bias)
                if mu is not None:
                    y = y + (mod.weight.double()[:, ~keep] @ mu.double()[~keep]).to(y.dtype)
                return y
            outputs.append((mod, output))
    with torch.no_grad(), hooks(after=outputs):
        return dense(input_ids=x, use_cache=False).logits


def logits_without_package(checkpoint, ids: list[list[int]], workdir) -> list[float]:
    """Last-position logits of a checkpoint loaded with trust_remote_code=True in a fresh
    interpreter where importing flap_deploy fails: proves the checkpoint is self-contained."""
    import json
    import subprocess
    import sys

    script = (
        "import sys, json, torch, transformers\n"
        "sys.modules['flap_deploy'] = None  # importing it would fail: prove it is not needed\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)\n"
        f"print(json.dumps(m(torch.tensor({ids})).logits[0, -1].tolist()))\n"
    )
    env = {"HF_MODULES_CACHE": str(workdir / "modules"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=workdir)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
