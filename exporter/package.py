"""The export package: graphs + one shared weights file + processor files + `manifest.json`.

The manifest is the single contract between exporter and runtime: what each graph computes, its
inputs/outputs and axes, the split plan, prompt building, versions, and a sha256 per file. A
package is written into a hidden temporary directory and renamed into place only when complete,
so an interrupted export never leaves something that loads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ContextManager

import torch
from PIL import Image
from tqdm import tqdm

from exporter import __version__
from exporter.errors import DyVTEError
from exporter.graphs import graph_specs
from exporter.models.base import MultimodalModel
from exporter.onnx_export import OPSET, SegmentTemplates, WeightStore, check_graph, export_graph, save_graph
from exporter.plan import SplitPlan

FORMAT = "dyvte-package"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ONNX_DTYPES = {"fp32": "float32", "fp16": "float16"}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_bytes(model: MultimodalModel, precision: str) -> int:
    """Bytes of the model's unique parameters at `precision` (the size a package should match)."""
    seen, total = set(), 0
    size = torch.tensor([], dtype=DTYPES[precision]).element_size()
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
    extra_manifest: dict | None = None,
    materialize: Callable[[torch.nn.Module], ContextManager] | None = None,
) -> Path:
    """Write the package for `model` to `output` (atomically) and return its path.

    `materialize(module)` is entered around each graph's export: a model whose weights are not
    in memory yet (meta tensors) loads them there and drops them on exit, so peak memory stays
    near the largest graph rather than the whole model."""
    if precision not in DTYPES:
        raise DyVTEError(f"unknown precision {precision!r}; choose fp32 or fp16")
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise DyVTEError(f"{output} exists; pass --overwrite to replace it")
    plan = plan or SplitPlan.full(model.shape.num_layers)
    dtype = DTYPES[precision]
    started = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "graphs").mkdir(parents=True)
    try:
        graphs = _export_graphs(model, tmp / "graphs", dtype, plan, progress, materialize or _in_memory)
        model.processor.save(tmp / "processor")
        manifest = _manifest(model, precision, plan, graphs, started)
        manifest.update(extra_manifest or {})
        _write_manifest(tmp, manifest)
        _replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


@contextmanager
def _in_memory(module):
    yield module


def _export_graphs(model, folder: Path, dtype, plan: SplitPlan, progress: bool, materialize) -> list[dict]:
    specs = graph_specs(model, plan.segments, _image_shape(model))
    store = WeightStore(folder / "weights.bin")
    templates = SegmentTemplates(dtype)
    entries = []
    float_name = "float16" if dtype == torch.float16 else "float32"
    bar = tqdm(specs, desc="export", unit="graph", disable=not progress, file=sys.stderr)
    for spec in bar:
        bar.set_description(f"export {spec.name}")
        t0 = time.perf_counter()
        path = folder / f"{spec.name}.onnx"
        with materialize(spec.module):
            if spec.role == "decoder":
                proto = templates.build(spec, model.shape, store)
            else:
                module = spec.module
                if next(module.parameters()).dtype != dtype:
                    spec.module = copy.deepcopy(module).to(dtype)
                proto = export_graph(spec, dtype, store)
                spec.module = module
            save_graph(proto, path, store)
            del proto
        lint = check_graph(path)
        if lint:
            raise DyVTEError(f"graph {spec.name} would not parse in TensorRT: {lint[0]} ({len(lint)} problems)")
        entries.append({
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "name": spec.name,
            "role": spec.role,
            "file": f"graphs/{spec.name}.onnx",
            "layers": list(spec.layers) if spec.layers else None,
            "inputs": [t.to_dict(float_name) for t in spec.inputs],
            "outputs": [t.to_dict(float_name) for t in spec.outputs],
            "seconds": round(time.perf_counter() - t0, 3),
        })
    store.close()
    bar.close()
    entries.append(_decode_entry(folder, entries, float_name))
    return entries


def _decode_entry(folder: Path, entries: list[dict], float_name: str) -> dict:
    """Compose the fused decode graph from the graphs just written (it adds no weights)."""
    from exporter.decode_graph import compose_decode_graph

    t0 = time.perf_counter()
    model, inputs, outputs = compose_decode_graph(folder, entries)
    path = folder / "decode.onnx"
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    lint = check_graph(path)
    if lint:
        raise DyVTEError(f"graph decode would not parse in TensorRT: {lint[0]} ({len(lint)} problems)")
    return {"name": "decode", "role": "decode", "file": "graphs/decode.onnx", "layers": None,
            "inputs": [t.to_dict(float_name) for t in inputs], "outputs": [t.to_dict(float_name) for t in outputs],
            "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def _manifest(model: MultimodalModel, precision: str, plan: SplitPlan, graphs: list[dict], started: float) -> dict:
    s = model.shape
    spec = model.processor.spec
    tok = model.processor.tokenizer
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": model.family,
        "source": model.source,
        "precision": precision,
        "architecture": {
            "num_layers": s.num_layers, "hidden_size": s.hidden_size, "num_heads": s.num_heads,
            "num_kv_heads": s.num_kv_heads, "head_dim": s.head_dim, "vocab_size": s.vocab_size,
            "max_positions": s.max_positions, "visual_tokens_per_tile": spec.tokens_per_tile,
            "intermediate_size": getattr(model.decoder.config, "intermediate_size", None),
            "image_shape": list(_image_shape(model)),
        },
        "split": {
            "exit_window": list(plan.window) if plan.window else None,
            "exit_boundaries": plan.boundaries,
            "segments": [list(x) for x in plan.segments],
            "has_routers": model.routers is not None,
        },
        "graphs": graphs,
        "weights": {"file": "graphs/weights.bin", "parameter_bytes": weights_bytes(model, precision)},
        "prompt": spec.to_dict(),
        "processor": {"tokenizer": "processor/tokenizer", "image_processor": "processor/image_processor"},
        "special_tokens": {
            "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
            "image_token_id": spec.image_token_id, "stop": spec.stop_token_ids,
        },
        "tensorrt": {"engines": [], "status": "not built (python -m engines build PACKAGE on a GPU machine)"},
        "versions": _versions(),
        "export": {
            "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def _write_manifest(folder: Path, manifest: dict) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        # reports are rewritten by every validation, so they are not part of the signed contents
        if path.is_file() and rel != "manifest.json" and not rel.startswith("report/"):
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = files
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _replace(tmp: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- loading


def load_manifest(package: str | Path, verify: bool = True) -> dict:
    """The package's manifest; with `verify`, every file's size and sha256 are checked."""
    package = Path(package)
    path = package / "manifest.json"
    if not package.is_dir():
        raise DyVTEError(f"package folder not found: {package}")
    if not path.is_file():
        raise DyVTEError(f"{package} is not an export package (no manifest.json; an interrupted export?)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise DyVTEError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise DyVTEError(f"{package} is not a DyVTE export package (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DyVTEError(
            f"{package} has package format {manifest.get('format_version')}, this tool reads {FORMAT_VERSION}; "
            "re-export it with this version"
        )
    if verify:
        for rel, info in manifest.get("files", {}).items():
            f = package / rel
            if not f.is_file():
                raise DyVTEError(f"package file missing: {rel}")
            if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
                raise DyVTEError(f"package file {rel} does not match its checksum (modified or damaged)")
    return manifest
