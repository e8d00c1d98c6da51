"""FlapLlamaForCausalLM for vLLM: a Llama decoder whose layers each have their own width.

Laid out like vLLM's ``model_executor/models/llama.py`` and built only from vLLM's own
layers (QKV/merged column- and row-parallel linears, ``Attention``, rotary, RMSNorm,
vocab-parallel embedding, logits processor), so tensor parallelism shards every layer
like it shards Llama. What differs, per layer ``i`` of the config
(``num_attention_heads_per_layer``, ``num_key_value_heads_per_layer``,
``intermediate_size_per_layer``):

* the attention has its own query / KV head counts (vLLM sizes the KV cache per
  ``Attention`` module, so a narrow layer takes a narrow cache slot);
* a removed attention (0 heads) or MLP (0 channels) has no weights, no norm and no
  ``Attention`` module (no KV cache); under bias compensation it keeps only its
  ``o_proj.bias`` / ``down_proj.bias``, a constant added to the residual stream;
* o_proj / down_proj may carry biases (FLAP's compensation), q/k/v may carry biases
  (Qwen2-style ``attention_bias``) and q/k may be RMS-normalized per head (``qk_norm``,
  Qwen3-style).

Tensor names are those of the pruned-checkpoint contract (HF Llama names).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from .validate import check_layer_tp

# Under vLLM's "vllm" logger so the line shows in every process's log with its process tag.
logger = logging.getLogger("vllm.plugins.flap_llama")

# checkpoint name part -> (vLLM fused parameter name part, shard id)
STACKED_PARAMS = (
    (".q_proj", ".qkv_proj", "q"),
    (".k_proj", ".qkv_proj", "k"),
    (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
)


class FlapBias(nn.Module):
    """What is left of a removed projection: its bias, replicated on every TP rank."""

    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size), requires_grad=False)


class FlapRemoved(nn.Module):
    """A removed attention or MLP under bias compensation: adds a constant to the residual.

    ``attr`` names the projection whose bias stays (``o_proj`` or ``down_proj``), so the
    parameter has the checkpoint's name. The residual stream is replicated across TP
    ranks, so each rank adds the full constant (no reduction).
    """

    def __init__(self, attr: str, hidden_size: int):
        super().__init__()
        self.attr = attr
        setattr(self, attr, FlapBias(hidden_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.attr).bias.to(hidden_states.dtype).expand_as(hidden_states)


class FlapMLP(nn.Module):
    def __init__(self, hidden_size: int, width: int, hidden_act: str, gate_up_bias: bool, down_bias: bool,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"{prefix}: unsupported activation {hidden_act!r} (only silu)")
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=hidden_size, output_sizes=[width] * 2, bias=gate_up_bias,
            quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            input_size=width, output_size=hidden_size, bias=down_bias,
            quant_config=quant_config, prefix=f"{prefix}.down_proj",
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class FlapAttention(nn.Module):
    def __init__(self, config, num_heads: int, num_kv_heads: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        check_layer_tp(num_heads, num_kv_heads, tp_size, prefix)
        hidden = config.hidden_size
        self.head_dim = config.head_dim
        self.num_heads = num_heads // tp_size
        # Fewer KV heads than ranks: each rank holds a replica of one KV head.
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden, head_size=self.head_dim, total_num_heads=num_heads,
            total_num_kv_heads=num_kv_heads, bias=bool(getattr(config, "attention_bias", False)),
            quant_config=quant_config, prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            input_size=num_heads * self.head_dim, output_size=hidden,
            bias=bool(getattr(config, "o_proj_bias", False)), quant_config=quant_config, prefix=f"{prefix}.o_proj",
        )
        self.qk_norm = bool(getattr(config, "qk_norm", False))
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=getattr(config, "max_position_embeddings", 8192),
            rope_parameters=getattr(config, "rope_parameters", None),
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config,
            per_layer_sliding_window=getattr(config, "sliding_window", None), prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # per head, before rotary (Qwen3)
            q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class FlapDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, layer_idx: int, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        hidden, eps = config.hidden_size, config.rms_norm_eps
        heads = config.num_attention_heads_per_layer[layer_idx]
        kv_heads = config.num_key_value_heads_per_layer[layer_idx]
        width = config.intermediate_size_per_layer[layer_idx]
        self.has_attention, self.has_mlp = heads > 0, width > 0

        self.input_layernorm = RMSNorm(hidden, eps=eps) if self.has_attention else None
        if self.has_attention:
            self.self_attn = FlapAttention(config, heads, kv_heads, vllm_config.cache_config, quant_config,
                                           prefix=f"{prefix}.self_attn")
        else:
            self.self_attn = FlapRemoved("o_proj", hidden) if getattr(config, "o_proj_bias", False) else None

        self.post_attention_layernorm = RMSNorm(hidden, eps=eps) if self.has_mlp else None
        if self.has_mlp:
            self.mlp = FlapMLP(hidden, width, config.hidden_act, bool(getattr(config, "mlp_bias", False)),
                               bool(getattr(config, "down_proj_bias", False)), quant_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = FlapRemoved("down_proj", hidden) if getattr(config, "down_proj_bias", False) else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        # Plain pre-norm residuals: the fused add+norm of vLLM's Llama layer assumes every
        # layer has both norms, which removed modules break.
        if self.has_attention:
            hidden_states = hidden_states + self.self_attn(positions, self.input_layernorm(hidden_states))
        elif self.self_attn is not None:
            hidden_states = hidden_states + self.self_attn(hidden_states)
        if self.has_mlp:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        elif self.mlp is not None:
            hidden_states = hidden_states + self.mlp(hidden_states)
        return hidden_states


@support_torch_compile(
    dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"}, "intermediate_tensors": {0: "b"},
                      "inputs_embeds": {0: "b"}}
)
class FlapLlamaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config)
        self.layers = nn.ModuleList(
            FlapDecoderLayer(vllm_config, i, prefix=f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)


class FlapLlamaForCausalLM(nn.Module):
    """The vLLM architecture ``FlapLlamaForCausalLM`` (registered by ``exporters.vllm.plugin``)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = FlapLlamaModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=_join(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size, scale=getattr(config, "logit_scale", 1.0))
        logger.info("FlapLlamaForCausalLM built with config class %s.%s, TP size %d, query heads per layer %s",
                    type(config).__module__, type(config).__name__, get_tensor_model_parallel_world_size(),
                    config.num_attention_heads_per_layer)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load contract tensor names; q/k/v and gate/up go into vLLM's fused, sharded parameters."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied to embed_tokens; some writers store the copy anyway
            for ckpt_part, param_part, shard in STACKED_PARAMS:
                if ckpt_part in name:
                    target = name.replace(ckpt_part, param_part)
                    param = _param(params, target, name)
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                target = name
                param = _param(params, target, name)
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


def _param(params: dict[str, nn.Parameter], target: str, source: str) -> nn.Parameter:
    if target not in params:
        raise KeyError(f"checkpoint tensor '{source}' has no matching parameter in FlapLlamaForCausalLM "
                       "(does config.json match the weights? run `flap-deploy export vllm` to check)")
    return params[target]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
