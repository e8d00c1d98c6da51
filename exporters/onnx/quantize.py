"""Dynamic int8 quantization of the exported graph's linear weights (ONNX Runtime's tool)."""

from __future__ import annotations

import logging
from pathlib import Path


def quantize_int8(src: Path, dst: Path, external_data: bool = False) -> None:
    """Write ``dst``: ``src`` with every MatMul weight stored as int8 (per output channel).

    Activations are quantized on the fly at run time (``DynamicQuantizeMatMul`` /
    ``MatMulInteger``); norms, softmax and the embedding gather stay in float.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)  # the tool logs each skipped node
    quantize_dynamic(
        Path(src), Path(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        use_external_data_format=external_data,
    )
