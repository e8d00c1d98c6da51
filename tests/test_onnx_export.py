"""ONNX export + ONNX Runtime generation on tiny models (fast; no bundled model)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cli_util import one_line_error
from exporters.onnx import OnnxCausalLM, export_onnx
from exporters.onnx.manifest import MANIFEST_NAME
from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy_cli import main
from flap_deploy.errors import FlapDeployError
from flap_deploy.generation.sampling import SamplingParams
from factories import tiny_dense
from onnx_helpers import hf_greedy, lively_tiny_heterogeneous, tiny_tokenizer


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """(model, checkpoint dir with a tiny tokenizer, ONNX dir, the result of `export onnx` into it)."""
    root = tmp_path_factory.mktemp("onnx")
    model = lively_tiny_heterogeneous()
    ckpt = save_checkpoint(model, root / "ckpt", tokenizer=tiny_tokenizer())
    out = root / "onnx"
    return model, ckpt, out, CliRunner().invoke(main, ["export", "onnx", str(ckpt), str(out)])


@pytest.fixture(scope="module")
def tiny(cli_export):
    """(model, checkpoint dir, ONNX dir exported through the CLI)."""
    model, ckpt, out, result = cli_export
    if result.exit_code != 0:
        raise RuntimeError(f"export onnx failed: {result.output}")
    return model, ckpt, out


def test_cli_export_succeeds_and_reports_its_fp32_verification(cli_export):
    result = cli_export[3]
    assert result.exit_code == 0, result.output
    assert "verify fp32" in result.output


@pytest.fixture(scope="module")
def lm(tiny):
    return OnnxCausalLM.from_dir(tiny[2], threads=2)


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


def test_manifest_records_layout_source_and_verification(tiny):
    _, ckpt, out = tiny
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["num_key_value_heads_per_layer"] == [2, 0, 1, 2]
    assert m["cache_layers"] == [0, 2, 3]
    assert m["head_dim"] == 16 and m["dtype"] == "float32" and m["opset"] == 20 and m["quantize"] is None
    assert m["source"]["path"] == str(ckpt.resolve()) and len(m["source"]["config_sha256"]) == 64
    v = m["verification"]["fp32"]
    assert v["batch"] == 2 and v["decode_steps"] == 8 and len(set(v["prompt_lengths"])) == 2
    assert v["relative_logit_diff"] <= 1e-3 and v["greedy_agreement"] == 1.0
    assert m["tokenizer"] and (out / "tokenizer.json").is_file()


def test_forward_matches_pytorch_with_cache(tiny, lm):
    model = tiny[0]
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


def test_one_seed_samples_the_same_tokens_on_pytorch_and_onnx_runtime(tiny):
    """Both runtimes run one generation loop with one sampler (``generation.generate.decode``), so on an
    fp32 export the same seed picks the same tokens, greedy or sampled, batch left-padded."""
    from exporters.onnx.runtime import generate as onnx_generate
    from flap_deploy.generation.generate import generate as torch_generate

    _, ckpt, out = tiny
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


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_dense_source_exports_as_the_same_graph_family(tmp_path, family):
    dense = tiny_dense(family)
    dense.save_pretrained(tmp_path / "dense")
    out = export_onnx(tmp_path / "dense", tmp_path / "onnx", progress=False)
    m = json.loads((out / MANIFEST_NAME).read_text())
    n = dense.config.num_hidden_layers
    assert m["cache_layers"] == list(range(n))
    assert m["num_key_value_heads_per_layer"] == [dense.config.num_key_value_heads] * n
    assert m["verification"]["fp32"]["relative_logit_diff"] <= 1e-3  # no tokenizer: random-id prompts
    lm = OnnxCausalLM.from_dir(out)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5]]
    assert [g.token_ids for g in lm.generate(prompts, max_tokens=16, ignore_eos=True)] == hf_greedy(dense, prompts, 16)


def test_int8_quantized_export_is_verified_and_generates(tmp_path):
    model = lively_tiny_heterogeneous(seed=1)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = export_onnx(ckpt, tmp_path / "onnx", quantize="int8", progress=False)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["quantize"] == "int8" and set(m["verification"]) == {"fp32", "int8"}
    q = m["verification"]["int8"]
    assert q["finite"] and 0 < q["max_abs_logit_diff"]  # int8 weights do change the logits
    graph = onnx.load(str(out / "model.onnx")).graph
    weights = {i.name for i in graph.initializer}
    assert any(n.op_type == "MatMulNBits" for n in graph.node)
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]  # all int8
    assert not (out / "model.onnx.float").exists()
    g = OnnxCausalLM.from_dir(out).generate([[1, 2, 3]], max_tokens=8, ignore_eos=True)
    assert len(g[0].token_ids) == 8


def test_fp16_export_verifies(tmp_path):
    ckpt = save_checkpoint(lively_tiny_heterogeneous(seed=2), tmp_path / "ckpt")
    out = export_onnx(ckpt, tmp_path / "onnx", dtype="fp16", progress=False)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["dtype"] == "float16" and m["verification"]["fp16"]["relative_logit_diff"] <= 2e-2
    lm = OnnxCausalLM.from_dir(out)
    assert lm.empty_past(1)["past_key_values.0.key"].data_type() == "tensor(float16)"


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


def test_large_models_keep_weights_in_external_data(tmp_path, monkeypatch):
    from exporters.onnx import export as export_mod

    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 0)  # as if the weights were past 2 GB
    model = lively_tiny_heterogeneous(seed=3)
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    out = export_onnx(ckpt, tmp_path / "onnx", progress=False)
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
