"""FlapLlamaForCausalLM for vLLM: a Llama decoder whose layers each have their own width.

Laid out like vLLM's ``model_executor/models/llama.py`` and built only from vLLM's own
layers (QKV/merged column- and row-parallel linears, ``Attention``, rotary, RMSNorm,
vocab-parallel embedding, logits processor), so tensor parallelism shards every layer
like it shards Llama. What differs, per layer ``i`` of the config
(``num_attention_heads_per_layer``, ``num_key_value_heads_per_layer``,
``intermediate_size_per_layer``):

* the attention has its own query / KV head counts (vLLM sizes the KV cache per
  ``Attention`` module, so a narrow layer takes a narrow cache slot);
* a removed attention or MLP is the HF model's own ``FlapRemovedAttention`` /
  ``FlapRemovedMLP`` (imported, not re-defined; replicated on every TP rank): see
  docs/ARCHITECTURE.md, "Removed modules";
* o_proj / down_proj may carry biases (FLAP's compensation), q/k/v may carry biases
  (Qwen2-style ``attention_bias``) and q/k may be RMS-normalized per head (``qk_norm``,
  Qwen3-style).

Residuals are vLLM's fused add + RMSNorm: the stream is carried as a pair
``(hidden_states, residual)`` whose sum is the HF model's hidden state (``residual`` is
None until the first norm), and every norm is ``RMSNorm(x, residual)``, which adds the
pending branch output into the residual and normalizes in one kernel. A layer without
attention or MLP has no norm: its compensation bias (if any) is added to the pending
``hidden_states`` term, nothing else runs.

Pipeline parallelism is vLLM Llama's: ``make_layers`` builds the layers of this stage
(``PPMissingLayer`` elsewhere), the first stage owns the embedding, the last the final
norm and LM head, and stages exchange ``IntermediateTensors`` with ``hidden_states`` and
``residual`` (a stage whose layers have no norm at all sends a zero residual).

Tensor names are those of the pruned-checkpoint contract (HF Llama names).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from flap_deploy.model.modeling_flap_llama import (
    FlapLlamaConfig,
    FlapRemovedAttention,
    FlapRemovedMLP,
)

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


class FlapLlamaMLP(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_down_proj: bool = False,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            input_size=hidden_size,
            output_sizes=[intermediate_size] * 2,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.gate_up_proj",
        )
        self.down_proj = RowParallelLinear(
            input_size=intermediate_size,
            output_size=hidden_size,
            bias=bias_down_proj,
            quant_config=quant_config,
            prefix=f"{prefix}.down_proj",
        )
        if hidden_act != "silu":
            raise ValueError(f"{prefix}: unsupported activation {hidden_act!r} (only silu)")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x = self.act_fn(x)
        x, _ = self.down_proj(x)
        return x


class FlapLlamaAttention(nn.Module):
    def __init__(
        self,
        config: FlapLlamaConfig,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        tp_size = get_tensor_model_parallel_world_size()
        check_layer_tp(num_heads, num_kv_heads, tp_size, prefix)
        self.total_num_heads = num_heads
        self.num_heads = self.total_num_heads // tp_size
        self.total_num_kv_heads = num_kv_heads
        # Fewer KV heads than ranks: each rank holds a replica of one KV head.
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.max_position_embeddings = max_position_embeddings

        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden_size,
            head_size=self.head_dim,
            total_num_heads=self.total_num_heads,
            total_num_kv_heads=self.total_num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            input_size=self.total_num_heads * self.head_dim,
            output_size=hidden_size,
            bias=bias_o_proj,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=self.max_position_embeddings,
            rope_parameters=config.rope_parameters,
            is_neox_style=True,
        )
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=config.sliding_window,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:  # per head, before rotary (Qwen3)
            q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output


class FlapLlamaDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        layer_idx = extract_layer_index(prefix)
        config: FlapLlamaConfig = vllm_config.model_config.hf_config
        cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        self.hidden_size = config.hidden_size
        num_heads = config.num_attention_heads_per_layer[layer_idx]
        intermediate_size = config.intermediate_size_per_layer[layer_idx]
        self.has_attention = num_heads > 0
        self.has_mlp = intermediate_size > 0

        if self.has_attention:
            self.self_attn = FlapLlamaAttention(
                config=config,
                hidden_size=self.hidden_size,
                num_heads=num_heads,
                num_kv_heads=config.num_key_value_heads_per_layer[layer_idx],
                max_position_embeddings=config.max_position_embeddings,
                quant_config=quant_config,
                bias=config.attention_bias,
                bias_o_proj=config.o_proj_bias,
                cache_config=cache_config,
                prefix=f"{prefix}.self_attn",
            )
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.self_attn = FlapRemovedAttention(config.hidden_size) if config.o_proj_bias else None
            self.input_layernorm = None

        if self.has_mlp:
            self.mlp = FlapLlamaMLP(
                hidden_size=self.hidden_size,
                intermediate_size=intermediate_size,
                hidden_act=config.hidden_act,
                quant_config=quant_config,
                bias=config.mlp_bias,
                bias_down_proj=config.down_proj_bias,
                prefix=f"{prefix}.mlp",
            )
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.mlp = FlapRemovedMLP(config.hidden_size) if config.down_proj_bias else None
            self.post_attention_layernorm = None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states + residual`` (residual None: ``hidden_states``) is the stream; returns the new pair."""
        # Self Attention (removed: its compensation bias joins the pending branch output, or nothing)
        if self.has_attention:
            hidden_states, residual = add_norm(self.input_layernorm, hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        elif self.self_attn is not None:
            hidden_states = hidden_states + self.self_attn(hidden_states)

        # Fully Connected (the same)
        if self.has_mlp:
            hidden_states, residual = add_norm(self.post_attention_layernorm, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        elif self.mlp is not None:
            hidden_states = hidden_states + self.mlp(hidden_states)
        return hidden_states, residual


def add_norm(norm: RMSNorm, hidden_states: torch.Tensor,
             residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's pre-norm step: ``residual += hidden_states; hidden_states = norm(residual)`` (fused kernel)."""
    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)


@support_torch_compile(
    dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"}, "intermediate_tensors": {0: "b"},
                      "inputs_embeds": {0: "b"}}
)
class FlapLlamaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: FlapLlamaConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.quant_config = quant_config
        self.vocab_size = config.vocab_size

        pp = get_pp_group()
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                self.vocab_size,
                config.hidden_size,
                quant_config=quant_config,
                prefix=maybe_prefix(prefix, "embed_tokens"),
            )
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: FlapLlamaDecoderLayer(vllm_config, prefix=prefix),
            prefix=maybe_prefix(prefix, "layers"),
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        pp = get_pp_group()
        if pp.is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
        else:
            assert intermediate_tensors is not None
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not pp.is_last_rank:
            if residual is None:  # no layer of this stage had a norm
                residual = torch.zeros_like(hidden_states)
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        if residual is None:
            return self.norm(hidden_states)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class FlapLlamaForCausalLM(nn.Module, SupportsPP):
    """The vLLM architecture ``FlapLlamaForCausalLM`` (registered by ``exporters.vllm.plugin``)."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: FlapLlamaConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config

        self.model = FlapLlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                quant_config=quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if config.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
            # logit_scale is not a Llama config field; vLLM's llama.py reads it the same way.
            logit_scale = getattr(config, "logit_scale", 1.0)
            self.logits_processor = LogitsProcessor(config.vocab_size, scale=logit_scale)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        pp = get_pp_group()
        logger.info("FlapLlamaForCausalLM built with config class %s.%s, TP size %d, PP stage %d/%d with layers "
                    "%d-%d, query heads per layer %s", type(config).__module__, type(config).__name__,
                    get_tensor_model_parallel_world_size(), pp.rank_in_group, pp.world_size, self.model.start_layer,
                    self.model.end_layer - 1, config.num_attention_heads_per_layer)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load contract tensor names; q/k/v and gate/up go into vLLM's fused, sharded parameters.

        Tensors of layers (embedding, norm, LM head) that live on another pipeline stage are skipped.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or is_pp_missing_parameter(name, self):
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
        raise KeyError(f"checkpoint tensor '{source}' has no parameter '{target}' in the model that config.json "
                       "describes: the per-layer widths or bias flags of config.json do not match the weights")
    return params[target]
