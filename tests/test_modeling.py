"""FlapLlamaForCausalLM: per-layer widths, removed modules, generation, save/load."""

import pytest
import torch
import transformers

import flap_deploy  # noqa: F401  registers flap_llama
from factories import logits_without_package, tiny_heterogeneous
from flap_deploy.io.checkpoint import save_checkpoint, validate_checkpoint
from flap_deploy.model.modeling_flap_llama import FlapLlamaForCausalLM


@pytest.fixture(scope="module")
def model():
    return tiny_heterogeneous()


def test_config_and_modules_have_the_per_layer_widths(model):
    cfg = model.config
    assert cfg.num_attention_heads_per_layer == [8, 0, 2, 2]
    assert cfg.num_key_value_heads_per_layer == [2, 0, 1, 2]
    assert cfg.intermediate_size_per_layer == [96, 96, 0, 48]
    layers = model.model.layers
    assert not hasattr(layers[1].self_attn, "q_proj")  # removed: only the compensation bias is left
    assert layers[2].mlp.__class__.__name__ == "FlapRemovedMLP"
    assert layers[3].self_attn.num_key_value_groups == 1 and layers[0].self_attn.num_key_value_groups == 4


def test_cached_decoding_equals_full_forward(model):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(8, 12):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_batch_with_left_padding_equals_one_by_one(model):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(3, 128, (7,), generator=g)
    b = torch.randint(3, 128, (4,), generator=g)
    pad = 0
    batch = torch.stack([a, torch.cat([torch.full((3,), pad), b])])
    mask = torch.stack([torch.ones(7, dtype=torch.long), torch.cat([torch.zeros(3), torch.ones(4)]).long()])
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=pad, eos_token_id=None)
    together = model.generate(batch, attention_mask=mask, **kw)[:, 7:]
    alone_a = model.generate(a[None], **kw)[:, 7:]
    alone_b = model.generate(b[None], **kw)[:, 4:]
    assert torch.equal(together[0], alone_a[0])
    assert torch.equal(together[1], alone_b[0])


def test_save_load_identical_logits(model, tmp_path):
    out = save_checkpoint(model, tmp_path / "ckpt")
    cfg = validate_checkpoint(out)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_flap_llama.FlapLlamaForCausalLM"
    assert (out / "modeling_flap_llama.py").is_file()
    assert not list(out.glob("*.bin"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, FlapLlamaForCausalLM)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_trust_remote_code_without_the_package(model, tmp_path):
    out = save_checkpoint(model, tmp_path / "ckpt")
    ids = [[5, 6, 7, 8, 9]]
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits[0, -1].tolist()
    got = logits_without_package(out, ids, tmp_path)
    assert max(abs(x - y) for x, y in zip(got, want)) < 1e-5
