"""The graphs of a package, as modules to trace plus their input/output contract.

Each `GraphSpec` says what one ONNX graph computes (a small wrapper module over the
`MultimodalModel` decomposition), its named inputs/outputs with symbolic axes (the contract the
manifest publishes and the runtime binds), and example inputs to trace with. Names follow
DyVTE's terms; per-layer tensors carry the global layer index (`past.12.key`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from engines.core.dyvte import router_features
from engines.core.manifest import NAMES
from exporter.dyvte.router import Routers
from exporter.models.base import MultimodalModel
from exporter.models.decoder import run_layers

# Example sizes for tracing: all distinct (and > 1) so that no axis is specialised to a constant.
EX_BATCH, EX_SEQ, EX_PAST, EX_TILES = 2, 5, 3, 2


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float" (the package precision), "float32" or "int64"
    shape: tuple  # ints and symbolic axis names

    def to_dict(self, float_dtype: str) -> dict:
        dtype = float_dtype if self.dtype == "float" else self.dtype
        return {"name": self.name, "dtype": dtype, "shape": list(self.shape)}


@dataclass
class GraphSpec:
    name: str  # file stem, e.g. "decoder.00-03"
    role: str  # vision | embed | decoder | hypernet | lm_head
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example: Callable[[torch.dtype], tuple]
    layers: tuple[int, int] | None = None
    nested: list[int] = field(default_factory=list)  # inputs passed as one tuple (the past caches)
    optimize: bool = True  # False keeps weights as the module holds them (shared tensors dedupe)

    def dynamic_shapes(self):
        auto = torch.export.Dim.AUTO
        dims = [{i: auto for i, d in enumerate(t.shape) if isinstance(d, str)} for t in self.inputs]
        if not self.nested:
            return tuple(dims)
        flat = [d for i, d in enumerate(dims) if i not in self.nested]
        return (*flat, tuple(dims[i] for i in self.nested))


class VisionGraph(nn.Module):
    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values):
        return self.vision(pixel_values)


class EmbedGraph(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, input_ids):
        return self.embed(input_ids)


class SegmentGraph(nn.Module):
    """Consecutive decoder layers: the same graph runs before the exit and after it."""

    def __init__(self, layers, rotary: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary

    def forward(self, hidden_states, position_ids, attention_mask, past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(self.layers))]
        hidden, presents = run_layers(self.layers, self.rotary, hidden_states, position_ids, attention_mask, pairs)
        return (hidden, *[t for kv in presents for t in kv])


class HypernetGraph(nn.Module):
    """All routers in one graph: `layer` picks router l's weights from stacked tensors. The stacks
    are made here, as the graph's own parameters, so the graph stores each one as a single
    initializer: stacked inside the graph (Unsqueeze + Concat of every router's weights), large
    routers escape the exporter's constant-folding size limit and ONNX Runtime folds them at load
    into a private copy (measured 416 MiB at the bench shape). Costs one copy of the routers while
    the package is exported; meta (streamed) routers keep the in-graph stack."""

    def __init__(self, routers: Routers):
        super().__init__()
        self.routers = routers
        self.w1 = self.w2 = None
        layers = routers.layers
        if not any(r.w1.weight.is_meta or r.w2.weight.is_meta for r in layers):
            with torch.no_grad():
                self.w1 = nn.Parameter(torch.stack([r.w1.weight for r in layers]), requires_grad=False)
                self.w2 = nn.Parameter(torch.stack([r.w2.weight for r in layers]), requires_grad=False)

    def forward(self, hidden_states, text_weights, layer):
        features = router_features(hidden_states, text_weights)
        w1 = self.w1 if self.w1 is not None else torch.stack([r.w1.weight for r in self.routers.layers])
        w2 = self.w2 if self.w2 is not None else torch.stack([r.w2.weight for r in self.routers.layers])
        w1 = torch.index_select(w1, 0, layer)[0]
        w2 = torch.index_select(w2, 0, layer)[0]
        return nn.functional.gelu(features @ w1.T) @ w2.T


class HeadGraph(nn.Module):
    """Final norm + LM head (holding only those two modules, so exporting it touches no layer)."""

    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.norm, self.lm_head = model.decoder.norm, model.decoder.lm_head

    def forward(self, hidden_states):
        return self.lm_head(self.norm(hidden_states))


def segment_name(start: int, end: int) -> str:
    return f"decoder.{start:02d}-{end - 1:02d}"


def segment_spec(shape, graph: SegmentGraph, start: int) -> GraphSpec:
    """The contract of a decoder segment graph holding layers start .. start + len(graph.layers) - 1."""
    n = len(graph.layers)
    end = start + n
    hid, kv = shape.hidden_size, (shape.num_kv_heads, shape.head_dim)
    past = [TensorSpec(name, "float", ("batch", kv[0], "past_seq", kv[1]))
            for layer in range(start, end) for name in NAMES.past(layer)]
    new_kv = [TensorSpec(name, "float", ("batch", kv[0], "seq", kv[1]))
              for layer in range(start, end) for name in NAMES.new(layer)]

    def example(dt):
        return (
            torch.randn(EX_BATCH, EX_SEQ, hid, dtype=dt),
            torch.arange(EX_PAST, EX_PAST + EX_SEQ).repeat(EX_BATCH, 1),
            torch.ones(EX_BATCH, EX_PAST + EX_SEQ, dtype=torch.long),
            tuple(torch.randn(EX_BATCH, kv[0], EX_PAST, kv[1], dtype=dt) for _ in range(2 * n)),
        )

    return GraphSpec(
        segment_name(start, end), "decoder", graph,
        [TensorSpec(NAMES.hidden_in, "float", ("batch", "seq", hid)),
         TensorSpec(NAMES.position_ids, "int64", ("batch", "seq")),
         TensorSpec(NAMES.attention_mask, "int64", ("batch", "total_seq")), *past],
        [TensorSpec(NAMES.hidden_out, "float", ("batch", "seq", hid)), *new_kv],
        example, layers=(start, end), nested=list(range(3, 3 + 2 * n)),
    )


def hypernet_spec(routers: Routers) -> GraphSpec:
    hid = routers.hidden_size
    return GraphSpec(
        "hypernet", "hypernet", HypernetGraph(routers),
        [TensorSpec(NAMES.hidden_in, "float", ("batch", "seq", hid)),
         TensorSpec(NAMES.text_weights, "float", ("batch", "seq")),
         TensorSpec(NAMES.router_layer, "int64", (1,))],
        [TensorSpec(NAMES.router_logits, "float", ("batch", 2))],
        lambda dt: (torch.randn(EX_BATCH, EX_SEQ, hid, dtype=dt),
                    torch.full((EX_BATCH, EX_SEQ), 1.0 / EX_SEQ, dtype=dt), torch.tensor([1])),
    )


def graph_specs(model: MultimodalModel, segments: list[tuple[int, int]], image_shape: tuple[int, int, int]):
    """The package's graphs in export order (vision, embedding, segments, hypernet, head)."""
    s = model.shape
    hid = s.hidden_size
    specs = []
    visual_tokens = "visual_tokens"
    specs.append(GraphSpec(
        "vision", "vision", VisionGraph(model.vision),
        [TensorSpec(NAMES.pixel_values, "float", ("tiles", *image_shape))],
        [TensorSpec(NAMES.visual_embeds, "float", ("tiles", visual_tokens, hid))],
        lambda dt: (torch.randn(EX_TILES, *image_shape, dtype=dt),),
    ))
    specs.append(GraphSpec(
        "embed", "embed", EmbedGraph(model.decoder.embed_tokens),
        [TensorSpec(NAMES.input_ids, "int64", ("batch", "seq"))],
        [TensorSpec(NAMES.inputs_embeds, "float", ("batch", "seq", hid))],
        lambda dt: (torch.randint(0, s.vocab_size, (EX_BATCH, EX_SEQ)),),
    ))
    for start, end in segments:
        graph = SegmentGraph(model.decoder.layers[start:end], model.decoder.rotary_emb)
        specs.append(segment_spec(s, graph, start))
    if model.routers is not None:
        specs.append(hypernet_spec(model.routers))
    # A head tied to the embedding must keep the weight untransposed on disk, so that the weights
    # file holds it once; constant folding would store a transposed copy.
    head, table = model.decoder.lm_head.weight, model.decoder.embed_tokens.weight
    # (meta tensors of a streamed model all have data_ptr 0: identity decides for them)
    tied = head is table or (not head.is_meta and head.data_ptr() == table.data_ptr())
    specs.append(GraphSpec(
        "lm_head", "lm_head", HeadGraph(model),
        [TensorSpec(NAMES.hidden_in, "float", ("batch", "seq", hid))],
        [TensorSpec(NAMES.logits, "float", ("batch", "seq", s.vocab_size))],
        lambda dt: (torch.randn(EX_BATCH, EX_SEQ, hid, dtype=dt),), optimize=not tied,
    ))
    return specs


class MonolithicGraph(nn.Module):
    """Every decoder layer, the final norm and the LM head (last position) in one graph, returning
    each layer's full cache (`present` = past + new): the shape of a conventional decoder-with-past
    export such as optimum-onnx's, used as the benchmark's baseline."""

    def __init__(self, model: MultimodalModel):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, inputs_embeds, position_ids, attention_mask, past):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(self.decoder.layers))]
        hidden, new = run_layers(self.decoder.layers, self.decoder.rotary_emb, inputs_embeds, position_ids,
                                 attention_mask, pairs)
        presents = [torch.cat([p, n], dim=2) for (pk, pv), (nk, nv) in zip(pairs, new) for p, n in ((pk, nk), (pv, nv))]
        return (self.decoder.logits(hidden[:, -1:, :]), *presents)


def monolithic_spec(model: MultimodalModel) -> GraphSpec:
    s = model.shape
    spec = segment_spec(s, SegmentGraph(model.decoder.layers, model.decoder.rotary_emb), 0)
    spec.name, spec.role, spec.module = "monolithic", "monolithic", MonolithicGraph(model)
    spec.inputs[0] = TensorSpec(NAMES.inputs_embeds, "float", ("batch", "seq", s.hidden_size))
    spec.outputs[0] = TensorSpec(NAMES.logits, "float", ("batch", 1, s.vocab_size))
    kv = (s.num_kv_heads, s.head_dim)
    spec.outputs[1:] = [TensorSpec(f"present.{layer}.{t}", "float", ("batch", kv[0], "total_seq", kv[1]))
                        for layer in range(s.num_layers) for t in ("key", "value")]
    return spec
