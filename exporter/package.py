"""The export package: graphs + one shared weights file + processor files + `manifest.json`.

The manifest is the single contract between exporter and runtime: what each graph computes, its
inputs/outputs and axes, the split plan, prompt building, versions, and a sha256 per file. A
package is written into a hidden temporary directory and renamed into place only when complete,
so an interrupted export never leaves something that loads.
"""

from __future__ import annotations

import copy
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager, Sequence

import torch
from PIL import Image
from tqdm import tqdm

from exporter import __version__
from engines.core.errors import DyVTEError, warn
from engines.core.manifest import Architecture, ExportInfo, GraphEntry, Manifest, Split, TensorInfo, Weights
from engines.core.precision import Precision, get_precision
from exporter.graphs import graph_specs
from exporter.models.base import MultimodalModel
from exporter.onnx_export import OPSET, SegmentTemplates, WeightStore, check_graph, export_graph, save_graph
from exporter.plan import SplitPlan
from exporter.quantize import QUANTIZED_ROLES, load_weights, quantize_model



def weights_bytes(model: MultimodalModel, precision: str | Precision) -> int:
    """Bytes of the model's unique parameters at `precision`'s float type (the size a float package
    should match)."""
    seen, total = set(), 0
    size = get_precision(precision).element_bytes
    for p in model.parameters():
        key = id(p) if p.is_meta else p.data_ptr()  # meta tensors (not loaded yet) share data_ptr 0
        if key not in seen:
            seen.add(key)
            total += p.numel() * size
    return total


def _versions() -> dict:
    import onnx
    import transformers

    out = {"dyvte_export": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "onnx": onnx.__version__, "opset": OPSET, "python": sys.version.split()[0]}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def _image_shape(model: MultimodalModel) -> tuple[int, int, int]:
    pixels = model.processor.transform(Image.new("RGB", (64, 48), (128, 128, 128)))
    return tuple(pixels.shape[1:])


def export_onnx(
    model: MultimodalModel,
    output: str | Path,
    precision: str = "fp32",
    plan: SplitPlan | None = None,
    progress: bool = True,
    overwrite: bool = True,
    source: dict | None = None,
    materialize: Callable[[torch.nn.Module], ContextManager] | None = None,
    force: bool = False,
    protect: Sequence[str | Path | None] = (),
    quant_block: int | None = None,
) -> Path:
    """Write the package for `model` to `output` (atomically) and return its path.

    `output` may be new, an empty folder or an earlier package; anything else is refused unless
    `force` (`exporter.output.check_output`); the model's checkpoint and the `protect`ed paths are
    never replaced. `materialize(module)` is entered around each graph's export: a model whose
    weights are not in memory yet (meta tensors) loads them there and drops them on exit, so peak
    memory stays near the largest graph rather than the whole model.

    int8 / int4 quantize the decoder segments' and the LM head's weight MatMuls with ONNX Runtime's
    quantizer (`exporter.quantize`), `quant_block` weights per scale (checked before any work)."""
    from exporter.output import (check_output, os_error, partial_name, remove_stale_partials,
                                 restore_interrupted_swap, swap_into_place)

    from exporter.quantize import check_config

    precision = get_precision(precision)
    quant = check_config(precision, quant_block, model.shape)
    protect = (*protect, (model.source or {}).get("checkpoint"))
    output = check_output(output, force, protect)
    if os.path.lexists(output) and not overwrite:
        raise DyVTEError(f"{output} exists; pass --overwrite to replace it")
    plan = plan or SplitPlan.full(model.shape.num_layers)
    _warn_non_finite(model)
    started = time.perf_counter()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        restore_interrupted_swap(output)
        remove_stale_partials(output)
        _check_free_space(output.parent, weights_bytes(model, precision))
        tmp = partial_name(output)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "graphs").mkdir(parents=True)
    except OSError as exc:
        raise os_error("write the package to", output, exc) from None
    try:
        graphs = _export_graphs(model, tmp / "graphs", precision, plan, progress, materialize or _in_memory, quant)
        model.processor.save(tmp / "processor")
        manifest = _manifest(model, precision, plan, graphs, started)
        if quant is not None:
            from exporter.quantize import QUANTIZED_ROLES, manifest_record

            names = [g.name for g in graphs if g.role in QUANTIZED_ROLES or g.role == "decode"]
            manifest.quantization = manifest_record(quant, names, manifest.versions.get("onnxruntime", ""))
        if source is not None:
            manifest.source = dict(source)
        manifest.save(tmp)
        swap_into_place(tmp, output, force, protect)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno is None:  # not the filesystem's refusal: an internal error
            raise
        raise os_error("write the package to", output, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _warn_non_finite(model: MultimodalModel) -> None:
    """Weights holding NaN or Inf export as they are (the parity report then fails on them): say so
    now, naming the first. Weights still on disk (streamed) are not read for this."""
    for name, p in model.named_parameters():
        if not p.is_meta and p.is_floating_point() and not bool(torch.isfinite(p).all()):
            warn(f"the model's weight {name} holds NaN or Inf; the package will compute NaN "
                 "(validation fails on it)")
            return


def _check_free_space(folder: Path, needed: int) -> None:
    """Refuse before exporting when the filesystem has less room than the weights need."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DyVTEError(f"not enough space in {folder}: the package needs about {needed / 2**20:.0f} MiB, "
                         f"{free / 2**20:.0f} MiB are free; free some space or choose another --output")


@contextmanager
def _in_memory(module):
    yield module


def _entry(spec, float_name: str, seconds: float, inputs=None, outputs=None) -> GraphEntry:
    def info(tensors):
        return tuple(TensorInfo(t.name, float_name if t.dtype == "float" else t.dtype, tuple(t.shape))
                     for t in tensors)

    return GraphEntry(
        name=spec.name, role=spec.role, file=f"graphs/{spec.name}.onnx",
        inputs=info(inputs if inputs is not None else spec.inputs),
        outputs=info(outputs if outputs is not None else spec.outputs),
        layers=tuple(spec.layers) if spec.layers else None, seconds=round(seconds, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def _export_graphs(model, folder: Path, precision: Precision, plan: SplitPlan, progress: bool,
                   materialize, quant=None) -> list[GraphEntry]:
    specs = graph_specs(model, plan.segments, _image_shape(model))
    store = WeightStore(folder / "weights.bin")
    dtype = precision.dtype
    templates = SegmentTemplates(dtype)
    entries = []
    bar = tqdm(specs, desc="export", unit="graph", disable=not progress, file=sys.stderr)
    for spec in bar:
        bar.set_description(f"export {spec.name}")
        t0 = time.perf_counter()
        path = folder / f"{spec.name}.onnx"
        quantized = quant is not None and spec.role in QUANTIZED_ROLES
        # a graph to quantize is built with its float weights in a staging file, then quantized in
        # memory; only the quantized tensors reach weights.bin
        target = WeightStore(folder.parent / "staging.bin") if quantized else store
        with materialize(spec.module):
            if spec.role == "decoder":
                proto = templates.build(spec, model.shape, target)
            else:
                module = spec.module
                if next(module.parameters()).dtype != dtype:
                    spec.module = copy.deepcopy(module).to(dtype)
                proto = export_graph(spec, dtype, target)
                spec.module = module
            if quantized:
                target.close()
                load_weights(proto, target.path.parent)
                target.path.unlink()
                proto = quantize_model(proto, quant, spec.name)
            save_graph(proto, path, store)
            del proto
        lint = check_graph(path, quant if quantized else None)
        if lint:
            raise DyVTEError(f"graph {spec.name} would not parse in TensorRT: {lint[0]} ({len(lint)} problems)")
        entries.append(_entry(spec, precision.float_name, time.perf_counter() - t0))
    store.close()
    bar.close()
    entries.append(_decode_entry(folder, entries, precision.float_name, quant))
    return entries


def _decode_entry(folder: Path, entries: list[GraphEntry], float_name: str, quant=None) -> GraphEntry:
    """Compose the fused decode graph from the graphs just written (it adds no weights)."""
    from exporter.decode_graph import compose_decode_graph
    from exporter.graphs import GraphSpec

    t0 = time.perf_counter()
    model, inputs, outputs = compose_decode_graph(folder, entries)
    path = folder / "decode.onnx"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    lint = check_graph(path, quant)
    if lint:
        raise DyVTEError(f"graph decode would not parse in TensorRT: {lint[0]} ({len(lint)} problems)")
    spec = GraphSpec("decode", "decode", None, inputs, outputs, None)
    return _entry(spec, float_name, time.perf_counter() - t0)


def _manifest(model: MultimodalModel, precision: Precision, plan: SplitPlan, graphs: list[GraphEntry],
              started: float) -> Manifest:
    spec = model.processor.spec
    tok = model.processor.tokenizer
    return Manifest(
        family=model.family, precision=precision,
        architecture=Architecture(model.shape, spec.tokens_per_tile, tuple(_image_shape(model))),
        split=Split(tuple(plan.window) if plan.window else None, tuple(plan.boundaries),
                    tuple(tuple(x) for x in plan.segments), model.routers is not None),
        graphs=tuple(graphs), prompt=spec.to_dict(),
        weights=Weights("graphs/weights.bin", weights_bytes(model, precision)),
        special_tokens={"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
                        "image_token_id": spec.image_token_id, "stop": spec.stop_token_ids},
        source=_source(model),
        versions=_versions(),
        export=ExportInfo(round(time.perf_counter() - started, 2),
                          round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
    )


def _source(model: MultimodalModel) -> dict:
    """The model's source record, plus the digest of its routers (checked when the reference is rebuilt)."""
    digest = model.routers.digest() if model.routers is not None else None
    return {**model.source, **({"routers_sha256": digest} if digest else {})}
