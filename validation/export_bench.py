"""`python -m validation export-bench`: export a LLaVA-1.5-7B-shaped model and report peak memory.

The model is built on the meta device (no memory), its vision tower and rotary tables made real,
and every other weight is created only while the graph that holds it is exported, then dropped:
the export streams graph by graph, as it would from a checkpoint too big to hold twice. Weights
are random but deterministic per parameter name, so `materialize_all` can rebuild the very same
model as a PyTorch reference on a machine with the memory for it.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import nn

SHAPES = {"llava-7b": ("llava", "llava-1.5-7b"), "tiny": ("llava", "tiny")}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def add_arguments(parser) -> None:
    parser.add_argument("--shape", default="llava-7b", choices=sorted(SHAPES))
    parser.add_argument("--output", default="exports/llava-7b-random", help="package directory")
    parser.add_argument("--precision", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--exit-window", help="START:END (default: every layer)")
    parser.add_argument("--json", help="also write the figures to this file")


def _init_tensor(name: str, shape, dtype, seed: int) -> torch.Tensor:
    """Deterministic values for parameter `name`: norms 1, biases 0, other weights N(0, 0.02)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and leaf == "weight":
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) ^ seed)
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def tag_parameters(model: nn.Module) -> None:
    """Remember each parameter's name in the full model (graphs see them under other names)."""
    for name, p in model.named_parameters():
        p._dyvte_name = name


def random_weights(seed: int = 0):
    """A `materialize` hook for `export_onnx`: real tensors while a graph exports, meta after."""
    from exporter.streaming import materializer

    return materializer(lambda name, p: _init_tensor(getattr(p, "_dyvte_name", name), p.shape, p.dtype, seed))


def materialize_all(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every meta parameter made real with the same values the streamed export used."""
    from exporter.streaming import swap_parameter

    for name, p in list(model.named_parameters()):
        if p.is_meta:
            swap_parameter(model, name, _init_tensor(getattr(p, "_dyvte_name", name), p.shape, p.dtype, seed), p)
    return model


def skeleton(shape: str = "llava-7b", precision: str = "fp16", seed: int = 0):
    """The model with all decoder/embedding/head/router weights on the meta device."""
    from exporter.dyvte.router import Routers
    from exporter.models import get_family

    family, preset = SHAPES[shape]
    dtype = DTYPES[precision]
    with torch.device("meta"):
        model = get_family(family).preset(seed=seed, name=preset)
        s = model.shape
        model.routers = Routers(s.num_layers, s.hidden_size)
    model.to(dtype)
    tag_parameters(model)
    # Small or buffer-holding parts are made real now: the vision tower (its position ids are a
    # buffer) and the rotary tables.
    materialize_all(model.vision, seed)
    for name, buffer in model.vision.named_buffers():
        if name.endswith("position_ids"):
            owner_name, _, leaf = name.rpartition(".")
            owner = model.vision.get_submodule(owner_name)
            owner.register_buffer(leaf, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    rotary = model.decoder.rotary_emb
    real_rotary = type(rotary)(rotary.config)
    model.decoder.rotary_emb = real_rotary
    return model


def export_random(shape: str = "llava-7b", output: str | Path = "exports/llava-7b-random",
                  precision: str = "fp16", exit_window: str | None = None, seed: int = 0) -> Path:
    """Export the random model of `shape` streaming its weights; returns the package path."""
    from exporter.package import export_onnx
    from exporter.plan import SplitPlan

    model = skeleton(shape, precision, seed)
    plan = SplitPlan.parse(exit_window, model.shape.num_layers)
    source = {"family": SHAPES[shape][0], "random_shape": shape, "seed": seed}
    return export_onnx(model, output, precision, plan, materialize=random_weights(seed), source=source)


def run(args) -> int:
    from engines.core.manifest import Manifest

    start = time.perf_counter()
    package = export_random(args.shape, args.output, args.precision, args.exit_window)
    manifest = Manifest.load(package, verify=False)
    size = manifest.package_bytes
    figures = {
        "shape": args.shape,
        "precision": args.precision,
        "package": str(package),
        "peak_rss_gib": manifest.export.peak_rss_mb / 1024,
        "export_seconds": manifest.export.seconds,
        "wall_seconds": time.perf_counter() - start,
        "package_gib": size / 2**30,
        "weights_gib": manifest.weights.parameter_bytes / 2**30,
    }
    print(f"exported {args.shape} ({args.precision}) to {package}\n"
          f"  peak RSS {figures['peak_rss_gib']:.2f} GiB, export {figures['export_seconds']:.0f} s, "
          f"package {figures['package_gib']:.2f} GiB for {figures['weights_gib']:.2f} GiB of weights "
          f"({figures['package_gib'] / figures['weights_gib']:.3f}x)", file=sys.stdout)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0
