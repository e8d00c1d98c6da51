"""vLLM's own KV-cache planning on an exported FLAP model whose layers hold 1, 2 and 3 KV heads (and one
layer none): one cache group, no padding, and a block as many bytes as the layers' pages together.

CPU only, no engine: the per-layer specs are made as vLLM's ``Attention.get_kv_cache_spec`` makes them
(``FullAttentionSpec`` of the layer's KV heads and head size in the cache dtype), then planned by
``vllm.v1.core.kv_cache_utils`` (``get_kv_cache_groups``, ``get_kv_cache_config_from_groups``) under
the layout vLLM resolves for its CPU attention backend. vLLM runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from vllm_helpers import needs_vllm, vllm_env

from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy.model.layout import LayerMask
from flap_deploy.model.params import kv_bytes_per_token
from flap_deploy.pruning.compress import compress

pytestmark = [needs_vllm, pytest.mark.vllm]

PLAN = """
import json, sys, torch
from vllm.config import VllmConfig
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups, get_kv_cache_groups
from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs

cfg, memory = json.load(open(sys.argv[1])), int(sys.argv[2])
vllm_config = VllmConfig()
block = vllm_config.cache_config.block_size
specs = {f"model.layers.{i}.self_attn.attn": FullAttentionSpec(block_size=block, num_kv_heads=kv,
                                                               head_size=cfg["head_dim"], dtype=getattr(torch, cfg["dtype"]))
         for i, kv in enumerate(cfg["num_key_value_heads_per_layer"]) if kv}
layouts = [layout.name for layout in get_supported_kv_cache_layouts([CPUAttentionBackend])]
resolve_kv_cache_layout(vllm_config, [layouts], list(specs.values()))
groups = get_kv_cache_groups(vllm_config, dict(specs))
plan = get_kv_cache_config_from_groups(vllm_config, groups, memory)
print(json.dumps({
    "block_size": block,
    "groups": [{"layers": g.layer_names, "uniform_type": isinstance(g.kv_cache_spec, UniformTypeKVCacheSpecs)}
               for g in groups],
    "pages": {name: spec.page_size_bytes for name, spec in specs.items()},
    "padded": [name for name, spec in specs.items() if spec.page_size_padded is not None],
    "num_blocks": plan.num_blocks,
    "tensors": [{"layers": t.layers, "size": t.size, "offset": t.offset, "layer_stride": t.layer_stride,
                 "block_stride": t.block_stride} for t in plan.kv_cache_tensors],
}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A Llama with 12 query / 3 KV heads per layer pruned to 1, 0 (attention removed), 2 and 3 KV heads,
    exported for vLLM in bfloat16."""
    from exporters.vllm.export import export_vllm

    root = tmp_path_factory.mktemp("kv")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=12, num_key_value_heads=3, head_dim=32,
                                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    dense = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    groups = [1, 0, 2, 3]  # KV groups (of 4 query heads) kept per layer
    masks = [LayerMask(heads=torch.arange(12) < 4 * g) for g in groups]
    save_checkpoint(compress(dense, masks, None), root / "pruned")
    export_vllm(root / "pruned", root / "vllm", dtype="bfloat16")
    return json.loads((root / "vllm" / "config.json").read_text())


def test_vllm_plans_layers_with_different_kv_heads_as_one_unpadded_group(exported, tmp_path):
    assert exported["num_key_value_heads_per_layer"] == [1, 0, 2, 3] and exported["dtype"] == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps(exported))
    memory = 64 << 20
    res = subprocess.run([sys.executable, "-c", PLAN, str(tmp_path / "config.json"), str(memory)], env=vllm_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads(res.stdout.strip().splitlines()[-1])
    attention = [f"model.layers.{i}.self_attn.attn" for i in (0, 2, 3)]
    assert plan["groups"] == [{"layers": attention, "uniform_type": True}]
    assert plan["padded"] == []
    per_block = kv_bytes_per_token(exported, 2) * plan["block_size"]
    assert sum(plan["pages"].values()) == per_block
    assert plan["num_blocks"] == memory // per_block
    offset = 0
    for tensor in plan["tensors"]:  # each layer's blocks are its own page apart, the layers back to back
        (layer,) = tensor["layers"]
        assert tensor["block_stride"] == plan["pages"][layer] and tensor["offset"] == offset
        offset += tensor["layer_stride"]
    assert offset == plan["num_blocks"] * per_block
