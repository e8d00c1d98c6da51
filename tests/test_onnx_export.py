"""ONNX export + ONNX Runtime generation on tiny models, both graph forms (fast; no bundled model)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from factories import tiny_dense, tiny_heterogeneous
from onnx_helpers import (
    hf_greedy,
    lively_tiny_heterogeneous,
    tiny_hollow,
    tiny_tokenizer,
)

from cli_util import one_line_error
from exporters.onnx import OnnxCausalLM, export_onnx
from exporters.onnx.manifest import MANIFEST_NAME
from flap_deploy.errors import FlapDeployError
from flap_deploy.generation.sampling import SamplingParams
from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy_cli import main

FORMS = ("gqa", "past-present")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """(model, checkpoint dir with a tiny tokenizer)."""
    root = tmp_path_factory.mktemp("onnx")
    model = lively_tiny_heterogeneous()
    return model, save_checkpoint(model, root / "ckpt", tokenizer=tiny_tokenizer())


def _cli_export(ckpt, out, *flags):
    result = CliRunner().invoke(main, ["export", "onnx", str(ckpt), str(out), *flags])
    assert result.exit_code == 0, result.output
    assert "verify fp32" in result.output
    return out


@pytest.fixture(scope="module")
def tiny(tiny_ckpt, tmp_path_factory):
    """(model, checkpoint dir, past-present ONNX dir exported through the CLI)."""
    model, ckpt = tiny_ckpt
    return model, ckpt, _cli_export(ckpt, tmp_path_factory.mktemp("pp") / "onnx", "--attention", "past-present")


@pytest.fixture(scope="module")
def tiny_gqa(tiny_ckpt, tmp_path_factory):
    """(model, checkpoint dir, gqa ONNX dir exported through the CLI with its defaults)."""
    model, ckpt = tiny_ckpt
    return model, ckpt, _cli_export(ckpt, tmp_path_factory.mktemp("gqa") / "onnx")


@pytest.fixture(scope="module", params=FORMS)
def lm(request, tiny, tiny_gqa):
    return OnnxCausalLM.from_dir({"gqa": tiny_gqa, "past-present": tiny}[request.param][2], threads=2)


def test_graph_io_follows_the_contract(tiny):
    model, _, out = tiny
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {i.name: dims(i) for i in graph.input}
    outputs = {o.name: dims(o) for o in graph.output}
    # layer 1 has no attention: no cache tensors; the others keep their own KV-head counts
    expected_kv = {0: 2, 2: 1, 3: 2}
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids", "logits_index"} | {
        f"past_key_values.{i}.{kv}" for i in expected_kv for kv in ("key", "value")}
    assert isinstance(inputs["logits_index"][0], str)  # dynamic: one position or all
    assert set(outputs) == {"logits"} | {f"present.{i}.{kv}" for i in expected_kv for kv in ("key", "value")}
    for i, heads in expected_kv.items():
        shape = inputs[f"past_key_values.{i}.key"]
        assert shape[1] == heads and shape[3] == 16
        assert isinstance(shape[0], str) and isinstance(shape[2], str)  # dynamic batch and past
    assert all(isinstance(d, str) for d in inputs["input_ids"] + inputs["attention_mask"])
    assert outputs["logits"][2] == model.config.vocab_size


def test_gqa_graph_has_one_attention_node_per_attention_layer_over_shared_buffers(tiny_gqa):
    model, _, out = tiny_gqa
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {i.name: dims(i) for i in graph.input}
    expected = {0: (8, 2), 2: (2, 1), 3: (2, 2)}  # layer: (query heads, KV heads); layer 1 has no attention
    assert list(inputs)[:4] == ["input_ids", "seqlens_k", "query_seqlens", "total_sequence_length"]
    assert set(inputs) == {"input_ids", "seqlens_k", "query_seqlens", "total_sequence_length", "logits_index"} | {
        f"past_key_values.{i}.{kv}" for i in expected for kv in ("key", "value")}
    assert len(inputs["logits_index"]) == 2  # [batch, kept]: per row (chunks are right-padded)
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 3 and not [n for n in graph.node if n.op_type in ("Softmax", "Concat")]
    for node in attention:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layer = int(node.output[1].split(".")[1])
        assert (attrs["num_heads"], attrs["kv_num_heads"]) == expected[layer] and attrs["do_rotary"] == 1
        # past and present of a layer are one buffer [batch, kv_heads, capacity, head_dim]
        assert node.input[3] == f"past_key_values.{layer}.key" and node.output[1] == f"present.{layer}.key"
        assert inputs[node.input[3]] == ["batch", expected[layer][1], "capacity", 16]
    ops = {n.op_type for n in graph.node}
    assert {"SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops
    assert [o.name for o in graph.output][0] == "logits"


@pytest.mark.parametrize("form", FORMS)
def test_manifest_records_form_layout_source_and_verification(tiny, tiny_gqa, form):
    _, ckpt, out = {"gqa": tiny_gqa, "past-present": tiny}[form]
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["attention"] == form and m["max_length"] == 256  # the tiny model's max_position_embeddings
    assert ("capacity" in m["kv_cache"]) == (form == "gqa")
    assert m["num_key_value_heads_per_layer"] == [2, 0, 1, 2]
    assert m["cache_layers"] == [0, 2, 3]
    assert m["head_dim"] == 16 and m["dtype"] == "float32" and m["opset"] == 20 and m["quantize"] is None
    assert m["source"]["path"] == str(ckpt.resolve()) and len(m["source"]["config_sha256"]) == 64
    v = m["verification"]["fp32"]
    assert v["batch"] == 2 and v["decode_steps"] == 8 and len(set(v["prompt_lengths"])) == 2
    assert v["relative_logit_diff"] <= 1e-3 and v["greedy_agreement"] == 1.0
    assert m["tokenizer"] and (out / "tokenizer.json").is_file()


def test_past_present_forward_matches_pytorch_with_cache(tiny):
    model = tiny[0]
    lm = OnnxCausalLM.from_dir(tiny[2], threads=2)
    ids = np.array([[0, 0, 5, 9, 17, 3], [4, 8, 15, 16, 23, 42]], dtype=np.int64)
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], dtype=np.int64)
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos)).logits.numpy()
    logits1, present = lm.forward(ids[:, :4], mask[:, :4], pos[:, :4], lm.empty_past(2))
    assert present["present.2.key"].shape() == [2, 1, 4, 16]
    logits2, present = lm.forward(ids[:, 4:], mask, pos[:, 4:], present)
    assert present["present.0.value"].shape() == [2, 2, 6, 16]
    got = np.concatenate([logits1, logits2], axis=1)
    real = mask.astype(bool)
    assert np.isfinite(got).all()  # padded rows stay finite (finfo.min mask, not -inf)
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=1e-4)
    # last_only: the graph computes the last position's logits alone, the same numbers
    last, _ = lm.forward(ids[:, :4], mask[:, :4], pos[:, :4], lm.empty_past(2), last_only=True)
    assert last.shape == (2, 1, logits1.shape[2])
    np.testing.assert_allclose(last[:, 0], logits1[:, -1], atol=1e-5, rtol=1e-5)


def test_gqa_chunked_prefill_and_decode_match_pytorch(tiny_gqa):
    model, _, out = tiny_gqa
    lm = OnnxCausalLM.from_dir(out, threads=2)
    prompts = [[4, 8, 15, 16, 23, 42, 7, 1, 9], [5, 9, 17], [3, 3, 2, 90, 11]]
    cache = lm.new_cache(4, 32)
    # rows 0, 1 and 3: two runs of rows, chunks of 4 tokens for the first (row 2 sits in between, free)
    logits = cache.prefill([0, 1, 3], prompts, chunk_tokens=8, all_logits=True)
    with torch.no_grad():
        for p, got in zip(prompts, logits):
            ref = model(torch.tensor([p])).logits[0].numpy()
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # one decode step for rows 0 and 3 only: row 1 sits it out, unchanged
    buffers = {k: (a, a.ctypes.data, a[1].copy()) for k, a in cache.kv.arrays.items()}
    step = cache.decode([3, 0], [77, 12])
    assert list(cache.lengths) == [10, 3, 0, 6]
    for name, (array, address, row1) in buffers.items():
        # the graph wrote the new tokens into the bound buffers themselves (IO binding, no copy)
        assert cache.kv.arrays[name] is array and array.ctypes.data == address, name
        assert np.abs(array[3, :, 5]).sum() > 0 and np.abs(array[0, :, 9]).sum() > 0, name
        np.testing.assert_array_equal(array[1], row1)
    with torch.no_grad():
        want = [model(torch.tensor([p + [t]])).logits[0, -1].numpy() for p, t in ((prompts[2], 77), (prompts[0], 12))]
    np.testing.assert_allclose(step, np.stack(want), atol=1e-4, rtol=1e-4)


def test_readme_decode_loop_with_io_binding_gives_pytorchs_greedy_tokens(tiny_gqa):
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "exporters" / "onnx" / "README.md").read_text()
    snippet = readme.split("A minimal greedy decode loop", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    model, _, out = tiny_gqa
    prompt = [5, 9, 17, 3, 44, 71]
    scope = {"onnx_dir": out, "prompt": prompt, "max_tokens": 12}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["tokens"] == hf_greedy(model, [prompt], 12)[0]


def test_greedy_32_tokens_equal_pytorch_batch_1(tiny, lm):
    prompt = [5, 9, 17, 3, 44, 71]
    want = hf_greedy(tiny[0], [prompt], 32)
    got = lm.generate([prompt], max_tokens=32, ignore_eos=True)
    assert got[0].token_ids == want[0]
    assert len(set(want[0])) > 3  # the model really moves between tokens


def test_greedy_32_tokens_equal_pytorch_batch_2_left_padded(tiny, lm):
    prompts = [[5, 9, 17, 3, 44, 71, 2, 90], [11, 60, 7]]
    want = hf_greedy(tiny[0], prompts, 32)
    got = lm.generate(prompts, max_tokens=32, ignore_eos=True)
    assert [g.token_ids for g in got] == want
    # batching does not change a row's tokens
    assert lm.generate([prompts[1]], max_tokens=32, ignore_eos=True)[0].token_ids == want[1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(lm):
    prompt = [[5, 9, 17, 3]]
    a = lm.generate(prompt, max_tokens=12, temperature=1.5, top_p=0.95, seed=3, ignore_eos=True)
    b = lm.generate(prompt, max_tokens=12, temperature=1.5, top_p=0.95, seed=3, ignore_eos=True)
    c = lm.generate(prompt, max_tokens=12, temperature=1.5, top_p=0.95, seed=4, ignore_eos=True)
    assert a[0].token_ids == b[0].token_ids != c[0].token_ids
    greedy = lm.generate(prompt, max_tokens=12, ignore_eos=True)
    assert lm.generate(prompt, max_tokens=12, temperature=2.0, top_k=1, seed=1,
                       ignore_eos=True)[0].token_ids == greedy[0].token_ids


def test_text_generation_stop_strings_and_eos(lm):
    full = lm.generate("w5 w9 w17", max_tokens=10, ignore_eos=True)[0]
    words = full.text.split()
    assert len(words) == 10 and full.finish_reason == "length"
    stop = " ".join(words[3:5])
    cut = lm.generate("w5 w9 w17", max_tokens=10, stop=[stop], ignore_eos=True)[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
    lm.eos_token_ids, saved = [full.token_ids[2]], lm.eos_token_ids
    try:
        ended = lm.generate("w5 w9 w17", max_tokens=10)[0]
    finally:
        lm.eos_token_ids = saved
    assert ended.token_ids == full.token_ids[:3] and ended.finish_reason == "stop"


def test_stop_token_ids_end_a_row_but_not_before_min_tokens(lm):
    full = lm.generate("w5 w9 w17", max_tokens=10, ignore_eos=True)[0]
    stop = full.token_ids[2]
    ended = lm.generate("w5 w9 w17", max_tokens=10, stop_token_ids=[stop])[0]
    first = full.token_ids.index(stop)
    assert ended.token_ids == full.token_ids[: first + 1] and ended.finish_reason == "stop"
    held = lm.generate("w5 w9 w17", max_tokens=10, stop_token_ids=[stop], min_tokens=5)[0]
    assert stop not in held.token_ids[:5] and len(held.token_ids) >= 5


def test_cli_generate_uses_the_runtime_the_directory_holds(tiny):
    _, ckpt, out = tiny
    runner = CliRunner()
    records = {}
    for name, path in (("onnx", out), ("pytorch", ckpt)):
        res = runner.invoke(main, ["generate", str(path), "w5 w9 w17", "-n", "16", "--json"])
        assert res.exit_code == 0, res.output
        records[name] = json.loads(res.stdout.strip().splitlines()[-1])
        assert records[name]["runtime"] == name
    assert records["onnx"]["token_ids"] == records["pytorch"]["token_ids"]
    assert records["onnx"]["text"] == records["pytorch"]["text"]


@pytest.mark.parametrize("form", FORMS)
def test_one_seed_samples_the_same_tokens_on_pytorch_and_onnx_runtime(tiny, tiny_gqa, form):
    """Both runtimes run one generation loop with one sampler (``generation.generate.decode``), so on an
    fp32 export of either form the same seed picks the same tokens, greedy or sampled, batch of two lengths."""
    from exporters.onnx.runtime import generate as onnx_generate
    from flap_deploy.generation.generate import generate as torch_generate

    _, ckpt, out = {"gqa": tiny_gqa, "past-present": tiny}[form]
    prompts = ["w5 w9 w17", "w11 w60 w7 w3 w44 w71 w2"]
    sampled = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, top_k=40, seed=3, ignore_eos=True)
    greedy = SamplingParams(max_tokens=32, ignore_eos=True)
    runs = {}
    for params in (sampled, greedy):
        want = torch_generate(ckpt, prompts, params, device="cpu")
        got = onnx_generate(out, prompts, params)
        assert [len(g.token_ids) for g in want] == [32, 32]
        assert [g.token_ids for g in got] == [g.token_ids for g in want]
        assert [g.text for g in got] == [g.text for g in want]
        runs[params.greedy] = want
    assert all(s.token_ids != g.token_ids for s, g in zip(runs[False], runs[True]))  # it really sampled


def _family(family: str):
    if family != "mistral-window":
        return tiny_dense(family)
    import transformers
    from factories import FAMILY_CONFIGS

    config = FAMILY_CONFIGS["mistral"]()
    config.sliding_window = 4  # shorter than the prompts: the window really cuts
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("family,forms", [("llama", FORMS), ("qwen3", FORMS), ("qwen2", ("gqa",)),
                                          ("mistral-window", ("gqa",))])
def test_dense_source_exports_as_the_same_graph_family(tmp_path, family, forms):
    dense = _family(family)
    dense.save_pretrained(tmp_path / "dense")
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]]
    want = hf_greedy(dense, prompts, 16)
    for form in forms:
        out = export_onnx(tmp_path / "dense", tmp_path / form, progress=False, attention=form)
        m = json.loads((out / MANIFEST_NAME).read_text())
        n = dense.config.num_hidden_layers
        assert m["attention"] == form and m["cache_layers"] == list(range(n))
        assert m["num_key_value_heads_per_layer"] == [dense.config.num_key_value_heads] * n
        assert m["verification"]["fp32"]["relative_logit_diff"] <= 1e-3  # no tokenizer: random-id prompts
        lm = OnnxCausalLM.from_dir(out)
        assert [g.token_ids for g in lm.generate(prompts, max_tokens=16, ignore_eos=True)] == want, form


@pytest.mark.parametrize("compensated,forms", [(True, FORMS), (False, ("gqa",))])
def test_fully_removed_layer_gives_the_same_tokens_in_both_forms(tmp_path, compensated, forms):
    model = tiny_hollow(compensated)
    assert model.config.num_attention_heads_per_layer[1] == model.config.intermediate_size_per_layer[1] == 0
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    prompts = [[9, 8, 7, 6, 5, 4], [1, 2]]
    want = hf_greedy(model, prompts, 16)
    for form in forms:
        out = export_onnx(ckpt, tmp_path / form, progress=False, attention=form)
        m = json.loads((out / MANIFEST_NAME).read_text())
        assert m["cache_layers"] == [0, 2] and m["verification"]["fp32"]["greedy_agreement"] == 1.0
        got = OnnxCausalLM.from_dir(out).generate(prompts, max_tokens=16, ignore_eos=True)
        assert [g.token_ids for g in got] == want, form


def test_long_generation_up_to_max_length_stays_within_1e_3_in_both_forms(tiny_ckpt, tiny, tmp_path):
    from exporters.onnx.verify import compare_with_torch

    model, ckpt = tiny_ckpt
    gqa = export_onnx(ckpt, tmp_path / "gqa", progress=False, max_length=40, verify=False)
    prompts = [[5, 9, 17, 3, 44, 71, 2, 90, 11], [60, 7, 33, 8, 100]]
    for out in (gqa, tiny[2]):
        lm = OnnxCausalLM.from_dir(out, threads=2)
        # teacher-forced greedy decode until the longer row holds 40 tokens: the gqa buffer is full
        figures = compare_with_torch(lm, model, prompts, decode_steps=40 - 9, capacity=40)
        assert figures["max_abs_logit_diff"] <= 1e-3 and figures["greedy_agreement"] == 1.0, (out, figures)
    greedy = hf_greedy(model, prompts, 35)
    full = OnnxCausalLM.from_dir(gqa, threads=2).generate(prompts, max_tokens=200, ignore_eos=True)
    # a row ends with "length" when prompt + generated tokens reach max_length: no error, no wrap-around
    assert [len(p) + len(g.token_ids) for p, g in zip(prompts, full)] == [40, 40]
    assert {g.finish_reason for g in full} == {"length"}
    assert [g.token_ids for g in full] == [greedy[0][:31], greedy[1]]


def test_int8_and_int4_quantized_exports_are_verified_and_generate(tmp_path):
    model = lively_tiny_heterogeneous(seed=1)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    for scheme in ("int8", "int4"):
        out = export_onnx(ckpt, tmp_path / scheme, quantize=scheme, progress=False)
        m = json.loads((out / MANIFEST_NAME).read_text())
        assert m["quantize"] == scheme and set(m["verification"]) == {"fp32", scheme}
        q = m["verification"][scheme]
        assert q["finite"] and 0 < q["max_abs_logit_diff"]  # quantized weights do change the logits
        graph = onnx.load(str(out / "model.onnx")).graph
        weights = {i.name for i in graph.initializer}
        bits = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert bits == {int(scheme[3:])}
        assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # all quantized
        assert not (out / "model.onnx.float").exists()
        g = OnnxCausalLM.from_dir(out).generate([[1, 2, 3]], max_tokens=8, ignore_eos=True)
        assert len(g[0].token_ids) == 8


@pytest.mark.parametrize("form", FORMS)
def test_fp16_export_verifies(tmp_path, form):
    ckpt = save_checkpoint(lively_tiny_heterogeneous(seed=2), tmp_path / "ckpt")
    out = export_onnx(ckpt, tmp_path / "onnx", dtype="fp16", progress=False, attention=form)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["dtype"] == "float16" and m["verification"]["fp16"]["relative_logit_diff"] <= 2e-2
    lm = OnnxCausalLM.from_dir(out)
    cache = lm.new_cache(1, 16)
    (logits,) = cache.prefill([0], [[1, 2, 3]], chunk_tokens=16)
    assert logits.dtype == np.float16 and np.isfinite(logits).all()


# -- bad inputs: one-line errors, nothing half-written ---------------------------------------

def _cli_error(args):
    return one_line_error(CliRunner().invoke(main, args))


def test_export_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "readme.txt").write_text("hello")
    msg = _cli_error(["export", "onnx", str(tmp_path / "notckpt"), str(tmp_path / "out")])
    assert "config.json" in msg and not (tmp_path / "out").exists()
    msg = _cli_error(["export", "onnx", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert "not found" in msg
    assert list(tmp_path.iterdir()) == [tmp_path / "notckpt"]


def test_gqa_is_refused_for_a_head_dim_it_cannot_hold_and_not_the_default_there(tmp_path):
    from exporters.onnx.export import default_form
    from flap_deploy.io.model_ref import resolve_model

    ckpt = save_checkpoint(tiny_heterogeneous(head_dim=8), tmp_path / "ckpt")
    msg = _cli_error(["export", "onnx", str(ckpt), str(tmp_path / "out"), "--attention", "gqa"])
    assert msg.startswith("error: --attention gqa needs head_dim a multiple of 16") and "has 8" in msg
    assert default_form(resolve_model(ckpt)) == "past-present"
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_max_length_below_its_own_check(tiny, tmp_path):
    msg = _cli_error(["export", "onnx", str(tiny[1]), str(tmp_path / "out"), "--max-length", "10"])
    assert msg.startswith("error: --max-length 10 is below the export check's")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_output_unless_overwrite(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    msg = _cli_error(["export", "onnx", str(tiny[1]), str(out)])
    assert "--overwrite" in msg and (out / "keep.txt").read_text() == "mine"
    res = CliRunner().invoke(main, ["export", "onnx", str(tiny[1]), str(out), "--overwrite", "--no-verify"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert json.loads((out / MANIFEST_NAME).read_text())["verification"] == {}


def test_failed_verification_writes_nothing(tiny, tmp_path, monkeypatch):
    from exporters.onnx import export as export_mod

    monkeypatch.setitem(export_mod.TOLERANCE, "float32", -1.0)  # no graph can pass
    with pytest.raises(FlapDeployError, match="verification failed"):
        export_onnx(tiny[1], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_loading_rejects_a_manifest_that_does_not_match_the_graph(tiny, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny[2], bad)
    m = json.loads((bad / MANIFEST_NAME).read_text())
    m["num_key_value_heads_per_layer"][2] = 2  # graph has 1 KV head in layer 2
    (bad / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(FlapDeployError, match="layer 2: manifest says 2 KV heads"):
        OnnxCausalLM.from_dir(bad)
    m["cache_layers"] = [0, 1, 2, 3]
    m["inputs"] += ["past_key_values.1.key", "past_key_values.1.value"]
    (bad / MANIFEST_NAME).write_text(json.dumps(m))
    msg = _cli_error(["generate", str(bad), "w1 w2"])
    assert "manifest inputs do not match the graph" in msg
    (bad / MANIFEST_NAME).unlink()
    assert "no flap_onnx.json" in str(pytest.raises(FlapDeployError, OnnxCausalLM.from_dir, bad).value)


@pytest.mark.parametrize("form", FORMS)
def test_large_models_keep_weights_in_external_data(tmp_path, monkeypatch, form):
    from exporters.onnx import export as export_mod

    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 0)  # as if the weights were past 2 GB
    model = lively_tiny_heterogeneous(seed=3)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = export_onnx(ckpt, tmp_path / "onnx", progress=False, attention=form)
    m = json.loads((out / MANIFEST_NAME).read_text())
    data = [f for f in out.iterdir() if f.name.startswith("model.onnx") and f.name != "model.onnx"]
    assert m["external_data"] and data and (out / "model.onnx").stat().st_size < data[0].stat().st_size
    assert m["verification"]["fp32"]["greedy_agreement"] == 1.0
    prompts = [[9, 8, 7, 6], [1, 2]]
    got = OnnxCausalLM.from_dir(out).generate(prompts, max_tokens=8, ignore_eos=True)
    assert [g.token_ids for g in got] == hf_greedy(model, prompts, 8)


def test_quantize_export_makes_a_verified_int8_copy(tiny, tmp_path):
    from exporters.onnx.export import quantize_export

    out = quantize_export(tiny[2], tmp_path / "int8")
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["quantize"] == "int8" and m["verification"]["int8"]["finite"]
    assert m["verification"]["fp32"] == json.loads((tiny[2] / MANIFEST_NAME).read_text())["verification"]["fp32"]
    assert (out / "model.onnx").stat().st_size < (tiny[2] / "model.onnx").stat().st_size
    # the float export's card, for the copy: its own path in the commands
    card, float_card = (out / "README.md").read_text(), (tiny[2] / "README.md").read_text()
    assert card == float_card.replace(str(tiny[2]), str(out)).replace(f"# {tiny[2].name}\n", f"# {out.name}\n")
    assert f"flap-deploy serve {out} --backend onnx" in card
    with pytest.raises(FlapDeployError, match="unquantized float32"):
        quantize_export(out, tmp_path / "again")
