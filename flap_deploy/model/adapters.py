"""The one architecture table: where each supported family keeps its projections.

Every other module asks this table (never the model class) for a layer's q/k/v/o and
gate/up/down projections, its norms, the attention geometry and the per-family flags
that carry over into a pruned FlapLlama config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from flap_deploy.errors import FlapDeployError


@dataclass(frozen=True)
class Geometry:
    """Dense shapes of a decoder, read from its config."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class LayerModules:
    """The projections and norms of one decoder layer (None where a module is absent)."""

    q_proj: nn.Linear | None
    k_proj: nn.Linear | None
    v_proj: nn.Linear | None
    o_proj: nn.Linear | None
    gate_proj: nn.Linear | None
    up_proj: nn.Linear | None
    down_proj: nn.Linear | None
    input_layernorm: nn.Module | None
    post_attention_layernorm: nn.Module | None
    q_norm: nn.Module | None
    k_norm: nn.Module | None


@dataclass(frozen=True)
class Adapter:
    """How one architecture lays out a decoder layer."""

    architecture: str
    model_type: str  # transformers' name of the family (config.json's model_type)
    qkv_bias: Callable[[Any], bool]
    mlp_bias: Callable[[Any], bool]
    qk_norm: bool
    sliding_window: Callable[[Any], int | None]

    def geometry(self, config: Any) -> Geometry:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Geometry(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
        )

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a *ForCausalLM model."""
        return model.model.layers

    def layer_modules(self, model: nn.Module, index: int) -> LayerModules:
        """Every supported family names its modules as Llama does (``self_attn.q_proj``, ``mlp.up_proj``...)."""
        layer = self.layers(model)[index]
        attn = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)

        def part(module: nn.Module | None, name: str) -> nn.Module | None:
            return getattr(module, name, None) if module is not None else None

        return LayerModules(
            q_proj=part(attn, "q_proj"),
            k_proj=part(attn, "k_proj"),
            v_proj=part(attn, "v_proj"),
            o_proj=part(attn, "o_proj"),
            gate_proj=part(mlp, "gate_proj"),
            up_proj=part(mlp, "up_proj"),
            down_proj=part(mlp, "down_proj"),
            input_layernorm=getattr(layer, "input_layernorm", None),
            post_attention_layernorm=getattr(layer, "post_attention_layernorm", None),
            q_norm=part(attn, "q_norm"),
            k_norm=part(attn, "k_norm"),
        )


def _attr(name: str, default: Any = None) -> Callable[[Any], Any]:
    return lambda config: getattr(config, name, default)


def _qwen_window(config: Any) -> int | None:
    if getattr(config, "use_sliding_window", False):
        raise FlapDeployError(
            f"{config.architectures[0] if config.architectures else 'Qwen'}: use_sliding_window=true "
            "(per-layer sliding windows) is not supported"
        )
    return None


ADAPTERS: dict[str, Adapter] = {
    a.architecture: a
    for a in (
        Adapter(  # Llama 1/2/3, SmolLM, TinyLlama (MHA or GQA, rope scaling)
            "LlamaForCausalLM",
            "llama",
            qkv_bias=_attr("attention_bias", False),
            mlp_bias=_attr("mlp_bias", False),
            qk_norm=False,
            sliding_window=lambda c: None,
        ),
        Adapter(  # Mistral (GQA, optional sliding window)
            "MistralForCausalLM",
            "mistral",
            qkv_bias=lambda c: False,
            mlp_bias=lambda c: False,
            qk_norm=False,
            sliding_window=_attr("sliding_window"),
        ),
        Adapter(  # Qwen2 / Qwen2.5 (GQA, q/k/v biases)
            "Qwen2ForCausalLM",
            "qwen2",
            qkv_bias=lambda c: True,
            mlp_bias=lambda c: False,
            qk_norm=False,
            sliding_window=_qwen_window,
        ),
        Adapter(  # Qwen3 dense (GQA, per-head q/k RMSNorm)
            "Qwen3ForCausalLM",
            "qwen3",
            qkv_bias=_attr("attention_bias", False),
            mlp_bias=lambda c: False,
            qk_norm=True,
            sliding_window=_qwen_window,
        ),
    )
}


def architecture_of(config: Any) -> str:
    """The architecture name of a config object or a config.json dict."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    archs = get("architectures") or []
    if archs:
        return archs[0]
    model_type = get("model_type") or ""
    by_type = {a.model_type: a.architecture for a in (*ADAPTERS.values(), FLAP_ADAPTER)}
    return by_type.get(model_type, model_type or "<unknown>")


def get_adapter(config: Any) -> Adapter:
    """The adapter of a config's architecture, or a FlapDeployError listing the supported ones."""
    arch = architecture_of(config)
    if arch not in ADAPTERS:
        raise FlapDeployError(
            f"unsupported architecture '{arch}'; supported: {', '.join(ADAPTERS)}"
        )
    return ADAPTERS[arch]


# The pruned architecture runs through the same layer-by-layer machinery (evaluation) but is no
# pruning source: ``get_adapter`` keeps refusing it, ``runnable_adapter`` takes it.
FLAP_ADAPTER = Adapter(
    "FlapLlamaForCausalLM",
    "flap_llama",
    qkv_bias=_attr("attention_bias", False),
    mlp_bias=_attr("mlp_bias", False),
    qk_norm=False,
    sliding_window=_attr("sliding_window"),
)


def runnable_adapter(config: Any) -> Adapter:
    """The adapter of a source family or of a pruned FlapLlama (to run a model layer by layer)."""
    return FLAP_ADAPTER if architecture_of(config) == FLAP_ADAPTER.architecture else get_adapter(config)
