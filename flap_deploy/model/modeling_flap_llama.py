"""FlapLlama: a Llama-family decoder in which every layer has its own width.

This file is self-contained on purpose (it imports only torch and transformers): it is
copied verbatim into every saved checkpoint, next to an ``auto_map``, so that a user
without flap-deploy can still load a pruned model with ``trust_remote_code=True``. The
classes follow transformers' ``modeling_llama.py``; what differs is per layer.

Per layer ``i`` the config holds ``num_attention_heads_per_layer[i]`` query heads,
``num_key_value_heads_per_layer[i]`` KV heads and ``intermediate_size_per_layer[i]`` MLP
channels; 0 means the module was removed. Removed modules (``FlapBias``,
``FlapRemovedAttention``, ``FlapRemovedMLP``, shared with the vLLM model and mirrored by
the ONNX graph) are designed once in docs/ARCHITECTURE.md, "Removed modules".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

PER_LAYER_KEYS = (
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
    "intermediate_size_per_layer",
)


# transformers' per-layer form (``per_layer_config``): the attributes that may differ per layer, the
# lists this class keeps them in, and the removed module (``skip``) that makes each 0.
PER_LAYER_ATTRIBUTES = {
    "num_attention_heads": "num_attention_heads_per_layer",
    "num_key_value_heads": "num_key_value_heads_per_layer",
    "intermediate_size": "intermediate_size_per_layer",
}
SKIPPABLE_BY = {"num_attention_heads": "self_attn", "num_key_value_heads": "self_attn", "intermediate_size": "mlp"}
SKIPPABLE = ("self_attn", "mlp")


class FlapConfigError(ValueError):
    """A config that breaks the pruned-checkpoint contract; the message names key and layer."""


def validate_flap_config(config: Mapping[str, Any] | Any) -> None:
    """Check every config rule of the pruned-checkpoint contract.

    Accepts a config object or a plain dict (config.json). Raises FlapConfigError whose
    message names the offending key and, where it applies, the layer.
    """
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    n_layers = get("num_hidden_layers")
    if not isinstance(n_layers, int) or n_layers <= 0:
        raise FlapConfigError(f"config key 'num_hidden_layers' must be a positive integer, got {n_layers!r}")
    head_dim = get("head_dim")
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise FlapConfigError(f"config key 'head_dim' must be a positive even integer, got {head_dim!r}")
    lists = {}
    for key in PER_LAYER_KEYS:
        values = get(key)
        if not isinstance(values, (list, tuple)):
            raise FlapConfigError(f"config key '{key}' is missing or not a list (got {type(values).__name__})")
        if len(values) != n_layers:
            raise FlapConfigError(
                f"config key '{key}' has {len(values)} entries but num_hidden_layers is {n_layers}"
            )
        for layer, v in enumerate(values):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise FlapConfigError(f"config key '{key}' layer {layer}: expected an integer >= 0, got {v!r}")
        lists[key] = list(values)
    q_heads, kv_heads, mlp = (lists[k] for k in PER_LAYER_KEYS)
    for layer, (q, kv) in enumerate(zip(q_heads, kv_heads)):
        if (q == 0) != (kv == 0):
            raise FlapConfigError(
                f"config key 'num_key_value_heads_per_layer' layer {layer}: {kv} KV heads with {q} query heads "
                "(KV heads are 0 exactly when query heads are 0)"
            )
        if q and q % kv:
            raise FlapConfigError(
                f"config key 'num_attention_heads_per_layer' layer {layer}: {q} query heads are not a multiple "
                f"of {kv} KV heads"
            )
    for key, values in (
        ("num_attention_heads", q_heads),
        ("num_key_value_heads", kv_heads),
        ("intermediate_size", mlp),
    ):
        expected = max(max(values), 1)
        if get(key) != expected:
            raise FlapConfigError(
                f"config key '{key}' must be the per-layer maximum {expected}, got {get(key)!r}"
            )


@strict
class FlapLlamaConfig(LlamaConfig):
    """Llama config plus per-layer widths, compensation biases and FLAP provenance."""

    model_type = "flap_llama"

    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    flap: dict | None = None

    def __post_init__(self, **kwargs):
        per_layer_config = kwargs.pop("per_layer_config", None)
        # transformers' opt-in to global reads of per-layer attributes: this class reads only its lists
        kwargs.pop("allow_global_per_layer_attribute_access", None)
        if per_layer_config is not None:
            self._read_per_layer_config(per_layer_config)
        # A config built without per-layer lists (e.g. AutoConfig.for_model) is uniform.
        n = self.num_hidden_layers
        heads = self.num_attention_heads
        kv = self.num_key_value_heads if self.num_key_value_heads is not None else heads
        if self.num_attention_heads_per_layer is None:
            self.num_attention_heads_per_layer = [heads] * n
        if self.num_key_value_heads_per_layer is None:
            self.num_key_value_heads_per_layer = [kv] * n
        if self.intermediate_size_per_layer is None:
            self.intermediate_size_per_layer = [self.intermediate_size] * n
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        # Replaces Llama's hidden_size % num_attention_heads check, which pruned widths break.
        validate_flap_config(self)

    def _read_per_layer_config(self, per_layer_config: Mapping[str, Any]) -> None:
        """The widths of transformers' per-layer form (``flap-deploy export hf``): a sparse map from layer
        index to the attributes that differ there, over global values; ``skip`` names removed modules.
        Per-layer lists come out of it and the globals become their maxima, as this class keeps them."""
        if any(getattr(self, key) is not None for key in PER_LAYER_KEYS):
            raise FlapConfigError("config has both per_layer_config and per-layer width lists")
        n = self.num_hidden_layers
        overrides: dict[int, Mapping[str, Any]] = {}
        for key, values in per_layer_config.items():
            layer = int(key)
            if not 0 <= layer < n:
                raise FlapConfigError(f"config key 'per_layer_config' layer {key}: not in [0, {n})")
            unknown = set(values) - set(PER_LAYER_ATTRIBUTES) - {"skip"}
            unknown_skips = set(values.get("skip", ())) - set(SKIPPABLE)
            if unknown or unknown_skips:
                raise FlapConfigError(f"config key 'per_layer_config' layer {layer}: "
                                      f"{sorted(unknown | unknown_skips)} cannot differ per layer in FlapLlama")
            overrides[layer] = values
        for key, attribute in PER_LAYER_ATTRIBUTES.items():
            default = getattr(self, key)
            if key == "num_key_value_heads" and default is None:
                default = self.num_attention_heads
            widths = []
            for layer in range(n):
                values = overrides.get(layer, {})
                widths.append(0 if SKIPPABLE_BY[key] in values.get("skip", ()) else values.get(key, default))
            setattr(self, attribute, widths)
            setattr(self, key, max(max(widths), 1))


class FlapLlamaMLP(nn.Module):
    def __init__(self, config: FlapLlamaConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size_per_layer[layer_idx]
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=config.down_proj_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


class FlapLlamaAttention(nn.Module):
    def __init__(self, config: FlapLlamaConfig, layer_idx: int, cache_idx: int):
        super().__init__()
        self.config = config
        # Position in the KV cache, not in the stack: attention-free layers hold no cache slot.
        self.layer_idx = cache_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads_per_layer[layer_idx]
        self.num_key_value_heads = config.num_key_value_heads_per_layer[layer_idx]
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window

        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        key_states = self.k_proj(hidden_states).view(hidden_shape)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if self.config.qk_norm:  # per head, before rotary (Qwen3)
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )

        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class FlapBias(nn.Module):
    """A removed projection reduced to its compensation bias: ``x -> bias`` (a zero weight)."""

    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.bias.to(hidden_states.dtype).expand_as(hidden_states)


class FlapRemovedAttention(nn.Module):
    """A removed attention block under bias compensation: only ``o_proj.bias`` is left."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.o_proj = FlapBias(hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.o_proj(hidden_states)


class FlapRemovedMLP(nn.Module):
    """A removed MLP block under bias compensation: only ``down_proj.bias`` is left."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.down_proj = FlapBias(hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(hidden_states)


class FlapLlamaDecoderLayer(nn.Module):
    def __init__(self, config: FlapLlamaConfig, layer_idx: int, cache_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.has_attention = config.num_attention_heads_per_layer[layer_idx] > 0
        self.has_mlp = config.intermediate_size_per_layer[layer_idx] > 0

        if self.has_attention:
            self.self_attn = FlapLlamaAttention(config, layer_idx, cache_idx)
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.self_attn = FlapRemovedAttention(config.hidden_size) if config.o_proj_bias else None
            self.input_layernorm = None

        if self.has_mlp:
            self.mlp = FlapLlamaMLP(config, layer_idx)
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.mlp = FlapRemovedMLP(config.hidden_size) if config.down_proj_bias else None
            self.post_attention_layernorm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # Self Attention (removed: its compensation bias, or nothing)
        if self.has_attention:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(
                hidden_states=hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                **kwargs,
            )
            hidden_states = residual + hidden_states
        elif self.self_attn is not None:
            hidden_states = hidden_states + self.self_attn(hidden_states)

        # Fully Connected (removed: its compensation bias, or nothing)
        if self.has_mlp:
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
        elif self.mlp is not None:
            hidden_states = hidden_states + self.mlp(hidden_states)
        return hidden_states


class FlapLlamaPreTrainedModel(PreTrainedModel):
    config_class = FlapLlamaConfig
    config: FlapLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["FlapLlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FlapBias):
            with torch.no_grad():
                module.bias.zero_()


class FlapLlamaModel(FlapLlamaPreTrainedModel):
    def __init__(self, config: FlapLlamaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        cache_idx = 0
        layers = []
        for i in range(config.num_hidden_layers):
            layers.append(FlapLlamaDecoderLayer(config, i, cache_idx))
            cache_idx += config.num_attention_heads_per_layer[i] > 0
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            position_ids = position_ids.unsqueeze(0)

        make_mask = create_sliding_window_causal_mask if self.config.sliding_window else create_causal_mask
        causal_mask = make_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                past_key_values=past_key_values,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)


class FlapLlamaForCausalLM(FlapLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FlapLlamaConfig):
        super().__init__(config)
        self.model = FlapLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


__all__ = [
    "FlapBias",
    "FlapConfigError",
    "FlapLlamaConfig",
    "FlapLlamaForCausalLM",
    "FlapLlamaModel",
    "FlapRemovedAttention",
    "FlapRemovedMLP",
    "validate_flap_config",
]
