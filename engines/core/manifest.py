"""The package contract: `manifest.json`, typed, validated, versioned and checksummed, with one owner.

The exporter builds a `Manifest` and saves it; every runtime, the TensorRT builder and the parity
report load it through `Manifest.load`, which refuses, in one line naming the key, anything a
runtime would otherwise trip over later: wrong types, missing keys, graphs that do not match the
split or the architecture, paths that leave the package, special files, and edits made after the
export (the manifest carries the sha256 of its own canonical form, and of every file it lists).
Tensor names are patterns recorded in the manifest (`past.{layer}.key`), so the graphs' names are
spelled once, in `TensorNames`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

from engines.core.errors import DyVTEError
from engines.core.precision import PRECISIONS, Precision, get_precision
from engines.core.shape import ModelShape

FORMAT = "dyvte-package"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ROLES = ("vision", "embed", "decoder", "hypernet", "lm_head", "decode")
REPORT_DIR = "report"  # rewritten by every validation: not part of what the checksums cover


class ManifestError(DyVTEError):
    """A package whose manifest cannot be trusted (damaged, hand-edited, from another version)."""


# --------------------------------------------------------------------------- tensor names


@dataclass(frozen=True)
class TensorNames:
    """Every graph input/output name the runtime binds; per-layer ones are patterns over the
    global layer index (`{layer}`) or the decode graph's segment index (`{segment}`)."""

    pixel_values: str = "pixel_values"
    visual_embeds: str = "visual_embeds"
    input_ids: str = "input_ids"
    inputs_embeds: str = "inputs_embeds"
    hidden_in: str = "hidden_states"
    hidden_out: str = "hidden_states_out"
    position_ids: str = "position_ids"
    attention_mask: str = "attention_mask"
    past_key: str = "past.{layer}.key"
    past_value: str = "past.{layer}.value"
    new_key: str = "new.{layer}.key"  # the new tokens' keys/values only: the runtime owns the cache
    new_value: str = "new.{layer}.value"
    segment_mask: str = "attention_mask.{segment}"
    text_weights: str = "text_weights"
    router_layer: str = "layer"
    router_logits: str = "router_logits"
    logits: str = "logits"

    def past(self, layer: int) -> tuple[str, str]:
        return self.past_key.format(layer=layer), self.past_value.format(layer=layer)

    def new(self, layer: int) -> tuple[str, str]:
        return self.new_key.format(layer=layer), self.new_value.format(layer=layer)

    def mask(self, segment: int) -> str:
        return self.segment_mask.format(segment=segment)


NAMES = TensorNames()


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # float32 | float16 | int64
    shape: tuple  # ints and symbolic axis names

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphEntry:
    name: str
    role: str
    file: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    layers: tuple[int, int] | None = None  # decoder segments: [start, end)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def input(self, name: str) -> TensorInfo:
        return next(t for t in self.inputs if t.name == name)

    def to_dict(self) -> dict:
        return {"name": self.name, "role": self.role, "file": self.file,
                "layers": list(self.layers) if self.layers else None,
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs],
                "seconds": self.seconds, "peak_rss_mb": self.peak_rss_mb}


@dataclass(frozen=True)
class Architecture:
    shape: ModelShape
    visual_tokens_per_tile: int
    image_shape: tuple[int, int, int]  # one tile: channels, height, width

    def to_dict(self) -> dict:
        return {**self.shape.to_dict(), "visual_tokens_per_tile": self.visual_tokens_per_tile,
                "image_shape": list(self.image_shape)}


@dataclass(frozen=True)
class Split:
    exit_window: tuple[int, int] | None
    exit_boundaries: tuple[int, ...]  # layers after which the exit can be taken
    segments: tuple[tuple[int, int], ...]  # [start, end) per decoder graph, covering every layer
    has_routers: bool

    @property
    def router_layers(self) -> frozenset[int]:
        return frozenset(self.exit_boundaries) if self.has_routers else frozenset()

    def to_dict(self) -> dict:
        return {"exit_window": list(self.exit_window) if self.exit_window else None,
                "exit_boundaries": list(self.exit_boundaries), "segments": [list(s) for s in self.segments],
                "has_routers": self.has_routers}


@dataclass(frozen=True)
class Weights:
    file: str  # the external-data file every graph's initializers point into
    parameter_bytes: int  # the model's unique parameters at the package precision


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of an int8/int4 package (exporter/quantize.py)."""

    bits: int  # 8 or 4
    block_size: int  # weights per scale, along K
    symmetric: bool  # no zero points
    format: str  # "QDQ" (blocked DequantizeLinear -> MatMul, standard ONNX) or "MatMulNBits" (com.microsoft)
    graphs: tuple[str, ...]  # the graphs whose weight MatMuls are quantized
    quantizer: str = ""
    quantizer_version: str = ""
    tensorrt: bool = False  # the quantized graphs are standard ONNX TensorRT parses

    FORMATS = ("QDQ", "MatMulNBits")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric, "format": self.format,
                "graphs": list(self.graphs), "quantizer": self.quantizer,
                "quantizer_version": self.quantizer_version, "tensorrt": self.tensorrt}


@dataclass
class ExportInfo:
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    date: str = ""


@dataclass(frozen=True)
class SourceModel:
    """Where the package's model came from, enough to rebuild its PyTorch reference: a preset
    (`preset` + `seed`) or a checkpoint folder with its loader options."""

    family: str
    checkpoint: str | None = None
    routers: str | None = None
    preset: str | None = None
    seed: int = 0
    options: dict = field(default_factory=dict)  # loader options: vision_tower, template
    routers_sha256: str | None = None  # digest of the exported routers' weights


@dataclass(frozen=True)
class FileInfo:
    sha256: str
    bytes: int


# --------------------------------------------------------------------------- the TensorRT section


@dataclass(frozen=True)
class Limits:
    """The largest inputs the engines take. `prefill` positions hold the image's tiles and text."""

    max_batch: int
    max_text: int
    max_tiles: int
    visual_tokens: int  # per tile
    context: int  # positions in all (prompt + generated): decode caches reach context - 1

    @property
    def prefill(self) -> int:
        return min(self.visual_tokens * self.max_tiles + self.max_text, self.context)

    @property
    def text_only(self) -> int:
        """Longest text after the exit: the prefill less the fewest visual tokens (one tile)."""
        return min(self.prefill - self.visual_tokens, self.context)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Limits":
        return cls(**{f.name: int(data[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class Profile:
    """One optimisation profile as (min, opt, max) per symbolic axis of the graph's inputs."""

    name: str
    axes: dict

    def contains(self, sizes: dict) -> bool:
        return all(lo <= sizes[axis] <= hi for axis, (lo, _, hi) in self.axes.items() if axis in sizes)

    def input_shapes(self, inputs) -> dict[str, tuple[tuple, tuple, tuple]]:
        """(min, opt, max) shapes of every input with a symbolic axis, from the manifest's
        `TensorInfo`s."""
        out = {}
        for spec in inputs:
            if all(isinstance(d, int) for d in spec.shape):
                continue
            shapes = []
            for k in range(3):
                dims = []
                for d in spec.shape:
                    if isinstance(d, int):
                        dims.append(d)
                    elif d in self.axes:
                        dims.append(self.axes[d][k])
                    else:
                        raise DyVTEError(f"input {spec.name} has axis {d!r} that profile {self.name} does not set")
                shapes.append(tuple(dims))
            out[spec.name] = tuple(shapes)
        return out

    def summary(self) -> str:
        parts = [f"{axis} {lo}" if lo == hi else f"{axis} {lo}..{hi}" for axis, (lo, _, hi) in self.axes.items()]
        return f"{self.name}: {', '.join(parts)}"

    def to_dict(self) -> dict:
        return {"name": self.name, "axes": {k: list(v) for k, v in self.axes.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        return cls(data["name"], {k: tuple(int(x) for x in v) for k, v in data["axes"].items()})


@dataclass
class EngineEntry:
    """One engine file: the graph it was built from and its optimisation profiles."""

    key: str  # the build (GPU, TensorRT version, precision) it belongs to
    graph: str
    file: str
    sha256: str
    bytes: int
    profiles: list[Profile]
    seconds: float = 0.0
    device_memory: dict[str, int] = field(default_factory=dict)  # scratch bytes per profile name

    def to_dict(self) -> dict:
        return {"key": self.key, "graph": self.graph, "file": self.file, "sha256": self.sha256, "bytes": self.bytes,
                "profiles": [p.to_dict() for p in self.profiles], "seconds": self.seconds,
                "device_memory": dict(self.device_memory)}


@dataclass
class EngineBuild:
    """What a set of engines is tied to (GPU model, TensorRT version) and the shapes it takes."""

    gpu: str
    compute_capability: str
    tensorrt: str
    precision: str
    limits: Limits
    typing: str = "strong"
    workspace_gb: float = 0.0
    optimization_level: int | None = None
    seconds: float = 0.0
    date: str = ""

    IDENTITY = ("gpu", "compute_capability", "tensorrt")

    def identity(self) -> dict:
        return {k: getattr(self, k) for k in self.IDENTITY}

    def matches(self, identity: dict) -> bool:
        return all(str(getattr(self, k)) == str(identity.get(k)) for k in self.IDENTITY)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["limits"] = self.limits.to_dict()
        return out


@dataclass
class TensorRTSection:
    builds: dict[str, EngineBuild] = field(default_factory=dict)
    engines: list[EngineEntry] = field(default_factory=list)
    status: str = "not built (python -m engines build PACKAGE on a GPU machine)"

    def engines_of(self, key: str) -> list[EngineEntry]:
        return [e for e in self.engines if e.key == key]

    def to_dict(self) -> dict:
        return {"status": self.status, "builds": {k: b.to_dict() for k, b in self.builds.items()},
                "engines": [e.to_dict() for e in self.engines]}


# --------------------------------------------------------------------------- the manifest


@dataclass
class Manifest:
    family: str
    precision: Precision
    architecture: Architecture
    split: Split
    graphs: tuple[GraphEntry, ...]
    prompt: dict  # a PromptSpec as data (engines.core.prompt.PromptSpec.from_dict)
    weights: Weights
    names: TensorNames = NAMES
    special_tokens: dict = field(default_factory=dict)
    processor: dict = field(default_factory=lambda: {"tokenizer": "processor/tokenizer",
                                                     "image_processor": "processor/image_processor"})
    source: dict = field(default_factory=dict)
    quantization: Quantization | None = None  # int8/int4 packages: bits, block size, graphs quantized
    tensorrt: TensorRTSection = field(default_factory=TensorRTSection)
    versions: dict = field(default_factory=dict)
    export: ExportInfo = field(default_factory=ExportInfo)
    extra: dict = field(default_factory=dict)  # e.g. the CLI's `source` options
    files: dict[str, FileInfo] = field(default_factory=dict)

    # ------------------------------------------------------------------ views

    @property
    def shape(self) -> ModelShape:
        return self.architecture.shape

    def graph(self, name: str) -> GraphEntry:
        for g in self.graphs:
            if g.name == name:
                return g
        raise ManifestError(f"the package has no graph {name!r}")

    def by_role(self, role: str) -> list[GraphEntry]:
        return [g for g in self.graphs if g.role == role]

    @property
    def package_bytes(self) -> int:
        """Bytes of every file the manifest lists (graphs, weights, processor, engines)."""
        return sum(f.bytes for f in self.files.values())

    def source_model(self) -> SourceModel:
        """The `source` record as a `SourceModel` (the family defaults to the package's)."""
        src = self.source or {}
        text = lambda key: src.get(key) if isinstance(src.get(key), str) else None  # noqa: E731
        seed = src.get("seed", 0)
        options = {k: src[k] for k in ("vision_tower", "template") if isinstance(src.get(k), str) and src[k]}
        return SourceModel(text("family") or self.family, text("checkpoint"), text("routers"),
                           text("preset") if "preset" in src else None,
                           seed if isinstance(seed, int) and not isinstance(seed, bool) else 0, options,
                           text("routers_sha256"))

    def has_graph(self, name: str) -> bool:
        return any(g.name == name for g in self.graphs)

    @property
    def segment_graphs(self) -> list[GraphEntry]:
        """Decoder segment graphs in layer order (index i holds `split.segments[i]`)."""
        return sorted(self.by_role("decoder"), key=lambda g: g.layers)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        out = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "family": self.family,
            "precision": self.precision.name, "architecture": self.architecture.to_dict(),
            "split": self.split.to_dict(), "graphs": [g.to_dict() for g in self.graphs],
            "weights": asdict(self.weights), "prompt": dict(self.prompt), "names": asdict(self.names),
            "special_tokens": dict(self.special_tokens), "processor": dict(self.processor),
            "source": dict(self.source), "quantization": self.quantization.to_dict() if self.quantization else None, "tensorrt": self.tensorrt.to_dict(),
            "versions": dict(self.versions), "export": asdict(self.export), **self.extra,
            "files": {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in sorted(self.files.items())},
        }
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> "Manifest":
        """A validated manifest; every problem is one `ManifestError` naming the key."""
        return _parse(data, where)

    # ------------------------------------------------------------------ files

    @staticmethod
    def load(package: str | Path, verify: bool = True) -> "Manifest":
        """The package's manifest, validated; with `verify`, the manifest's own checksum and every
        listed file's size and sha256 are checked too."""
        package = Path(package)
        if not package.is_dir():
            raise DyVTEError(f"package folder not found: {package}")
        path = package / MANIFEST
        if not path.exists():
            raise DyVTEError(f"{package} is not an export package (no {MANIFEST}; an interrupted export?)")
        text = read_regular(path, what="manifest").decode("utf-8", errors="replace")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ManifestError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{path} must hold a JSON object, not {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ManifestError(f"{package} is not a DyVTE export package (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"{package} has package format {data.get('format_version')!r}, this tool reads {FORMAT_VERSION}; "
                "re-export it with this version")
        if verify:
            stored = data.get("manifest_sha256")
            if stored != canonical_sha256(data):
                raise ManifestError(f"{path} was modified after export (its manifest_sha256 does not match); "
                                    "re-export the package")
        manifest = _parse(data, str(path))
        for entry in manifest.graphs:  # every graph the runtime may open lies inside the package
            manifest.resolve(package, entry.file)
        manifest.resolve(package, manifest.weights.file)
        for entry in manifest.tensorrt.engines:
            manifest.resolve(package, entry.file)
        if verify:
            manifest.verify_files(package)
        return manifest

    def save(self, folder: str | Path, files: bool = True) -> Path:
        """Write `manifest.json` atomically; with `files`, the checksum table is recomputed from the
        folder's contents first (everything but the manifest and `report/`)."""
        folder = Path(folder)
        if files:
            self.files = checksum_files(folder)
        data = self.to_dict()
        data["manifest_sha256"] = canonical_sha256(data)
        tmp = folder / f".{MANIFEST}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, folder / MANIFEST)
        return folder / MANIFEST

    def resolve(self, package: str | Path, rel: str) -> Path:
        """`rel` (a path the manifest names) inside `package`, or a ManifestError: absolute paths,
        `..` and links that leave the package are refused."""
        pure = PurePosixPath(rel)
        if not rel or pure.is_absolute() or ".." in pure.parts or "\\" in rel:
            raise ManifestError(f"{MANIFEST} names {rel!r}, which is not a path inside the package")
        root = Path(package).resolve()
        path = (root / rel).resolve()
        if root != path and root not in path.parents:
            raise ManifestError(f"{MANIFEST} names {rel!r}, which leads outside the package")
        return path

    def verify_files(self, package: str | Path) -> None:
        package = Path(package)
        if not self.files:
            raise ManifestError(f"{MANIFEST} lists no files to verify (its 'files' table is empty)")
        needed = {g.file for g in self.graphs} | {self.weights.file}
        missing = sorted(n for n in needed if n and n not in self.files)
        if missing:
            raise ManifestError(f"{MANIFEST} has no checksum for {', '.join(missing)}")
        for rel, info in self.files.items():
            path = self.resolve(package, rel)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                raise DyVTEError(f"package file missing: {rel}") from None
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError(f"package file {rel} is not a regular file")
            if st.st_size != info.bytes or sha256_file(path) != info.sha256:
                raise DyVTEError(f"package file {rel} does not match its checksum (modified or damaged)")


# --------------------------------------------------------------------------- helpers


def canonical_sha256(data: dict) -> str:
    """sha256 of the manifest's canonical JSON, its own checksum field left out."""
    body = {k: v for k, v in data.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_files(folder: Path) -> dict[str, FileInfo]:
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MANIFEST and not rel.startswith(f"{REPORT_DIR}/") \
                and not path.name.startswith(f".{MANIFEST}."):
            files[rel] = FileInfo(sha256_file(path), path.stat().st_size)
    return files


def read_regular(path: Path, what: str = "file") -> bytes:
    """A file's bytes, refusing FIFOs, devices and folders before opening them (a FIFO would block)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DyVTEError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DyVTEError(f"{what} {path} is not a regular file")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DyVTEError(f"cannot read {what} {path}: {exc.strerror}") from None


class _Reader:
    """Typed access to a JSON object with error messages naming the key path."""

    def __init__(self, data: Any, where: str, path: str = ""):
        self.data, self.where, self.path = data, where, path

    def fail(self, key: str, expected: str) -> ManifestError:
        return ManifestError(f"{self.where}: {self._key(key)} must be {expected} (a damaged or hand-edited "
                             "package; re-export it)")

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def obj(self, key: str, optional: bool = False) -> "_Reader | None":
        value = self.data.get(key) if isinstance(self.data, dict) else None
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "an object")
        return _Reader(value, self.where, self._key(key))

    def get(self, key: str, kind, expected: str, optional: bool = False, default=None):
        if not isinstance(self.data, dict) or key not in self.data:
            if optional:
                return default
            raise self.fail(key, expected)
        value = self.data[key]
        if value is None and optional:
            return default
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(key, expected)
        return value

    def int(self, key: str, minimum: int = 0, optional: bool = False):
        value = self.get(key, int, f"an integer >= {minimum}", optional)
        if value is not None and value < minimum:
            raise self.fail(key, f"an integer >= {minimum}")
        return value

    def str(self, key: str, optional: bool = False, default=None):
        return self.get(key, str, "a string", optional, default)


def _int_pair(value, reader: _Reader, key: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in value)):
        raise reader.fail(key, "a pair of integers")
    return int(value[0]), int(value[1])


def _tensors(values, reader: _Reader, key: str) -> tuple[TensorInfo, ...]:
    if not isinstance(values, list):
        raise reader.fail(key, "a list of tensors")
    out = []
    for i, t in enumerate(values):
        if not isinstance(t, dict):
            raise ManifestError(f"{reader.where}: {reader._key(key)}[{i}] must be an object (re-export the package)")
        r = _Reader(t, reader.where, f"{reader._key(key)}[{i}]")
        dtype = r.str("dtype")
        if dtype not in ("float32", "float16", "int64", "int32", "uint8", "int8"):
            raise r.fail("dtype", "a tensor dtype name")
        shape = r.get("shape", list, "a list of sizes and axis names")
        if not all((isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d)
                   for d in shape):
            raise r.fail("shape", "a list of sizes and axis names")
        out.append(TensorInfo(r.str("name"), dtype, tuple(shape)))
    return tuple(out)


def _parse(data: Any, where: str) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{where} must hold a JSON object, not {type(data).__name__}")
    r = _Reader(data, where)
    precision_name = r.str("precision")
    if precision_name not in PRECISIONS:
        raise r.fail("precision", f"one of {', '.join(PRECISIONS)}")
    a = r.obj("architecture")
    shape = ModelShape(
        num_layers=a.int("num_layers", 1), hidden_size=a.int("hidden_size", 1), num_heads=a.int("num_heads", 1),
        num_kv_heads=a.int("num_kv_heads", 1), head_dim=a.int("head_dim", 1), vocab_size=a.int("vocab_size", 1),
        max_positions=a.int("max_positions", 1), intermediate_size=a.int("intermediate_size", 1, optional=True))
    image = a.get("image_shape", list, "a list of 3 sizes")
    if len(image) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image):
        raise a.fail("image_shape", "a list of 3 positive sizes")
    arch = Architecture(shape, a.int("visual_tokens_per_tile", 1), tuple(image))
    split = _parse_split(r.obj("split"), shape.num_layers)
    names_data = r.get("names", dict, "an object", optional=True, default={})
    known = {f.name for f in fields(TensorNames)}
    if set(names_data) - known or not all(isinstance(v, str) and v for v in names_data.values()):
        raise r.fail("names", f"an object of tensor-name patterns ({', '.join(sorted(known))})")
    names = replace(NAMES, **names_data)
    graphs_data = r.get("graphs", list, "a list of graphs")
    graphs = tuple(_parse_graph(g, where, i) for i, g in enumerate(graphs_data))
    w = r.obj("weights")
    weights = Weights(w.str("file"), w.int("parameter_bytes"))
    e = r.obj("export", optional=True)
    export = ExportInfo() if e is None else ExportInfo(
        float(e.get("seconds", (int, float), "a number", optional=True, default=0)),
        float(e.get("peak_rss_mb", (int, float), "a number", optional=True, default=0)),
        e.str("date", optional=True, default=""))
    prompt = r.obj("prompt")
    prompt.str("template")
    prompt.get("image_token_id", int, "an integer")
    prompt.int("tokens_per_tile", 1)
    files_data = r.get("files", dict, "an object of path -> {sha256, bytes}", optional=True, default={})
    files = {}
    for rel, info in files_data.items():
        fr = _Reader(info, where, f"files[{rel!r}]")
        if not isinstance(info, dict):
            raise ManifestError(f"{where}: files[{rel!r}] must be an object with sha256 and bytes")
        files[rel] = FileInfo(fr.str("sha256"), fr.int("bytes"))
    known_keys = {"format", "format_version", "family", "precision", "architecture", "split", "graphs", "weights",
                  "prompt", "names", "special_tokens", "processor", "source", "quantization", "tensorrt", "versions",
                  "export", "files", "manifest_sha256"}
    manifest = Manifest(
        family=r.str("family"), precision=get_precision(precision_name), architecture=arch, split=split,
        graphs=graphs, prompt=dict(prompt.data), weights=weights, names=names,
        special_tokens=r.get("special_tokens", dict, "an object", optional=True, default={}),
        processor=r.get("processor", dict, "an object", optional=True,
                        default={"tokenizer": "processor/tokenizer", "image_processor": "processor/image_processor"}),
        source=r.get("source", dict, "an object", optional=True, default={}),
        quantization=_parse_quantization(r.obj("quantization", optional=True)),
        tensorrt=_parse_tensorrt(r.obj("tensorrt", optional=True)),
        versions=r.get("versions", dict, "an object", optional=True, default={}),
        export=export,
        extra={k: v for k, v in data.items() if k not in known_keys},
        files=files,
    )
    _check_consistency(manifest, where)
    return manifest


def _parse_quantization(q: "_Reader | None") -> Quantization | None:
    if q is None:
        return None
    fmt = q.str("format")
    if fmt not in Quantization.FORMATS:
        raise q.fail("format", f"one of {', '.join(Quantization.FORMATS)}")
    graphs = q.get("graphs", list, "a list of graph names")
    if not all(isinstance(g, str) for g in graphs):
        raise q.fail("graphs", "a list of graph names")
    return Quantization(q.int("bits", 1), q.int("block_size", 1), q.get("symmetric", bool, "true or false"), fmt,
                        tuple(graphs), q.str("quantizer", optional=True, default=""),
                        q.str("quantizer_version", optional=True, default=""),
                        q.get("tensorrt", bool, "true or false", optional=True, default=False))


def _parse_split(s: _Reader, num_layers: int) -> Split:
    window = s.data.get("exit_window")
    window = None if window is None else _int_pair(window, s, "exit_window")
    boundaries = s.get("exit_boundaries", list, "a list of layers")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < num_layers - 1 for b in boundaries):
        raise s.fail("exit_boundaries", f"a list of layers in 0..{num_layers - 2}")
    segments_data = s.get("segments", list, "a list of [start, end) layer pairs")
    segments = tuple(_int_pair(x, s, f"segments[{i}]") for i, x in enumerate(segments_data))
    start = 0
    for i, (lo, hi) in enumerate(segments):
        if lo != start or hi <= lo:
            raise s.fail(f"segments[{i}]", f"[{start}, end) with end > {start} (segments must tile the layers)")
        start = hi
    if start != num_layers:
        raise s.fail("segments", f"layer ranges covering all {num_layers} layers")
    ends = {hi - 1 for _, hi in segments}
    if not set(boundaries) <= ends:
        raise s.fail("exit_boundaries", "layers that end a segment")
    return Split(window, tuple(boundaries), segments, bool(s.get("has_routers", bool, "true or false")))


def _parse_graph(g: Any, where: str, index: int) -> GraphEntry:
    if not isinstance(g, dict):
        raise ManifestError(f"{where}: graphs[{index}] must be an object (re-export the package)")
    r = _Reader(g, where, f"graphs[{index}]")
    role = r.str("role")
    if role not in ROLES:
        raise r.fail("role", f"one of {', '.join(ROLES)}")
    layers = g.get("layers")
    layers = None if layers is None else _int_pair(layers, r, "layers")
    return GraphEntry(
        name=r.str("name"), role=role, file=r.str("file"), inputs=_tensors(g.get("inputs"), r, "inputs"),
        outputs=_tensors(g.get("outputs"), r, "outputs"), layers=layers,
        seconds=float(r.get("seconds", (int, float), "a number", optional=True, default=0.0)),
        peak_rss_mb=float(r.get("peak_rss_mb", (int, float), "a number", optional=True, default=0.0)))


def _check_consistency(m: Manifest, where: str) -> None:
    """The graphs must be the ones the split and the architecture imply, with the inputs a runtime
    binds (names and fixed sizes), so a runtime never discovers a mismatch inside ONNX Runtime."""
    def fail(msg: str) -> ManifestError:
        return ManifestError(f"{where}: {msg} (a damaged or hand-edited package; re-export it)")

    names = [g.name for g in m.graphs]
    if len(set(names)) != len(names):
        raise fail("graph names repeat")
    for role in ("vision", "embed", "lm_head"):
        if len(m.by_role(role)) != 1:
            raise fail(f"there must be exactly one {role} graph")
    if m.split.has_routers and len(m.by_role("hypernet")) != 1:
        raise fail("split.has_routers is true but there is no hypernet graph")
    if not m.split.has_routers and m.by_role("hypernet"):
        raise fail("split.has_routers is false but the package has a hypernet graph")
    if len(m.by_role("decode")) > 1:
        raise fail("there must be at most one decode graph")
    for g in m.graphs:  # runtimes open the single-role graphs by name
        if g.role != "decoder" and g.name != g.role:
            raise fail(f"the {g.role} graph must be named {g.role!r}, not {g.name!r}")
        if (g.role == "decoder") != (g.layers is not None):
            raise fail(f"graph {g.name}: layers must be given for decoder graphs only")
    q = m.quantization
    if m.precision.quantized != (q is not None):
        raise fail(f"a {m.precision.name} package {'needs' if q is None else 'has no use for'} a quantization section")
    if q is not None:
        if q.bits != m.precision.weight_bits:
            raise fail(f"quantization.bits is {q.bits}, the {m.precision.name} package needs {m.precision.weight_bits}")
        unknown = sorted(set(q.graphs) - set(names))
        if unknown:
            raise fail(f"quantization names graphs the package lacks: {', '.join(unknown)}")
    segs = m.segment_graphs
    if tuple(g.layers for g in segs) != m.split.segments:
        raise fail(f"decoder graphs cover layers {[g.layers for g in segs]}, the split {list(m.split.segments)}")
    s, n, float_name = m.shape, m.names, m.precision.float_name
    hidden = s.hidden_size
    kv = (s.num_kv_heads, s.head_dim)

    def need(graph: GraphEntry, tensors, name: str, dtype: str, fixed: dict[int, int]):
        found = [t for t in tensors if t.name == name]
        if not found:
            raise fail(f"graph {graph.name} lacks tensor {name}")
        t = found[0]
        if t.dtype != dtype:
            raise fail(f"graph {graph.name} tensor {name} is {t.dtype}, the {m.precision.name} package needs {dtype}")
        for axis, size in fixed.items():
            if axis >= len(t.shape) or (isinstance(t.shape[axis], int) and t.shape[axis] != size):
                raise fail(f"graph {graph.name} tensor {name} has shape {list(t.shape)}; axis {axis} must be {size}")

    for g in segs:
        need(g, g.inputs, n.hidden_in, float_name, {2: hidden})
        need(g, g.outputs, n.hidden_out, float_name, {2: hidden})
        need(g, g.inputs, n.position_ids, "int64", {})
        need(g, g.inputs, n.attention_mask, "int64", {})
        for layer in range(*g.layers):
            for name in n.past(layer):
                need(g, g.inputs, name, float_name, {1: kv[0], 3: kv[1]})
            for name in n.new(layer):
                need(g, g.outputs, name, float_name, {1: kv[0], 3: kv[1]})
    (vision,) = m.by_role("vision")
    need(vision, vision.outputs, n.visual_embeds, float_name, {2: hidden})
    (embed,) = m.by_role("embed")
    need(embed, embed.outputs, n.inputs_embeds, float_name, {2: hidden})
    (head,) = m.by_role("lm_head")
    need(head, head.outputs, n.logits, float_name, {2: s.vocab_size})
    for g in m.by_role("decode"):
        need(g, g.outputs, n.logits, float_name, {2: s.vocab_size})
        for layer in range(s.num_layers):
            for name in n.past(layer):
                need(g, g.inputs, name, float_name, {1: kv[0], 3: kv[1]})


def _parse_tensorrt(t: "_Reader | None") -> TensorRTSection:
    if t is None:
        return TensorRTSection()
    builds = {}
    for key, data in t.get("builds", dict, "an object", optional=True, default={}).items():
        b = _Reader(data, t.where, f"{t._key('builds')}[{key!r}]")
        if not isinstance(data, dict):
            raise t.fail(f"builds[{key!r}]", "an object")
        lim = b.obj("limits")
        limits = Limits(*(lim.int(f.name, 1) for f in fields(Limits)))
        level = b.get("optimization_level", int, "an integer", optional=True)
        builds[key] = EngineBuild(b.str("gpu"), b.str("compute_capability"), b.str("tensorrt"), b.str("precision"),
                                  limits, b.str("typing", optional=True, default="strong"),
                                  float(b.get("workspace_gb", (int, float), "a number", optional=True, default=0)),
                                  level, float(b.get("seconds", (int, float), "a number", optional=True, default=0)),
                                  b.str("date", optional=True, default=""))
    engines = []
    for i, data in enumerate(t.get("engines", list, "a list", optional=True, default=[])):
        if not isinstance(data, dict):
            raise t.fail(f"engines[{i}]", "an object")
        e = _Reader(data, t.where, f"{t._key('engines')}[{i}]")
        profiles = []
        for j, p in enumerate(e.get("profiles", list, "a list of profiles")):
            pr = _Reader(p, t.where, f"{e._key('profiles')}[{j}]")
            if not isinstance(p, dict):
                raise e.fail(f"profiles[{j}]", "an object")
            axes = pr.get("axes", dict, "an object of axis -> [min, opt, max]")
            if not all(isinstance(v, list) and len(v) == 3 and all(_is_int(x) for x in v) for v in axes.values()):
                raise pr.fail("axes", "an object of axis -> [min, opt, max]")
            profiles.append(Profile(pr.str("name"), {k: tuple(v) for k, v in axes.items()}))
        engine = EngineEntry(e.str("key"), e.str("graph"), e.str("file"), e.str("sha256"), e.int("bytes"), profiles,
                             float(e.get("seconds", (int, float), "a number", optional=True, default=0)),
                             e.get("device_memory", dict, "an object", optional=True, default={}))
        if not all(isinstance(k, str) and _is_int(v) for k, v in engine.device_memory.items()):
            raise e.fail("device_memory", "an object of profile name -> bytes")
        if engine.key not in builds:
            raise e.fail("key", "the key of a build in tensorrt.builds")
        engines.append(engine)
    return TensorRTSection(builds, engines, t.str("status", optional=True, default=TensorRTSection.status))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
