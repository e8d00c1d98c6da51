"""The contract-shaped decoder that is exported to ONNX.

``OnnxDecoder`` wraps a ``FlapLlamaForCausalLM`` and computes the same function with
flat, explicit tensors, so the exported graph has exactly the I/O of the ONNX contract
(ARCHITECTURE.md): ``input_ids`` / ``attention_mask`` / ``position_ids`` and one
``past_key_values.{i}.key|value`` pair per layer *that has attention* and ``logits_index``
(the positions whose logits are wanted) in, ``logits`` and ``present.{i}.key|value`` out. Layers whose attention was removed get no cache tensors;
every attention layer has its own KV-head count. Each decoder layer takes the branches of
``FlapLlamaDecoderLayer`` and calls the same removed-module classes (docs/ARCHITECTURE.md,
"Removed modules").

Attention, rotary embedding, RMSNorm and the mask are written out here rather than taken
from transformers' modules: HF's cache objects and mask helpers do not trace into a clean
graph, and the explicit form is easy to read against ``modeling_flap_llama.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from flap_deploy.model.modeling_flap_llama import FlapLlamaForCausalLM

from .contract import cache_layers


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As LlamaRMSNorm: normalise in float32, scale in the model dtype.
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class OnnxDecoder(nn.Module):
    """input_ids, attention_mask, position_ids, flat past, logits_index -> logits, flat present."""

    def __init__(self, model: FlapLlamaForCausalLM):
        super().__init__()
        self.model = model
        self.config = model.config
        self.layers = cache_layers(model.config)
        rotary = model.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(rotary.attention_scaling)

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[:, :, None].float() * self.inv_freq[None, None, :]  # [b, s, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, s, hd]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def _allowed(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """bool [b, 1, seq, past+seq]: causal (by cache index), not padding, within the window."""
        total = attention_mask.shape[1]
        q_pos = torch.arange(seq, device=attention_mask.device)[:, None] + (total - seq)
        k_pos = torch.arange(total, device=attention_mask.device)[None, :]
        allowed = k_pos <= q_pos
        if self.config.sliding_window:
            allowed = allowed & (k_pos > q_pos - self.config.sliding_window)
        return allowed[None, None] & (attention_mask[:, None, None, :] > 0)

    def _attention(self, attn, x, cos, sin, allowed, past_k, past_v):
        b, s, _ = x.shape
        hd = self.config.head_dim
        q = attn.q_proj(x).view(b, s, attn.num_heads, hd)
        k = attn.k_proj(x).view(b, s, attn.num_key_value_heads, hd)
        v = attn.v_proj(x).view(b, s, attn.num_key_value_heads, hd).transpose(1, 2)
        if self.config.qk_norm:
            eps = self.config.rms_norm_eps
            q, k = _rms_norm(q, attn.q_norm.weight, eps), _rms_norm(k, attn.k_norm.weight, eps)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [b, heads, s, hd]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        # GQA without copying K/V: fold each KV head's query group into the sequence axis.
        groups = attn.num_key_value_groups
        qg = q.reshape(b, attn.num_key_value_heads, groups * s, hd)
        scores = torch.matmul(qg, k.transpose(2, 3)) * attn.scaling  # [b, kv, g*s, total]
        scores = scores.view(b, attn.num_key_value_heads, groups, s, -1)
        # finfo.min, not -inf: a fully masked (padding) row stays finite (uniform weights).
        scores = torch.where(allowed[:, :, None], scores, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(probs.view(b, attn.num_key_value_heads, groups * s, -1), v)  # [b, kv, g*s, hd]
        out = out.view(b, attn.num_heads, s, hd).transpose(1, 2).reshape(b, s, attn.num_heads * hd)
        return attn.o_proj(out), k, v

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...], logits_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg = self.config
        eps = cfg.rms_norm_eps
        h = self.model.model.embed_tokens(input_ids)
        cos, sin = self._rotary(position_ids, h.dtype)
        allowed = self._allowed(attention_mask, input_ids.shape[1])
        presents: list[torch.Tensor] = []
        slot = 0
        for layer in self.model.model.layers:
            # Self Attention (removed: its compensation bias, or nothing)
            if layer.has_attention:
                residual = h
                h, k, v = self._attention(layer.self_attn, _rms_norm(h, layer.input_layernorm.weight, eps),
                                          cos, sin, allowed, past[2 * slot], past[2 * slot + 1])
                h = residual + h
                presents += [k, v]
                slot += 1
            elif layer.self_attn is not None:
                h = h + layer.self_attn(h)
            # Fully Connected (removed: its compensation bias, or nothing)
            if layer.has_mlp:
                residual = h
                h = layer.mlp(_rms_norm(h, layer.post_attention_layernorm.weight, eps))
                h = residual + h
            elif layer.mlp is not None:
                h = h + layer.mlp(h)
        h = h.index_select(1, logits_index)  # only the wanted positions reach the (vocab-wide) head
        logits = self.model.lm_head(_rms_norm(h, self.model.model.norm.weight, eps))
        return (logits, *presents)
