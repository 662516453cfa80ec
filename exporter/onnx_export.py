"""Tracing the package's graphs to ONNX with torch.onnx (the dynamo exporter).

Decoder layers of a model all have one structure, so a segment of n layers is traced once, from a
copy whose weights are random and unique (the *template*), and every segment of n layers is that
graph with its own layers' weights put in. Which template initializer holds which weight (as is,
or transposed by the exporter's constant folding) is found by comparing values. This keeps export
time and memory flat in depth; a template that cannot be mapped falls back to tracing the segment.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from engines.core.manifest import NAMES
from exporter.graphs import GraphSpec, SegmentGraph, segment_spec
from engines.core.errors import DyVTEError

OPSET = 18
INLINE_LIMIT = 1024  # initializers smaller than this stay inside the .onnx file
ALIGN = 4096  # external data offsets aligned to pages, so runtimes can map them


def _quiet_exporter() -> None:
    # torch.onnx logs one warning per missing torchvision op at every export; not our concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def trace_program(spec: GraphSpec, dtype: torch.dtype):
    """One graph through torch.export + the ONNX translator (an `ONNXProgram`, weights by reference)."""
    _quiet_exporter()
    args = spec.example(dtype)
    names_in = [t.name for t in spec.inputs]
    names_out = [t.name for t in spec.outputs]
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(
                spec.module.eval(), args, dynamo=True, opset_version=OPSET, optimize=spec.optimize,
                input_names=names_in, output_names=names_out, dynamic_shapes=spec.dynamic_shapes(),
                verbose=False, external_data=False,
            )
        except Exception as exc:
            raise DyVTEError(f"torch.onnx could not export graph {spec.name}: {str(exc).splitlines()[0]}") from exc


def trace(spec: GraphSpec, dtype: torch.dtype) -> onnx.ModelProto:
    """A graph as an in-memory proto, weights included (templates: small by construction)."""
    model = trace_program(spec, dtype).model_proto
    name_axes(model, spec)
    return model


def export_graph(spec: GraphSpec, dtype: torch.dtype, store: "WeightStore") -> onnx.ModelProto:
    """A graph whose weights go straight from the traced program into the package's weights file,
    one tensor at a time: no whole-graph copy of the weights is ever held in memory."""
    import onnx_ir as ir

    program = trace_program(spec, dtype)
    for name, value in program.model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < INLINE_LIMIT:
            continue
        offset = store.add(tensor.tobytes())
        value.const_value = ir.ExternalTensor(store.path.name, offset, tensor.nbytes, tensor.dtype,
                                              shape=tensor.shape, name=name, base_dir=str(store.path.parent))
    model = ir.serde.serialize_model(program.model)
    del program
    name_axes(model, spec)
    return model


def name_axes(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Replace the exporter's symbols (s12, s3 + s7) by the contract's axis names."""
    for values, specs in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        by_name = {t.name: t for t in specs}
        for value in values:
            if value.name not in by_name:
                continue
            dims = value.type.tensor_type.shape.dim
            for dim, want in zip(dims, by_name[value.name].shape):
                if isinstance(want, str):
                    dim.Clear()
                    dim.dim_param = want


# ---------------------------------------------------------------- segment templates


def _randomised_copy(layers, rotary, dtype) -> SegmentGraph:
    generator = torch.Generator().manual_seed(1234)
    graph = SegmentGraph([copy.deepcopy(layer) for layer in layers], rotary)
    if any(p.is_meta for p in graph.layers.parameters()):  # layers not loaded yet (streamed export)
        graph.layers.to_empty(device="cpu")
    with torch.no_grad():
        for p in graph.layers.parameters():
            p.copy_((torch.rand(p.shape, generator=generator) + 0.5).to(p.dtype))
    return graph.to(dtype).eval()


def _map_initializers(model: onnx.ModelProto, template: SegmentGraph) -> dict[str, tuple[str, bool]] | None:
    """template initializer -> (parameter name inside the segment, transposed?) by value."""
    params = {name: p.detach().cpu().numpy() for name, p in template.layers.named_parameters()}
    by_size: dict[int, list[str]] = {}
    for name, arr in params.items():
        by_size.setdefault(arr.size, []).append(name)
    mapping, used = {}, set()
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        for name in by_size.get(arr.size, []):
            ref = params[name]
            if arr.shape == ref.shape and np.array_equal(arr, ref):
                mapping[init.name] = (name, False)
            elif ref.ndim == 2 and arr.shape == ref.T.shape and np.array_equal(arr, ref.T):
                mapping[init.name] = (name, True)
            else:
                continue
            used.add(name)
            break
    return mapping if used == set(params) else None


class SegmentTemplates:
    """Traces one template per segment length and instantiates segments from it."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.cache: dict[int, tuple[onnx.ModelProto, dict] | None] = {}

    def build(self, spec: GraphSpec, shape, store: "WeightStore") -> onnx.ModelProto:
        n = spec.layers[1] - spec.layers[0]
        if n not in self.cache:
            template_spec = template_spec_for(spec, shape, self.dtype)
            model = trace(template_spec, self.dtype)
            mapping = _map_initializers(model, template_spec.module)
            if mapping is None:
                self.cache[n] = None
            else:
                keep = [i for i in model.graph.initializer if i.name not in mapping]
                del model.graph.initializer[:]
                model.graph.initializer.extend(keep)
                self.cache[n] = (model, mapping)
        if self.cache[n] is None:
            return export_graph(spec, self.dtype, store)
        template, mapping = self.cache[n]
        return _instantiate(template, mapping, spec, self.dtype, store)


def _instantiate(template: onnx.ModelProto, mapping: dict, spec: GraphSpec, dtype: torch.dtype,
                 store: "WeightStore") -> onnx.ModelProto:
    start = spec.layers[0]
    model = onnx.ModelProto()
    model.CopyFrom(template)
    rename = {}
    for local in range(spec.layers[1] - start):
        for old, new in zip((*NAMES.past(local), *NAMES.new(local)),
                            (*NAMES.past(start + local), *NAMES.new(start + local))):
            rename[old] = new
    layers = spec.module.layers
    for init_name, (param_name, transposed) in mapping.items():
        local, rest = param_name.split(".", 1)
        arr = layers[int(local)].get_parameter(rest).detach().to(dtype).cpu().numpy()
        arr = np.ascontiguousarray(arr.T if transposed else arr)
        new_name = f"layers.{start + int(local)}.{rest}" + (".T" if transposed else "")
        rename[init_name] = new_name
        model.graph.initializer.append(store.tensor_proto(new_name, arr))
    _rename_values(model.graph, rename)
    return model


def _rename_values(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = rename.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]


def template_spec_for(spec: GraphSpec, shape, dtype: torch.dtype) -> GraphSpec:
    """The same segment contract for layers 0..n-1 of a randomised copy."""
    return segment_spec(shape, _randomised_copy(spec.module.layers, spec.module.rotary, dtype), 0)


# ---------------------------------------------------------------- weights on disk


class WeightStore:
    """One external-data file shared by every graph of the package; equal tensors stored once
    (tied embeddings / LM head), offsets page-aligned."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.handle = open(self.path, "wb")
        self.offset = 0
        self.index: dict[tuple[str, int], int] = {}
        self.unique_bytes = 0

    def add(self, data: bytes) -> int:
        """Offset of `data` in the file, appending it unless an equal tensor is already there."""
        key = (hashlib.sha256(data).hexdigest(), len(data))
        if key not in self.index:
            pad = (-self.offset) % ALIGN
            self.handle.write(b"\0" * pad)
            self.offset += pad
            self.index[key] = self.offset
            self.handle.write(data)
            self.offset += len(data)
            self.unique_bytes += len(data)
        return self.index[key]

    def _point(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = k, v

    def tensor_proto(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """An initializer for `array`, stored in this file (small ones stay inline)."""
        if array.nbytes < INLINE_LIMIT:
            return numpy_helper.from_array(array, name)
        tensor = onnx.TensorProto(name=name, dims=list(array.shape),
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        self._point(tensor, self.add(array.tobytes()), array.nbytes)
        return tensor

    def externalize(self, model: onnx.ModelProto) -> None:
        """Move the large initializers still inside `model` into this file."""
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                continue
            if not tensor.HasField("raw_data"):
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
            if len(tensor.raw_data) < INLINE_LIMIT:
                continue
            length = len(tensor.raw_data)
            offset = self.add(tensor.raw_data)
            tensor.ClearField("raw_data")
            self._point(tensor, offset, length)

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


def _strip_debug_metadata(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node debug metadata (fx node, stack trace with local paths): it is
    most of a graph file's size and says nothing a runtime needs."""
    for node in graph.node:
        del node.metadata_props[:]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_debug_metadata(attr.g)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
        del value.metadata_props[:]


def save_graph(model: onnx.ModelProto, path: Path, store: WeightStore) -> None:
    _strip_debug_metadata(model.graph)
    store.externalize(model)
    model.producer_name = "dyvte-export"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def check_graph(path: Path, quant=None) -> list[str]:
    """onnx.checker + shape inference (path-based, so external data of any size works) and the
    TensorRT parser lint; returns the lint's findings. A quantized graph (`quant`, an
    `exporter.quantize.QuantConfig`) is linted in its QDQ form; the ONNX Runtime-only MatMulNBits
    form is not TensorRT's to parse (the manifest says so) and is not linted."""
    from exporter.trt_lint import QDQ_MAX_OPSET, lint_for_tensorrt

    try:
        onnx.checker.check_model(str(path), full_check=False)
        inferred = Path(str(path) + ".inferred")
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=False)
        inferred.unlink()
    except Exception as exc:
        raise DyVTEError(f"exported graph {path.name} fails the ONNX checker: {str(exc).splitlines()[0]}") from exc
    if quant is not None and not quant.tensorrt:
        return []
    max_opset = QDQ_MAX_OPSET if quant is not None else None
    return lint_for_tensorrt(onnx.load(str(path), load_external_data=False), max_opset=max_opset)
