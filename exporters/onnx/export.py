"""``export_onnx``: a checkpoint (pruned or dense) -> an ONNX Runtime directory.

Dense sources are first turned into a FlapLlama with all-true masks (``compress``), so
dense and pruned models share one graph family and one exporter. The graph has one of two
forms (``contract.FORMS``): ``gqa`` is written node by node (``gqa.py``), ``past-present`` comes
from ``torch.onnx.export(dynamo=True)`` on ``OnnxDecoder`` with explicit dynamic axes. The whole
directory is written atomically, and verification against PyTorch runs before it is renamed
into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.io.atomic import atomic_directory, check_output_dir
from flap_deploy.io.bundled import cache_dir
from flap_deploy.io.card import rewrite_card, write_card
from flap_deploy.io.checkpoint import TOKENIZER_FILES, copy_tokenizer_files
from flap_deploy.io.model_ref import CHECKPOINTS, ModelRef, resolve_model
from flap_deploy.model.layout import LayerMask
from flap_deploy.model.modeling_flap_llama import FlapLlamaForCausalLM
from flap_deploy.pruning.compress import compress

from .contract import (
    DEFAULT_FORM,
    FORMS,
    GQA,
    PAST_PRESENT,
    cache_layers,
    input_names,
    output_names,
)
from .gqa import check_gqa, write_gqa_graph
from .graph import OnnxDecoder
from .manifest import DTYPES, MANIFEST_NAME, MODEL_NAME, build_manifest, source_identity
from .quantize import QUANTIZE, quantize_weights
from .verify import DECODE_STEPS, TOLERANCE, compare_with_torch, verification_prompts

SUPPORTED_OPSETS = (18, 19, 20, 21, 22, 23)
# torch.onnx keeps weights inside model.onnx only below protobuf's 2 GB limit.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Example sizes for tracing: all > 1 and all different, or torch.export specializes them.
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 5


def load_flap_model(model: str | os.PathLike | ModelRef) -> tuple[FlapLlamaForCausalLM, Path]:
    """Load a pruned checkpoint, or a dense one converted to FlapLlama (all-true masks), in float32."""
    ref = resolve_model(model, accept=CHECKPOINTS)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar (ours) per export
    loaded = ref.load(torch.float32)
    if ref.kind == "dense":
        loaded = compress(loaded, [LayerMask()] * loaded.config.num_hidden_layers,
                          provenance={"method": "dense", "source_model": str(ref.path)})
    return loaded.eval(), ref.path


def export_graph(model: FlapLlamaForCausalLM, file: Path, opset: int, external_data: bool) -> None:
    """Trace ``OnnxDecoder(model)`` with dynamic batch / seq / past axes into ``file``."""
    from torch.export import Dim

    decoder = OnnxDecoder(model).eval()
    layers = decoder.layers
    cfg = model.config
    b, s, p = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s)[None].repeat(b, 1)
    past = tuple(torch.zeros(b, c.kv_heads, p, c.head_dim, dtype=dtype) for c in layers for _ in (0, 1))
    keep = torch.tensor([0, 2, 1, 2])  # a size of its own (4), or torch.export ties it to another axis
    batch, seq, past_len, total = Dim("batch"), Dim("seq"), Dim("past_sequence_length"), Dim("total_sequence_length")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in past),
              {0: Dim("kept")})
    # The exporter reports its steps on stdout and warns about optional torchvision ops: noise here.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        logging.getLogger("onnxscript").setLevel(logging.WARNING)
        logging.getLogger("onnx_ir").setLevel(logging.WARNING)
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        with torch.no_grad():
            program = torch.onnx.export(
                decoder, (ids, mask, pos, past, keep), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                input_names=input_names(layers), output_names=output_names(layers), optimize=True,
                verbose=False, external_data=external_data,
            )
        program.save(str(file), external_data=external_data)


def _write_past_present(model: FlapLlamaForCausalLM, file: Path, opset: int, external_data: bool,
                        max_length: int) -> None:
    export_graph(model, file, opset, external_data)  # any length: rotary is computed from position_ids


# The graph writer of each form (contract.FORMS): (model, file, opset, external_data, max_length).
WRITERS = {GQA: write_gqa_graph, PAST_PRESENT: _write_past_present}


def _check_verification_fits(ref: ModelRef, max_length: int) -> None:
    """ParameterError('max_length') when the export check's prompts and decode steps exceed ``max_length``."""
    try:
        tokenizer = ref.tokenizer()
    except FlapDeployError:  # no tokenizer: the check uses random ids
        tokenizer = None
    need = max(map(len, verification_prompts(tokenizer, ref.hf_config().vocab_size))) + DECODE_STEPS
    if need > max_length:
        raise ParameterError("max_length", f"{max_length} is below the export check's {need} tokens; raise it or "
                                           "skip the check")


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    (path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _verify(tmp: Path, model: torch.nn.Module, prompts: list[list[int]], label: str, threads: int | None,
            assert_tolerance: float | None) -> dict[str, Any]:
    from .runtime import OnnxCausalLM

    lm = OnnxCausalLM.from_dir(tmp, threads=threads)
    figures = compare_with_torch(lm, model, prompts)
    figures["reference"] = "pytorch float32"
    if not figures["finite"]:
        raise FlapDeployError(f"export verification failed ({label}): the ONNX graph produced non-finite logits")
    if assert_tolerance is not None:
        figures["tolerance_relative"] = assert_tolerance
        if figures["relative_logit_diff"] > assert_tolerance:
            raise FlapDeployError(
                f"export verification failed ({label}): max |Δlogit| {figures['max_abs_logit_diff']:.3g} is "
                f"{figures['relative_logit_diff']:.3g} of the logit range, above {assert_tolerance:g}"
            )
    return figures


def _quantize_in_place(tmp: Path, manifest: dict[str, Any], scheme: str, model: torch.nn.Module | None,
                       prompts: list[list[int]], threads: int | None) -> None:
    """Replace tmp/model.onnx by its quantized version; verify it against ``model`` when given."""
    float_file = tmp / f"{MODEL_NAME}.float"
    os.replace(tmp / MODEL_NAME, float_file)
    quantize_weights(float_file, tmp / MODEL_NAME, scheme, manifest["external_data"])
    for leftover in tmp.glob(f"{MODEL_NAME}.float*"):
        leftover.unlink()
    manifest["quantize"] = scheme
    _write_manifest(tmp, manifest)
    if model is not None:
        # quantized graphs are reported, not asserted: their error is a property of the weights.
        manifest["verification"][scheme] = _verify(tmp, model, prompts, scheme, threads, None)


def quantize_export(onnx_dir: str | os.PathLike, out_dir: str | os.PathLike, verify: bool = True,
                    overwrite: bool = False, threads: int | None = None, scheme: str = "int8") -> Path:
    """Write a quantized copy (``scheme`` int8 | int4) of an existing fp32 export (no re-export);
    verified against its source.

    The source checkpoint is found through the manifest's ``source.path``; with
    ``verify=False`` it is not needed.
    """
    from .manifest import read_manifest

    if scheme not in QUANTIZE:
        raise ParameterError("quantize", f"{scheme!r} is not supported (choose {' or '.join(QUANTIZE)})")
    src = Path(onnx_dir)
    manifest = read_manifest(src)
    if manifest.get("quantize") or manifest["dtype"] != "float32":
        raise FlapDeployError(f"{src}: quantization starts from an unquantized float32 export")
    out = check_output_dir(out_dir, overwrite)
    started = time.perf_counter()
    model = prompts = None
    if verify:
        model, _ = load_flap_model(manifest["source"]["path"])
    with atomic_directory(out, overwrite) as tmp:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        tokenizer = None
        if manifest.get("tokenizer"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tmp)
        prompts = verification_prompts(tokenizer, manifest["vocab_size"])
        manifest["verification"] = {k: v for k, v in manifest["verification"].items() if k not in QUANTIZE}
        _quantize_in_place(tmp, manifest, scheme, model, prompts, threads)
        manifest["quantize_seconds"] = round(time.perf_counter() - started, 1)
        manifest["size_bytes"] = _directory_bytes(tmp)
        manifest["graph_bytes"] = sum(f.stat().st_size for f in tmp.glob(f"{MODEL_NAME}*"))
        _write_manifest(tmp, manifest)
        rewrite_card(src, tmp, path=out)
    return Path(out)


def export_onnx(model_dir_or_name: str | os.PathLike, out_dir: str | os.PathLike, opset: int = 20,
                dtype: str = "fp32", quantize: str | None = None, verify: bool = True, overwrite: bool = False,
                threads: int | None = None, progress: bool = True, attention: str | None = None,
                max_length: int | None = None) -> Path:
    """Export a pruned or dense checkpoint to ``out_dir``: model.onnx + flap_onnx.json + tokenizer.

    ``attention``: the graph form, "gqa" | "past-present" (``contract.FORMS``); None: ``default_form``
    of the source (gqa where it can hold the model). ``max_length``:
    the longest sequence (prompt + generated) the graph takes, the gqa form's rotary caches and
    largest KV buffer (default: the model's max_position_embeddings).
    ``opset``: 18-23 (23 lets the past-present form use RMSNormalization). ``dtype``: "fp32" | "fp16".
    ``quantize``: None | "int8" | "int4" (blockwise MatMul weights, ``MatMulNBits``, applied after
    the float export has been verified). ``verify``: compare with PyTorch on fixed prompts and
    record the figures in the manifest; fails (FlapDeployError, nothing written) when float
    logits differ by more than the tolerance. Returns ``out_dir``.
    """
    if opset not in SUPPORTED_OPSETS:
        raise FlapDeployError(f"opset {opset} is not supported (choose one of {', '.join(map(str, SUPPORTED_OPSETS))})")
    if dtype not in DTYPES:
        raise FlapDeployError(f"dtype {dtype!r} is not supported (choose fp32 or fp16)")
    if quantize not in (None, *QUANTIZE):
        raise ParameterError("quantize", f"{quantize!r} is not supported (choose {' or '.join(QUANTIZE)})")
    if quantize and dtype != "fp32":
        raise ParameterError("quantize", f"{quantize} starts from an fp32 graph; use dtype fp32")
    if attention is not None and attention not in FORMS:
        raise ParameterError("attention", f"{attention!r} is not a graph form (choose {' or '.join(FORMS)})")
    if max_length is not None and max_length < 1:
        raise ParameterError("max_length", f"must be at least 1, got {max_length}")
    out = check_output_dir(out_dir, overwrite)
    source_ref = resolve_model(model_dir_or_name, accept=CHECKPOINTS)  # fail on a bad source before any work
    if attention is None:
        attention = default_form(source_ref)  # gqa only where check_gqa passes
    elif attention == GQA:
        check_gqa(source_ref.hf_config())
    if verify and max_length is not None:
        _check_verification_fits(source_ref, max_length)
    started = time.perf_counter()
    steps = 2 + verify + (1 + verify) * bool(quantize)
    bar = tqdm(total=steps, desc="export onnx", disable=not progress, unit="step")

    bar.set_postfix_str("load")
    model, source = load_flap_model(source_ref)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    graph_model = model if dtype == "fp32" else FlapLlamaForCausalLM(model.config).to(torch_dtype).eval()
    if graph_model is not model:
        graph_model.load_state_dict({k: v.to(torch_dtype) for k, v in model.state_dict().items()})
    bar.update()

    layers = cache_layers(model.config)
    max_length = max_length or model.config.max_position_embeddings
    weight_bytes = sum(p.numel() * p.element_size() for p in graph_model.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with atomic_directory(out, overwrite) as tmp:
        bar.set_postfix_str("write graph")
        t0 = time.perf_counter()
        WRITERS[attention](graph_model, tmp / MODEL_NAME, opset, external, max_length)
        trace_seconds = time.perf_counter() - t0
        bar.update()

        copy_tokenizer_files(source, tmp)
        has_tokenizer = any((tmp / f).is_file() for f in TOKENIZER_FILES if f.startswith("tokenizer"))
        manifest = build_manifest(
            config=model.config, layers=layers, attention=attention, max_length=max_length, opset=opset,
            dtype=dtype, quantize=None, source=source_identity(source), input_names=input_names(layers, attention),
            output_names=output_names(layers), external_data=external, tokenizer=has_tokenizer,
        )
        _write_manifest(tmp, manifest)
        tokenizer = None
        if has_tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tmp)
        prompts = verification_prompts(tokenizer, model.config.vocab_size)
        if verify:
            bar.set_postfix_str("verify " + dtype)
            manifest["verification"][dtype] = _verify(tmp, model, prompts, dtype, threads,
                                                      TOLERANCE[DTYPES[dtype]])
            bar.update()
        if quantize:
            bar.set_postfix_str("quantize " + quantize)
            _quantize_in_place(tmp, manifest, quantize, model if verify else None, prompts, threads)
            bar.update(1 + verify)
        manifest["export_seconds"] = round(time.perf_counter() - started, 1)
        manifest["trace_seconds"] = round(trace_seconds, 1)
        manifest["size_bytes"] = _directory_bytes(tmp)
        manifest["graph_bytes"] = sum(f.stat().st_size for f in tmp.glob(f"{MODEL_NAME}*"))
        _write_manifest(tmp, manifest)
        write_card(tmp, model.config.to_dict(), form="onnx", source=source, path=out)
    bar.close()
    return Path(out)


__all__ = ["export_onnx", "quantize_export", "export_graph", "load_flap_model"]


def ensure_onnx(model: str | os.PathLike | ModelRef, *, progress: bool = True, attention: str | None = None) -> Path:
    """An ONNX export directory for MODEL: itself if it is one, else a cached export of the checkpoint.

    Checkpoints (or `smollm2-135m`) are exported once, fp32, into ``<cache_dir()>/onnx``, keyed
    by the source's identity (where its weight files' bytes live, config and weight-header hashes) and the
    form's graph version, so a changed checkpoint or graph is exported again, and the same weights reached
    through a Hub snapshot's links (or any other link) are not. ``attention`` (default: ``default_form``
    of the checkpoint) picks the graph form.
    """
    ref = resolve_model(model)
    path = ref.path
    if ref.kind == "onnx":
        return path
    attention = attention or default_form(ref)
    identity = {**source_identity(path), "graph": FORMS[attention].version}  # a changed graph is exported again
    # Where the weight bytes live, not the directory that names them: a Hub snapshot's files link to
    # blobs named by their content, so a model reached by its Hub id and by a local path is exported once.
    weights = sorted(f.resolve() for f in path.glob("*.safetensors"))
    identity["path"] = [str(f) for f in weights]
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_dir() / "onnx" / f"{(weights[0].parent if weights else path).name}-{key}"
    if not (out / MANIFEST_NAME).is_file():
        export_onnx(ref, out, overwrite=True, progress=progress, attention=attention)
    return out


def default_form(ref: ModelRef) -> str:
    """The graph form a checkpoint is exported to by default: DEFAULT_FORM (gqa) where it can hold
    the model, else past-present."""
    try:
        check_gqa(ref.hf_config())
    except ParameterError:
        return PAST_PRESENT
    return DEFAULT_FORM
