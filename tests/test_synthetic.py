"""Synthetic dense / FLAP-shaped pairs for speed measurements on real architectures' shapes."""

import json

import pytest

from exporters.vllm.validate import validate_for_vllm
from flap_deploy.errors import FlapDeployError
from flap_deploy.model.modeling_flap_llama import validate_flap_config
from flap_deploy.model.params import decode_step_params
from flap_deploy.pruning.synthetic import build_synthetic_pair
from serving.measure.compare import ideal_ratio, resolve_pair


@pytest.mark.parametrize("name,tp", [("llama2-7b", 1), ("llama3-8b", 2), ("qwen2.5-7b", 2)])
def test_pair_hits_ratio_with_varying_widths(name, tp, bundled_dir, tmp_path):
    dense, pruned = build_synthetic_pair(name, tmp_path / name, 0.2, tokenizer_from=bundled_dir, tp_size=tp)
    cfg = json.loads((pruned / "config.json").read_text())
    validate_flap_config(cfg)
    validate_for_vllm(cfg, tp_size=tp, distribution="vllm")
    assert abs(cfg["flap"]["achieved_ratio"] - 0.2) < 0.005
    mlp = cfg["intermediate_size_per_layer"]
    assert len(set(mlp)) > 3 and all(w % 64 == 0 for w in mlp)  # adaptive widths, aligned
    assert mlp[0] > min(mlp) and mlp[-1] > min(mlp)  # first and last layers are kept wider
    assert (dense / "tokenizer.json").is_file() and not list(pruned.glob("*.safetensors"))
    refs = resolve_pair(str(dense), str(pruned), "vllm", ["--load-format", "dummy"])
    assert 1.15 < ideal_ratio(refs["dense"], refs["pruned"])["ideal_ratio"] < 1.3


def test_unknown_synthetic_shape_is_an_error(bundled_dir, tmp_path):
    with pytest.raises(FlapDeployError, match="unknown synthetic shape 'gpt5'"):
        build_synthetic_pair("gpt5", tmp_path / "x", 0.2, tokenizer_from=bundled_dir)


def test_compare_takes_a_config_only_pair_when_vllm_makes_up_the_weights(bundled_dir, tmp_path):
    """``compare --synthetic`` serves with ``--load-format dummy``: the pair has configs and no weights."""
    dense, pruned = build_synthetic_pair("llama3.2-1b", tmp_path / "pair", 0.2, tokenizer_from=bundled_dir)
    refs = resolve_pair(str(dense), str(pruned), "vllm", ["--load-format", "dummy", "--dtype=bfloat16"])
    assert (refs["dense"].kind, refs["pruned"].kind) == ("dense", "pruned")
    steps = [decode_step_params(json.loads((d / "config.json").read_text())) for d in (dense, pruned)]
    assert ideal_ratio(refs["dense"], refs["pruned"])["ideal_ratio"] == pytest.approx(steps[0] / steps[1])
    with pytest.raises(FlapDeployError, match="no .safetensors weight files"):
        resolve_pair(str(dense), str(pruned), "vllm", ["--dtype=bfloat16"])
