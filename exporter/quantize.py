"""Weight-only int8 / int4 quantization of the package's decoder graphs, by ONNX Runtime's own quantizer.

`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` (round-to-nearest, block-wise
along K, `block` weights per scale) rewrites every MatMul whose weight is a constant: the decoder
segments' projections (q/k/v/o, gate/up/down) and the LM head. Attention's activation MatMuls and
everything else stay float32, and so do activations and KV caches.

- **int4**: the quantizer's QDQ format, symmetric (INT4 weights, one float32 scale per block, no zero
  point): blocked `DequantizeLinear(axis=0, block_size)` -> `MatMul`, standard ONNX (opset 21).
  This one form serves both runtimes: TensorRT 10 takes blocked INT4 `DequantizeLinear` only with
  zero zero-points (hence symmetric), and ONNX Runtime fuses DequantizeLinear+MatMul into its
  `MatMulNBits` kernel when the session is created (`tests/test_quantization.py` checks the
  optimised graph), so the weights are stored once.
- **int8**: the quantizer's QDQ format is 4-bit only (onnxruntime 1.32 refuses 8 bits there), so
  int8 uses its QOperator form, `com.microsoft.MatMulNBits(bits=8)`, symmetric: ONNX Runtime only.

The vision graph and the hyper-network stay float32: the vision tower runs once per image (prefill,
compute bound; weight bytes do not limit it) and is small next to the decoder, and the routers'
decision is a margin between two logits that int4 noise could flip (exit-layer agreement with the
fp32 reference is what the package promises). The embedding (a Gather) stays float32 too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from engines.core.errors import DyVTEError
from engines.core.manifest import Quantization
from engines.core.precision import Precision

QUANTIZED_ROLES = ("decoder", "lm_head")  # the fused decode graph is composed from these, so it is quantized too
# Weights per scale when --quant-block is not given. int4 at 16: on the built-in VILA's 500 eval
# samples block 32 lost 0.4 point without an exit and left dynamic-exit FLOPs 0.0007 above fp32's
# (exit layers 98.2% equal); block 16 lost none and matched fp32's FLOPs (README "Quantized
# packages"). Larger blocks (fewer float32 scales: 4.25 bits a weight at 128 against 6 at 16) make
# smaller packages and stay selectable.
DEFAULT_BLOCKS = {8: 32, 4: 16}
DEFAULT_BLOCK = DEFAULT_BLOCKS[8]
QUANTIZER = "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer"


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    block: int
    symmetric: bool = True

    @property
    def format(self) -> str:
        return "QDQ" if self.bits == 4 else "MatMulNBits"

    @property
    def accuracy_level(self) -> int | None:
        """int8: 4 (MatMulNBits computes with int8 activations; its float path for 8-bit weights measured
        ~150x slower, 8 ms vs 0.05 ms for a 1024x2816 decode MatMul); int4 QDQ: ONNX Runtime's fusion decides."""
        return 4 if self.bits == 8 else None

    @property
    def tensorrt(self) -> bool:
        """Whether the quantized graphs are standard ONNX a TensorRT parser takes."""
        return self.format == "QDQ"


def check_config(precision: Precision, block: int | None, shape) -> QuantConfig | None:
    """The quantization of `precision` (None for fp32/fp16), or a one-line error before any work:
    the block must be a power of two >= 16 (MatMulNBits' rule) and divide every K the quantized
    MatMuls have (hidden size, attention width, MLP width)."""
    if not precision.quantized:
        if block is not None:
            raise DyVTEError(f"--quant-block applies to int8/int4 packages, not {precision}")
        return None
    block = DEFAULT_BLOCKS[precision.weight_bits] if block is None else block
    if block < 16 or block & (block - 1):
        raise DyVTEError(f"--quant-block {block} must be a power of two of at least 16 (MatMulNBits' block sizes)")
    widths = {"hidden size": shape.hidden_size, "attention width": shape.num_heads * shape.head_dim}
    if shape.intermediate_size:
        widths["MLP width"] = shape.intermediate_size
    for what, k in widths.items():
        if k % block:
            raise DyVTEError(f"--quant-block {block} does not divide the model's {what} {k}; "
                             f"choose a block that does (e.g. {DEFAULT_BLOCKS[precision.weight_bits]})")
    try:
        _import_quantizer()
    except ImportError as exc:
        raise DyVTEError(f"int8/int4 export needs onnxruntime's quantization tooling: {exc}") from None
    return QuantConfig(precision.weight_bits, block)


def _import_quantizer():
    """The quantizer module, imported without the side effects on logging it has: at import it
    calls `logging.basicConfig(level=INFO)` (a root handler that would print every library's INFO
    lines) and logs each node it visits at INFO."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    matmul_nbits_quantizer.logger.setLevel(logging.ERROR)  # its opset-21 warning is expected
    return matmul_nbits_quantizer


def _constant_matmuls(model: onnx.ModelProto) -> int:
    inits = {i.name for i in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits)


def quantize_model(model: onnx.ModelProto, config: QuantConfig, name: str) -> onnx.ModelProto:
    """`model` (weights in memory) with its constant-weight MatMuls quantized; a DyVTEError when the
    quantizer leaves one of them, or finds none (a graph it cannot take)."""
    MatMulNBitsQuantizer = _import_quantizer().MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    expected = _constant_matmuls(model)
    if expected == 0:
        raise DyVTEError(f"graph {name} has no MatMul with a constant weight for {config.bits}-bit quantization")
    fmt = QuantFormat.QDQ if config.format == "QDQ" else QuantFormat.QOperator
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=config.bits, block_size=config.block,
                                         is_symmetric=config.symmetric, quant_format=fmt,
                                         accuracy_level=config.accuracy_level,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    except Exception as exc:
        raise DyVTEError(f"onnxruntime's quantizer could not take graph {name} at int{config.bits}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    out = quantizer.model.model
    left = _constant_matmuls(out)
    if left:
        raise DyVTEError(f"onnxruntime's quantizer left {left} of {expected} weight MatMuls of graph {name} "
                         f"unquantized at int{config.bits} (block {config.block})")
    return out


def load_weights(model: onnx.ModelProto, folder: Path) -> None:
    """Read the external data of `model` (written to a staging file in `folder`) into memory."""
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(folder))


def manifest_record(config: QuantConfig, graphs: list[str], onnxruntime_version: str) -> Quantization:
    return Quantization(bits=config.bits, block_size=config.block, symmetric=config.symmetric,
                        format=config.format, graphs=tuple(graphs), quantizer=QUANTIZER,
                        quantizer_version=onnxruntime_version, tensorrt=config.tensorrt,
                        accuracy_level=config.accuracy_level or 0)
