"""ONNX-side checks that a graph will get through TensorRT's ONNX parser (no GPU needed).

The operator allowlist is onnx-tensorrt's support matrix for TensorRT 10 (docs/operators.md,
opsets 9-20). Beyond operators, the parser rejects custom-domain nodes and string tensors, and
only casts DOUBLE down with clamping, so those are reported too.
"""

from __future__ import annotations

import onnx

TRT_MAX_OPSET = 20
# Blocked DequantizeLinear (the int4 packages' weights) is opset 21; onnx-tensorrt's matrix of
# TensorRT 10.15 reads opsets 9-24, with INT4/INT8 DequantizeLinear whose zero point is zero.
QDQ_MAX_OPSET = 21
_QUANT_TYPES = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.INT8: "int8"}
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def _nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def _dequantize_problems(model: onnx.ModelProto) -> list[str]:
    """TensorRT's DequantizeLinear: INT8/INT4 input, and a zero point (if any) that is zero."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    problems = []
    for node in _nodes(model.graph):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        x = inits.get(node.input[0])
        if x is not None and x.data_type not in _QUANT_TYPES:
            problems.append(f"node {node.name or node.op_type}: DequantizeLinear of "
                            f"{onnx.TensorProto.DataType.Name(x.data_type)} (TensorRT takes INT8/INT4)")
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zp is not None and zp.data_location != onnx.TensorProto.EXTERNAL and numpy_helper.to_array(zp).any():
            problems.append(f"node {node.name or node.op_type}: DequantizeLinear zero point is not zero")
    return problems


def lint_for_tensorrt(model: onnx.ModelProto, max_opset: int | None = None) -> list[str]:
    """Problems TensorRT's ONNX parser would have with `model`; empty when it should parse.
    `max_opset` raises the opset limit (QDQ_MAX_OPSET for blocked-quantized graphs)."""
    limit = max_opset or TRT_MAX_OPSET
    problems = _dequantize_problems(model)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > limit:
            problems.append(f"opset {imp.version} is above TensorRT's {limit}")
    for node in _nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name or node.op_type}: custom domain {node.domain!r}")
        elif node.op_type not in TRT_SUPPORTED_OPS:
            problems.append(f"node {node.name or node.op_type}: operator {node.op_type} is not supported")
    bad_types = {onnx.TensorProto.STRING: "string", onnx.TensorProto.DOUBLE: "double"}
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        elem = value.type.tensor_type.elem_type
        if elem in bad_types:
            problems.append(f"tensor {value.name}: {bad_types[elem]} type")
    for init in model.graph.initializer:
        if init.data_type in bad_types:
            problems.append(f"initializer {init.name}: {bad_types[init.data_type]} type")
    return sorted(set(problems))
