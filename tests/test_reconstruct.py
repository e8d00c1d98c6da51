"""The reconstruction of o_proj / down_proj: exact covariance streaming, the least-squares refit,
masking equivalence of every mode, provenance, and the quality claim on the bundled model."""

import math
from dataclasses import replace

import pytest
import torch

from factories import VOCAB, masked_dense_logits, small, tiny_dense
from flap_deploy import prune
from flap_deploy.model.adapters import get_adapter
from flap_deploy.model.layout import LayerMask
from flap_deploy.pruning.compress import LayerMeans, compress
from flap_deploy.pruning.reconstruct import refit_layers
from flap_deploy.pruning.stats import CovStats
from flap_deploy.streaming.layers import LayerStream


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_covariance_streams_exactly_whatever_the_batching(dtype, tol):
    """Exact for float64 inputs; float32 inputs' batch products are taken in float32 (stats.py says
    why), so they agree to float32's rounding, and the merge across batches adds nothing to it."""
    g = torch.Generator().manual_seed(0)
    x = (3 + torch.randn(300, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g,
                                                                                    dtype=torch.float64)).to(dtype)
    cols = torch.tensor([1, 4, 5, 9])
    full = torch.cov(x.double().T, correction=0)
    for sizes in ([300], [1, 299], [7] * 42 + [6], [150, 150]):
        s, every = CovStats(10, cols), CovStats(10)
        for part in torch.split(x, sizes):
            for acc in (s, every):
                acc.update(part.view(-1, 2, 10) if part.shape[0] % 2 == 0 else part)
        scale = float(full.abs().max())
        torch.testing.assert_close(s.covariance(cols=cols), full[:, cols], rtol=0, atol=tol * scale)
        torch.testing.assert_close(every.covariance(), full, rtol=0, atol=tol * scale)
        torch.testing.assert_close(s.covariance(rows=cols[:2], cols=cols[1:]), full[cols[:2]][:, cols[1:]],
                                   rtol=0, atol=tol * scale)
        torch.testing.assert_close(s.mean, x.double().mean(0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        s.covariance(cols=torch.tensor([0]))


def redundant_model():
    """Tiny Llama whose KV group 1 duplicates group 0 and whose odd MLP channels are twice the
    even ones: the removed o_proj / down_proj inputs are exact linear combinations of kept ones."""
    model = tiny_dense("llama")  # 8 query heads in 2 KV groups of 4, head_dim 16, MLP 96
    adapter = get_adapter(model.config)
    hd, half = 16, 4 * 16
    with torch.no_grad():
        for i in range(model.config.num_hidden_layers):
            m = adapter.layer_modules(model, i)
            m.q_proj.weight[half:] = m.q_proj.weight[:half]
            m.k_proj.weight[hd:] = m.k_proj.weight[:hd]
            m.v_proj.weight[hd:] = m.v_proj.weight[:hd]
            m.gate_proj.weight[1::2] = m.gate_proj.weight[0::2]
            m.up_proj.weight[1::2] = 2 * m.up_proj.weight[0::2]
    masks = [LayerMask(heads=torch.arange(8) < 4, mlp=torch.arange(96) % 2 == 0)] * model.config.num_hidden_layers
    return model, masks


def test_ls_reproduces_the_dense_model_where_the_removed_channels_are_redundant_and_bias_does_not():
    dense, masks = redundant_model()
    calib = torch.randint(0, VOCAB, (12, 24), generator=torch.Generator().manual_seed(1))
    refits = refit_layers(dense, calib, masks, ridge=0.0, batch_size=5, progress=False)
    stats = prune(dense, small(ratio=0.0)).statistics  # only for the means of the bias mode
    means = [LayerMeans(attn=s.attn.mean, mlp=s.mlp.mean) for s in stats.layers]
    with torch.no_grad():
        ref = dense(input_ids=calib, use_cache=False).logits
        ls = compress(dense, masks, refits=refits)(input_ids=calib, use_cache=False).logits
        bias = compress(dense, masks, means)(input_ids=calib, use_cache=False).logits
    assert (ls - ref).abs().max() <= 1e-5
    assert (bias - ref).abs().max() > 1e-2


def test_sequential_refit_on_pruned_inputs_also_reproduces_redundant_channels():
    """The study's variant (each module refitted on the pruned stream's inputs) is the same pass and
    the same solve: where the removed channels are redundant the pruned stream is the dense one, so
    it gives the one-pass refit and reproduces the dense model (in float64, where nothing but the
    solve rounds)."""
    dense, masks = redundant_model()
    dense = dense.double()
    calib = torch.randint(0, VOCAB, (12, 24), generator=torch.Generator().manual_seed(1))
    one_pass = refit_layers(dense, calib, masks, ridge=0.0, batch_size=5, progress=False)
    sequential = refit_layers(dense, calib, masks, ridge=0.0, batch_size=5, progress=False, pruned_inputs=True)
    with torch.no_grad():
        ref = dense(input_ids=calib, use_cache=False).logits
        got = compress(dense, masks, refits=sequential)(input_ids=calib, use_cache=False).logits
    assert (got - ref).abs().max() <= 1e-10
    for a, b in zip(one_pass, sequential):
        for x, y in ((a.attn, b.attn), (a.mlp, b.mlp)):
            torch.testing.assert_close(y.weight, x.weight, rtol=0, atol=1e-10)
            torch.testing.assert_close(y.bias, x.bias, rtol=0, atol=1e-10)


def test_infinite_ridge_is_the_bias_compensation():
    dense = tiny_dense("qwen2")
    ls = prune(dense, small(ratio=0.35, reconstruct="ls", ridge=math.inf))
    bias = prune(dense, small(ratio=0.35, reconstruct="bias"), statistics=ls.statistics)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ls.model(input_ids=x).logits, bias.model(input_ids=x).logits, rtol=0, atol=1e-5)


def test_first_pass_covariance_gives_the_second_pass_refit():
    from flap_deploy.pruning import pipeline, statistics

    dense = tiny_dense("mistral")
    config = small(ratio=0.35, ridge=0.1)
    one = prune(dense, replace(config, max_memory="1TiB"))  # a budget with room: kept from the statistics pass
    held = sum(c.comoment.numel() * 8 for s in one.statistics.layers for c in (s.attn_cov, s.mlp_cov))
    assert one.memory["plan"]["covariance_bytes"] == held == statistics.covariance_nbytes(LayerStream.open(dense))
    reused = prune(dense, config, statistics=pipeline.collect_statistics(dense, config, covariance=True))
    two = prune(dense, config)  # the default: a second pass, whatever the machine has
    assert two.memory["plan"]["covariance_bytes"] == 0 and two.statistics.covariances is None
    for r in (one, reused):
        assert r.provenance["reconstruction"]["statistics"]["pass"].startswith("first")
    assert two.provenance["reconstruction"]["statistics"]["pass"].startswith("second")
    for a, b, c in zip(one.refits, reused.refits, two.refits):
        for x in (a, b):
            torch.testing.assert_close(x.mlp.weight, c.mlp.weight, rtol=1e-5, atol=1e-6)  # float32 weights
            torch.testing.assert_close(x.attn.bias, c.attn.bias, rtol=1e-6, atol=1e-6)


def test_covariances_are_kept_only_under_a_max_memory_that_has_room_for_them(monkeypatch):
    from flap_deploy.pruning.pipeline import plan_prune
    from flap_deploy.pruning.statistics import covariance_nbytes
    from flap_deploy.streaming import plan as plan_module

    monkeypatch.setattr(plan_module, "rss_bytes", lambda: 100 << 20)  # the same runtime for every plan
    stream = LayerStream.open(tiny_dense("llama"))
    cfg = stream.model.config
    need = covariance_nbytes(stream)
    assert need == 8 * cfg.num_hidden_layers * ((cfg.num_attention_heads * cfg.head_dim) ** 2 + cfg.intermediate_size ** 2)
    default = plan_prune(stream, small(), calibrates=True)
    assert default.ls_statistics == "second pass" and default.covariance_bytes == 0
    assert f"--max-memory {math.ceil(default.kept_need_bytes / 2**30 * 10) / 10:.1f}GiB" in default.describe()
    kept = plan_prune(stream, small(max_memory=default.kept_need_bytes), calibrates=True)
    assert kept.ls_statistics == "kept" and kept.covariance_bytes == need
    assert kept.host_peak_bytes == default.kept_need_bytes <= kept.limit_bytes
    second = plan_prune(stream, small(max_memory=default.kept_need_bytes - 1), calibrates=True)
    assert second.ls_statistics == "second pass" and second.host_peak_bytes <= second.limit_bytes
    assert plan_prune(stream, small(reconstruct="bias"), calibrates=True).ls_statistics == ""
    searched = plan_prune(stream, small(search="evo"), calibrates=True)  # its candidates refit from them
    assert searched.ls_statistics == "kept" and searched.covariance_bytes == need


def test_only_the_ls_reconstruction_plans_covariances():
    dense = tiny_dense("llama")
    assert prune(dense, small(ratio=0.3, max_memory="8GiB")).memory["plan"]["covariance_bytes"] > 0
    for kw in (dict(reconstruct="bias"), dict(reconstruct="none"), dict(method="wanda-sp")):
        assert prune(dense, small(ratio=0.3, max_memory="8GiB", **kw)).memory["plan"]["covariance_bytes"] == 0, kw


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["none", "bias", "ls"])
def test_masking_equivalence_of_every_mode(family, mode):
    dense = tiny_dense(family)
    result = prune(dense, small(ratio=0.35, reconstruct=mode, ridge=0.01))
    assert (result.refits is not None) == (mode == "ls") and (result.means is not None) == (mode == "bias")
    x = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pruned = result.model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(pruned, masked_dense_logits(dense, result, x), rtol=0, atol=1e-4)


def test_provenance_records_the_reconstruction():
    dense = tiny_dense("llama")
    ls = prune(dense, small(ratio=0.3, ridge=0.5)).provenance["reconstruction"]
    assert ls["mode"] == "ls" and ls["ridge"] == 0.5
    assert ls["statistics"]["calibration"] == {"source": "self", "samples": 12, "seqlen": 24, "seed": 0}
    assert "float64" in ls["statistics"]["covariance"] and ls["statistics"]["pass"].startswith("second")
    bias = prune(dense, small(ratio=0.3, reconstruct="bias")).provenance
    assert bias["reconstruction"]["mode"] == "bias" and bias["reconstruction"]["ridge"] is None
    assert bias["bias_compensation"] is True
    wanda = prune(dense, small(ratio=0.3, method="wanda-sp")).provenance["reconstruction"]
    assert wanda == {"mode": "none", "ridge": None, "statistics": None}


@pytest.mark.parametrize("kw, param", [(dict(reconstruct="lsq"), "reconstruct"), (dict(ridge=-1.0), "ridge")])
def test_bad_reconstruction_values_name_their_parameter(kw, param):
    from flap_deploy.errors import ParameterError

    with pytest.raises(ParameterError) as e:
        small(**kw).validate()
    assert e.value.param == param


def test_python_docs_domain_is_deterministic_and_long_enough(bundled_dir):
    from flap_deploy.io.model_ref import load_tokenizer
    from flap_deploy.io.text import python_docs_text

    text = python_docs_text()
    assert text == python_docs_text() and "assert" in text
    assert len(load_tokenizer(bundled_dir)(text[:400_000])["input_ids"]) >= 40_000
