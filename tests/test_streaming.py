"""Layer streaming: one decoder layer resident at a time, for pruning and evaluation, at any size."""

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from cli_util import one_line_error
from flap_deploy.streaming.memory import peak_rss_bytes
from flap_deploy.io.shards import INDEX_NAME, ShardedReader, ShardWriter
from flap_deploy.pruning.synthetic import Shape, write_random_checkpoint
from flap_deploy_cli import main

TINY = Shape("LlamaForCausalLM", 128, 256, 4, 4, 2, 32)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing in the old tree".split()
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (20000,), generator=g).tolist()))
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, bundled_dir):
    """A tiny random Llama written in three shards with an index."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny") / "dense", TINY, tokenizer_from=bundled_dir,
                                   max_shard_bytes=20_000_000)


def test_shard_writer_round_trip(tmp_path):
    layout = [(f"t{i}", (i + 1, 3), dtype) for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3)]
    tensors = {name: torch.randn(shape).to(dtype) for name, shape, dtype in layout}
    writer = ShardWriter(tmp_path, layout, max_bytes=40)
    for name, _, _ in layout:
        writer.write(name, tensors[name])
    writer.close()
    assert len(writer.files) > 1 and (tmp_path / INDEX_NAME).is_file()
    reader = ShardedReader(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(reader.read(name), t)
    from safetensors.torch import load_file  # the reference reader agrees with ours

    for f in writer.files:
        for name, t in load_file(tmp_path / f).items():
            assert torch.equal(t, tensors[name])


def _prune(src, out, *args):
    return CliRunner().invoke(main, ["prune", str(src), str(out), "--nsamples", "4", "--seqlen", "32", *map(str, args)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_device_cuda_without_cuda_is_an_error_before_any_layer(sharded, calib_text, tmp_path):
    line = one_line_error(_prune(sharded, tmp_path / "out", "--calib", calib_text, "--device", "cuda"))
    assert "--device" in line and "no CUDA device" in line
    assert not (tmp_path / "out").exists()


def test_missing_shard_is_an_error(sharded, calib_text, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    (bad / "model-00002-of-00003.safetensors").unlink()
    line = one_line_error(_prune(bad, tmp_path / "out", "--calib", calib_text))
    assert "model-00002-of-00003.safetensors" in line and "missing" in line
    assert not (tmp_path / "out").exists()


def test_wrong_tensor_shape_in_one_shard_is_an_error(sharded, calib_text, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 320  # the shards hold 256 channels
    (bad / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(_prune(bad, tmp_path / "out", "--calib", calib_text))
    assert "mlp.gate_proj.weight" in line and "layer 0" in line and "[256, 128]" in line
    assert not (tmp_path / "out").exists()


def test_a_config_transformers_refuses_is_an_error(sharded, calib_text, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = [256] * 3  # a per-layer list, of the wrong length too
    (bad / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(_prune(bad, tmp_path / "out", "--calib", calib_text))
    assert "config.json" in line and "intermediate_size" in line
    assert not (tmp_path / "out").exists()


def test_plan_beyond_max_memory_is_an_error(sharded, calib_text, tmp_path):
    """Refused before any layer runs (nothing written), naming the figure the run needs, and, the limit being
    below what this process already holds, that no option lowers it enough."""
    line = one_line_error(_prune(sharded, tmp_path / "out", "--calib", calib_text, "--max-memory", "64MiB"))
    assert "--max-memory is 0.06 GiB, and the run needs about" in line and "this process now" in line
    assert "no option lowers it under the limit: this process now" in line and "lower it with" not in line
    assert not (tmp_path / "out").exists()


def test_a_refusal_names_the_options_that_can_bring_the_run_under_the_limit():
    from flap_deploy.errors import ParameterError
    from flap_deploy.streaming.plan import SLACK_BYTES, MemoryPlan

    mib = 2**20
    plan = MemoryPlan(checkpoint_bytes=0, limit_bytes=0, limit_given=True, device="cpu", buffer_on_host=True,
                      runtime_bytes=500 * mib, buffer_bytes=400 * mib, activation_bytes=50 * mib)
    floor = 500 * mib + SLACK_BYTES
    with pytest.raises(ParameterError, match="lower it with `nsamples` or `seqlen`; `batch_size` or `seqlen`"):
        MemoryPlan.check(replace(plan, limit_bytes=floor + 100 * mib))
    with pytest.raises(ParameterError, match=f"this process now, allocator slack alone come to {floor / 2**30:.2f} GiB"):
        MemoryPlan.check(replace(plan, limit_bytes=floor - mib))
    assert MemoryPlan.check(replace(plan, limit_bytes=plan.host_peak_bytes)).host_peak_bytes == floor + 450 * mib


def _prune_measured(src, out, *args) -> tuple[dict, int]:
    """`prune --json` in a fresh process: its report and its peak RSS (VmHWM) read from outside while it runs.
    Not ``ru_maxrss``: a child inherits the forking test session's peak in it."""
    proc = subprocess.Popen([sys.executable, "-m", "flap_deploy_cli", "prune", str(src), str(out), "--json",
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    try:
        while proc.poll() is None:
            try:
                seen = max(seen, peak_rss_bytes(proc.pid))
            except (OSError, ValueError):  # gone between poll() and the read
                pass
            time.sleep(0.05)
        out_text, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    report = json.loads(out_text)
    assert seen > 0 and seen <= report["memory"]["peak_rss_bytes"] * 1.001  # the child's own figure agrees
    return report, max(seen, report["memory"]["peak_rss_bytes"])


# Wide MLP, narrow everything else: every layer's full covariances (0.27 GiB) are a large share of the peak.
WIDE_MLP = Shape("LlamaForCausalLM", 128, 2048, 8, 4, 2, 32)


@pytest.mark.slow
def test_a_limit_below_the_kept_covariances_gets_the_second_pass_and_stays_under_it(bundled_dir, calib_text,
                                                                                      tmp_path):
    src = write_random_checkpoint(tmp_path / "dense", WIDE_MLP, tokenizer_from=bundled_dir)
    flags = ("--calib", calib_text, "--nsamples", "8", "--seqlen", "64")
    default, _ = _prune_measured(src, tmp_path / "a", *flags)
    plan = default["memory"]["plan"]
    assert plan["ls_statistics"] == "second pass" and plan["covariance_bytes"] == 0
    assert plan["kept_need_bytes"] - plan["host_peak_bytes"] > 0.2 * 2**30
    limit = (plan["kept_need_bytes"] + plan["host_peak_bytes"]) // 2
    report, peak = _prune_measured(src, tmp_path / "b", *flags, "--max-memory", limit)
    assert report["memory"]["plan"]["ls_statistics"] == "second pass"
    assert report["provenance"]["reconstruction"]["statistics"]["pass"].startswith("second")
    assert peak <= limit, f"peak RSS {peak / 2**30:.3f} GiB over --max-memory {limit / 2**30:.3f} GiB"


def test_json_reports_timings_and_peak_memory(sharded, calib_text, tmp_path):
    res = _prune(sharded, tmp_path / "out", "--calib", calib_text, "--ratio", "0.3", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["memory"]["peak_rss_bytes"] > 0 and data["memory"]["plan"]["checkpoint_bytes"] > 0
    assert {"calibrate_s", "write_s", "total_s"} <= set(data["timings"])
    assert abs(data["provenance"]["achieved_ratio"] - 0.3) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flap", "wanda-sp", "mag-sp"])
def test_streamed_prune_equals_the_in_memory_prune(method, bundled_dir, calib_text, tmp_path):
    """Read layer by layer from the safetensors, or all resident in memory: the same masks, widths and tensors."""
    from safetensors.torch import load_file

    from flap_deploy.io.model_ref import load_model
    from flap_deploy.pruning.config import PruneConfig
    from flap_deploy.pruning.pipeline import prune

    config = PruneConfig(ratio=0.2, method=method, calib=str(calib_text), nsamples=8, seqlen=32, mlp_multiple=16,
                         progress=False)
    streamed = prune(bundled_dir, config, out=tmp_path / "streamed")
    resident = prune(load_model(bundled_dir), config, out=tmp_path / "resident")
    for a, b in zip(streamed.masks, resident.masks):
        assert torch.equal(a.heads, b.heads) and torch.equal(a.mlp, b.mlp)
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (streamed.path, resident.path))
    for key in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer"):
        assert ca[key] == cb[key]
    ta, tb = load_file(streamed.path / "model.safetensors"), load_file(resident.path / "model.safetensors")
    assert set(ta) == set(tb)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_streamed_eval_equals_the_whole_model_perplexity(bundled_dir, wikitext_dir):
    import torch.nn.functional as F

    from flap_deploy.evaluation.perplexity import evaluate_windows, token_windows
    from flap_deploy.io.model_ref import resolve_model
    from flap_deploy.io.text import load_text

    ref = resolve_model(bundled_dir)
    windows = token_windows(ref.tokenizer(), load_text(wikitext_dir / "test.txt"), 256, 2048)
    streamed = evaluate_windows(ref, windows, batch_size=4, progress=False, device="cpu")
    model = ref.load(torch.float32)
    with torch.no_grad():
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert streamed.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-4)
    compared = evaluate_windows(ref, windows, reference=model, batch_size=4, progress=False, device="cpu")
    assert compared.kl == pytest.approx(0, abs=1e-6) and compared.top1_agreement == 1.0


@pytest.mark.slow
def test_streamed_eval_of_a_pruned_checkpoint_equals_its_whole_model(flap20_dir):
    """Removed modules and per-layer widths run layer by layer as they run in the whole model."""
    import torch.nn.functional as F

    from flap_deploy.evaluation.perplexity import evaluate_windows
    from flap_deploy.io.model_ref import resolve_model

    ref = resolve_model(flap20_dir)
    windows = torch.randint(0, ref.config["vocab_size"], (3, 128), generator=torch.Generator().manual_seed(0))
    streamed = evaluate_windows(ref, windows, batch_size=2, progress=False, device="cpu")
    with torch.no_grad():
        logits = ref.load(torch.float32)(input_ids=windows, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert streamed.perplexity == pytest.approx(math.exp(nll.item()), rel=1e-4)


@pytest.fixture(scope="module")
def checkpoint_3gb(bundled_dir, tmp_path_factory):
    """A 3.14 GiB float32 random-weight Llama in 5 shards, written once for both reconstruction modes."""
    shape = Shape("LlamaForCausalLM", 1536, 6144, 20, 12, 4, 128)
    root = tmp_path_factory.mktemp("dense-3gb")
    yield write_random_checkpoint(root, shape, tokenizer_from=bundled_dir, overwrite=True)
    shutil.rmtree(root)  # 3 GiB: not left for the rest of the session


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("--reconstruct", "bias")], ids=["default", "bias"])
def test_a_3gb_checkpoint_prunes_under_a_max_memory_of_40_percent_of_its_size_as_planned(mode, checkpoint_3gb,
                                                                                          calib_text, tmp_path):
    """The shipped default (the ``ls`` refit, its covariances from a second pass) and the paper's bias
    compensation, each under ``--max-memory`` = 40 % of the checkpoint: the peak RSS measured from outside
    stays under the limit, and the plan is a bound, at most 10 % below the measured peak."""
    src = checkpoint_3gb
    size = ShardedReader(src).nbytes
    assert size >= 3 * 1000**3 and len(list(src.glob("*.safetensors"))) > 1
    limit = int(0.4 * size)
    report, peak = _prune_measured(src, tmp_path / "out", "--calib", calib_text, "--nsamples", "4", "--seqlen", "64",
                                   "--max-memory", limit, *mode)
    shutil.rmtree(tmp_path / "out")  # 2.5 GiB: gone before the next mode writes its own
    planned = report["memory"]["plan"]["host_peak_bytes"]
    assert peak <= limit, f"peak RSS {peak / 2**30:.2f} GiB of a {size / 2**30:.2f} GiB checkpoint"
    assert planned >= 0.9 * peak, f"planned {planned / 2**30:.3f} GiB, measured {peak / 2**30:.3f} GiB"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("--reconstruct", "bias")], ids=["default", "bias"])
def test_the_plan_of_the_bundled_model_bounds_its_measured_peak(mode, bundled_dir, calib_text, tmp_path):
    report, peak = _prune_measured(bundled_dir, tmp_path / "out", "--calib", calib_text, "--nsamples", "16",
                                   "--seqlen", "128", *mode)
    planned = report["memory"]["plan"]["host_peak_bytes"]
    assert planned >= 0.9 * peak, f"planned {planned / 2**30:.3f} GiB, measured {peak / 2**30:.3f} GiB"
