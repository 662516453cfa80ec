"""The fused decode graph: embedding, every decoder segment and the LM head chained into one graph.

Decoding is one token per step, so per-graph launches dominate it. Layers before and after the exit
differ only in their cache lengths, so one graph whose segments each take their own key mask
(`attention_mask.{i}`, with its own `past_seq.{i}` axis) serves every exit layer. It is composed from
the package's own graphs by renaming their values, so its initializers point at the very same
offsets of `weights.bin`: no weight is stored twice.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from engines.core.manifest import NAMES
from exporter.graphs import TensorSpec


def _rename_graph(graph: onnx.GraphProto, prefix: str, keep: dict[str, str]) -> None:
    """Prefix every value name except the interface ones, which `keep` maps to their new names."""

    def new(name: str) -> str:
        if not name:
            return name
        return keep.get(name, f"{prefix}{name}")

    for init in graph.initializer:
        init.name = new(init.name)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = new(value.name)
    for node in graph.node:
        node.name = f"{prefix}{node.name}"
        node.input[:] = [new(n) for n in node.input]
        node.output[:] = [new(n) for n in node.output]


def _set_axes(value: onnx.ValueInfoProto, names: dict[str, str]) -> None:
    for dim in value.type.tensor_type.shape.dim:
        if dim.dim_param in names:
            dim.dim_param = names[dim.dim_param]


def _initializer_key(tensor: onnx.TensorProto) -> tuple:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        data = ("external", info["location"], info.get("offset", "0"), info["length"])
    else:
        data = ("inline", tensor.raw_data, tuple(tensor.float_data), tuple(tensor.int64_data), tuple(tensor.int32_data))
    return (tensor.data_type, tuple(tensor.dims), data)


def _share_initializers(graph: onnx.GraphProto) -> None:
    """One initializer per stored value: the segments' copies of equal tensors (the rotary
    frequencies, norms stored once, small shape constants) become one name, so ONNX Runtime's
    common-subexpression elimination computes what every segment derives from them (rotary
    cos/sin from the shared position ids) once per step instead of once per segment."""
    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    kept = []
    for tensor in graph.initializer:
        key = _initializer_key(tensor)
        if key in first:
            rename[tensor.name] = first[key]
        else:
            first[key] = tensor.name
            kept.append(tensor)
    if not rename:
        return
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
    names = {t.name for t in kept}
    kept_info = [v for v in graph.value_info if v.name not in rename]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)
    assert not (set(rename) & names)


def compose_decode_graph(folder: Path, manifest_graphs) -> tuple[onnx.ModelProto, list, list]:
    """The decode graph of the package's `graphs/` folder (manifest `GraphEntry`s), and its
    input/output specs."""
    by_role = {}
    for g in manifest_graphs:
        by_role.setdefault(g.role, []).append(g)
    load = lambda g: onnx.load(str(folder / Path(g.file).name), load_external_data=False)  # noqa: E731
    embed, head = load(by_role["embed"][0]), load(by_role["lm_head"][0])
    segments = sorted(by_role["decoder"], key=lambda g: g.layers)
    n = NAMES
    merged = onnx.helper.make_graph([], "decode", [], [])
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []

    _rename_graph(embed.graph, "embed/", {n.input_ids: n.input_ids, n.inputs_embeds: "hidden.0"})
    inputs += list(embed.graph.input)
    parts = [embed.graph]
    for i, g in enumerate(segments):
        proto = load(g)
        keep = {n.hidden_in: f"hidden.{i}", n.hidden_out: f"hidden.{i + 1}",
                n.position_ids: n.position_ids, n.attention_mask: n.mask(i)}
        for layer in range(*g.layers):
            for name in (*n.past(layer), *n.new(layer)):
                keep[name] = name
        _rename_graph(proto.graph, f"{g.name}/", keep)
        axes = {"past_seq": f"past_seq.{i}", "total_seq": f"total_seq.{i}"}
        for value in list(proto.graph.input) + list(proto.graph.output):
            _set_axes(value, axes)
        inputs += [v for v in proto.graph.input if v.name not in {f"hidden.{i}"} and
                   not (i > 0 and v.name == n.position_ids)]
        outputs += [v for v in proto.graph.output if v.name != f"hidden.{i + 1}"]
        parts.append(proto.graph)
    _rename_graph(head.graph, "lm_head/", {n.hidden_in: f"hidden.{len(segments)}", n.logits: n.logits})
    parts.append(head.graph)
    outputs = list(head.graph.output) + outputs
    for part in parts:
        merged.node.extend(part.node)
        merged.initializer.extend(part.initializer)
        merged.value_info.extend(part.value_info)
    _share_initializers(merged)
    merged.input.extend(inputs)
    merged.output.extend(outputs)
    opsets: dict[str, int] = {}  # quantized segments may use a newer opset / the com.microsoft domain
    irs = [embed.ir_version]
    for proto in [embed, head] + [load(g) for g in segments[:1]]:
        irs.append(proto.ir_version)
        for imp in proto.opset_import:
            opsets[imp.domain] = max(opsets.get(imp.domain, 0), imp.version)
    model = onnx.helper.make_model(merged, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
                                   producer_name="dyvte-export")
    model.ir_version = max(irs)

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        t = value.type.tensor_type
        dtype = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT16: "float",
                 onnx.TensorProto.FLOAT: "float"}[t.elem_type]
        return TensorSpec(value.name, dtype, tuple(d.dim_param or d.dim_value for d in t.shape.dim))

    return model, [spec(v) for v in inputs], [spec(v) for v in outputs]
