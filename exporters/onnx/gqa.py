"""The gqa graph form, written node by node from a ``FlapLlamaForCausalLM`` (no tracing).

What ONNX Runtime's own decoders use (onnxruntime-genai's model builder): per attention layer
one ``com.microsoft.GroupQueryAttention`` node with that layer's ``num_heads`` / ``kv_num_heads``
as attributes, rotary embedding inside it (cos / sin caches of ``max_length`` positions), over
``past_key_values.{i}.*`` buffers ``[batch, kv_heads_i, capacity, head_dim]`` that the caller binds
as ``present.{i}.*`` too, so the op appends the new tokens in place; ``SimplifiedLayerNormalization``
/ ``SkipSimplifiedLayerNormalization`` for the norms and the residual adds. A row's tokens sit
at positions 0.. of its buffer row, so its rotary position is its cache index; chunks are
right-padded (``query_seqlens`` counts each row's new tokens, 0 for a row that sits the call out).

Each layer takes the branches of ``FlapLlamaDecoderLayer`` (docs/ARCHITECTURE.md, "Removed
modules"): a removed attention or MLP adds its compensation bias or nothing. Biases that are
added to the residual stream (o_proj, down_proj, the removed modules') are folded into the
``bias`` input of the next ``SkipSimplifiedLayerNormalization``. Linear weights are ``MatMul``
initializers ``[in, out]``, so ``quantize.py`` turns them into ``MatMulNBits`` like the other form's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from flap_deploy.errors import ParameterError
from flap_deploy.model.modeling_flap_llama import FlapLlamaForCausalLM

from .contract import (
    GQA,
    LOGITS_INDEX,
    QUERY_SEQLENS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    cache_layers,
    gqa_unsupported,
    input_names,
    output_names,
)

MS = "com.microsoft"
ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
DATA_ALIGN = 4096  # external data offsets on page boundaries, so that ORT can map them


def check_gqa(config: Any) -> None:
    """Raise ParameterError('attention', ...) when the gqa form cannot express this model (any HF config)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    why = gqa_unsupported(head_dim)
    if why is None and config.hidden_act != "silu":
        why = f"writes SiLU MLPs, the model's hidden_act is {config.hidden_act!r}"
    if why:
        raise ParameterError("attention", f"gqa {why}; choose past-present")


class _Writer:
    """Nodes and initializers of one graph; initializers go to an external data file when given."""

    def __init__(self, dtype: np.dtype, data: BinaryIO | None, data_name: str):
        self.dtype = np.dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._data, self._data_name = data, data_name
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"/{hint}_{self._count}"

    def const(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if self._data is None or array.nbytes < 1024:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        offset = -self._data.tell() % DATA_ALIGN + self._data.tell()
        self._data.seek(offset)
        self._data.write(array.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self._data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        self.initializers.append(tensor)
        return name

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        return self.const(name, tensor.detach().to(torch.float32).numpy().astype(self.dtype))

    def node(self, op: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs: Any):
        names = [self.name(op) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op, inputs, names, name=self.name(op + "_node"), domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def linear(self, x: str, weight: torch.Tensor, name: str) -> str:
        """x @ weight.T: the weight stored [in, out] for MatMul (and MatMulNBits after quantization)."""
        return self.node("MatMul", [x, self.weight(name, weight.T)])


class _Residual:
    """The residual stream with its pending terms: the last block's output and constant biases.

    They are added where the next norm reads the stream, by one SkipSimplifiedLayerNormalization
    (input + skip + bias, then RMSNorm), as PyTorch's ``residual + block(...)`` / ``h + bias``.
    """

    def __init__(self, w: _Writer, embeddings: str, eps: float):
        self.w, self.eps = w, eps
        self.stream, self.block, self.bias = embeddings, None, None

    def add_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            b = bias.detach().to(torch.float32).numpy()
            self.bias = b if self.bias is None else self.bias + b

    def norm(self, weight: torch.Tensor, name: str) -> str:
        w = self.w
        gamma = w.weight(name, weight)
        bias = None if self.bias is None else w.const(w.name("residual_bias"), self.bias.astype(w.dtype))
        if self.block is None:
            if bias is not None:
                self.stream = w.node("Add", [self.stream, bias])
            out = w.node("SimplifiedLayerNormalization", [self.stream, gamma], axis=-1, epsilon=self.eps)
        else:
            out, stream = w.name("norm"), w.name("residual")
            w.node("SkipSimplifiedLayerNormalization", [self.block, self.stream, gamma] + ([bias] if bias else []),
                   [out, "", "", stream], domain=MS, epsilon=self.eps)
            self.stream = stream
        self.block, self.bias = None, None
        return out


def _rotary_caches(model: FlapLlamaForCausalLM, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [max_length, head_dim / 2] as the HF rotary embedding computes them (attention_scaling included)."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(torch.float32)
    freqs = torch.arange(max_length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    scale = float(rotary.attention_scaling)
    return (freqs.cos() * scale).numpy(), (freqs.sin() * scale).numpy()


def _attention(w: _Writer, i: int, attn: Any, x: str, cfg: Any, rotary: tuple[str, str]) -> str:
    """One layer's attention, before o_proj: projections, q/k norms (Qwen3), GroupQueryAttention."""
    hd = cfg.head_dim
    prefix = f"model.layers.{i}.self_attn"
    heads, kv_heads = attn.num_heads, attn.num_key_value_heads

    def project(proj: torch.nn.Linear, name: str) -> str:
        out = w.linear(x, proj.weight, f"{prefix}.{name}.weight_t")
        if proj.bias is not None:
            out = w.node("Add", [out, w.weight(f"{prefix}.{name}.bias", proj.bias)])
        return out

    if cfg.qk_norm:  # per head, before rotary: RMSNorm over head_dim on [b, s, heads, hd]
        q, k, v = project(attn.q_proj, "q_proj"), project(attn.k_proj, "k_proj"), project(attn.v_proj, "v_proj")
        per_head = w.const(w.name("per_head_shape"), np.array([0, 0, -1, hd], np.int64))
        flat = w.const(w.name("flat_shape"), np.array([0, 0, -1], np.int64))

        def head_norm(t: str, norm: Any, name: str) -> str:
            t = w.node("Reshape", [t, per_head])
            t = w.node("SimplifiedLayerNormalization", [t, w.weight(f"{prefix}.{name}.weight", norm.weight)],
                       axis=-1, epsilon=cfg.rms_norm_eps)
            return w.node("Reshape", [t, flat])

        qkv = [head_norm(q, attn.q_norm, "q_norm"), head_norm(k, attn.k_norm, "k_norm"), v]
    else:  # one MatMul for q, k and v (GroupQueryAttention takes them packed)
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        packed = w.linear(x, torch.cat([p.weight for p in projs]), f"{prefix}.qkv_proj.weight_t")
        if attn.q_proj.bias is not None:
            packed = w.node("Add", [packed, w.weight(f"{prefix}.qkv_proj.bias", torch.cat([p.bias for p in projs]))])
        qkv = [packed, "", ""]
    past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
    out, _, _ = w.node(
        "GroupQueryAttention",
        qkv + [past_k, past_v, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, rotary[0], rotary[1],
               "", "", "", "", "", "", "", QUERY_SEQLENS],
        [w.name("attention"), f"present.{i}.key", f"present.{i}.value"], domain=MS,
        num_heads=heads, kv_num_heads=kv_heads, scale=float(attn.scaling), do_rotary=1, rotary_interleaved=0,
        local_window_size=int(cfg.sliding_window or -1),
    )
    return out


def build_gqa_model(model: FlapLlamaForCausalLM, *, max_length: int, opset: int,
                    data: BinaryIO | None = None, data_name: str = "") -> onnx.ModelProto:
    """The gqa graph of ``model`` (its parameters' dtype), rotary caches for ``max_length`` positions."""
    cfg = model.config
    check_gqa(cfg)
    dtype = np.dtype(torch.empty(0, dtype=next(model.parameters()).dtype).numpy().dtype)
    w = _Writer(dtype, data, data_name)
    elem = ONNX_TYPES[dtype]
    layers = cache_layers(cfg)
    cos, sin = _rotary_caches(model, max_length)
    rotary = (w.const("rotary.cos_cache", cos.astype(dtype)), w.const("rotary.sin_cache", sin.astype(dtype)))

    inner = model.model
    h = w.node("Gather", [w.weight("model.embed_tokens.weight", inner.embed_tokens.weight), "input_ids"])
    residual = _Residual(w, h, cfg.rms_norm_eps)
    for i, layer in enumerate(inner.layers):
        # Self Attention (removed: its compensation bias, or nothing)
        if layer.has_attention:
            x = residual.norm(layer.input_layernorm.weight, f"model.layers.{i}.input_layernorm.weight")
            attn = layer.self_attn
            out = _attention(w, i, attn, x, cfg, rotary)
            residual.block = w.linear(out, attn.o_proj.weight, f"model.layers.{i}.self_attn.o_proj.weight_t")
            residual.add_bias(attn.o_proj.bias)
        elif layer.self_attn is not None:
            residual.add_bias(layer.self_attn.o_proj.bias)
        # Fully Connected (removed: its compensation bias, or nothing)
        if layer.has_mlp:
            x = residual.norm(layer.post_attention_layernorm.weight, f"model.layers.{i}.post_attention_layernorm.weight")
            mlp, prefix = layer.mlp, f"model.layers.{i}.mlp"
            gate, up = (w.linear(x, p.weight, f"{prefix}.{n}.weight_t") for p, n in
                        ((mlp.gate_proj, "gate_proj"), (mlp.up_proj, "up_proj")))
            if mlp.gate_proj.bias is not None:
                gate = w.node("Add", [gate, w.weight(f"{prefix}.gate_proj.bias", mlp.gate_proj.bias)])
                up = w.node("Add", [up, w.weight(f"{prefix}.up_proj.bias", mlp.up_proj.bias)])
            act = w.node("Mul", [w.node("Mul", [gate, w.node("Sigmoid", [gate])]), up])  # SiLU(gate) * up
            residual.block = w.linear(act, mlp.down_proj.weight, f"{prefix}.down_proj.weight_t")
            residual.add_bias(mlp.down_proj.bias)
        elif layer.mlp is not None:
            residual.add_bias(layer.mlp.down_proj.bias)
    final = residual.norm(inner.norm.weight, "model.norm.weight")
    index = w.node("Unsqueeze", [LOGITS_INDEX, w.const("/last_axis", np.array([-1], np.int64))])
    kept = w.node("GatherND", [final, index], batch_dims=1)  # only the wanted positions reach the head
    w.node("MatMul", [kept, w.weight("lm_head.weight_t", model.lm_head.weight.T)], ["logits"])

    def tensor(name: str, elem_type: int, shape: list[Any]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem_type, shape)

    cache_shape = lambda c: ["batch", c.kv_heads, "capacity", c.head_dim]  # noqa: E731
    by_name = {"input_ids": tensor("input_ids", TensorProto.INT64, ["batch", "seq"]),
               SEQLENS_K: tensor(SEQLENS_K, TensorProto.INT32, ["batch"]),
               QUERY_SEQLENS: tensor(QUERY_SEQLENS, TensorProto.INT32, ["batch"]),
               TOTAL_SEQUENCE_LENGTH: tensor(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
               LOGITS_INDEX: tensor(LOGITS_INDEX, TensorProto.INT64, ["batch", "kept"]),
               "logits": tensor("logits", elem, ["batch", "kept", cfg.vocab_size])}
    for c in layers:
        for name in c.past_names + c.present_names:
            by_name[name] = tensor(name, elem, cache_shape(c))
    graph = helper.make_graph(w.nodes, "flap_llama_gqa", [by_name[n] for n in input_names(layers, GQA)],
                              [by_name[n] for n in output_names(layers)], w.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             producer_name="flap-deploy")


def write_gqa_graph(model: FlapLlamaForCausalLM, file: Path, opset: int, external_data: bool, max_length: int) -> None:
    """Write the gqa graph of ``model`` to ``file`` (weights in ``file.data`` with ``external_data``)."""
    file = Path(file)
    if not external_data:
        onnx.save_model(build_gqa_model(model, max_length=max_length, opset=opset), str(file))
        return
    data_name = file.name + ".data"
    with open(file.parent / data_name, "wb") as data:
        proto = build_gqa_model(model, max_length=max_length, opset=opset, data=data, data_name=data_name)
    onnx.save_model(proto, str(file))
