"""Export from a checkpoint without holding it in memory: weights stay on disk until a graph needs them.

A lazy model is built from its config on the meta device (no memory); every parameter is tagged
with the `.safetensors` file and key it comes from (`SOURCE`). The published key layouts are
matched to module names by transformers' own conversion mapping (`lazy_pretrained`) or by the
adapter's renaming function (`tag_parameters`), applied to the names in the files' headers: no state
dict is ever loaded. Missing keys, wrong shapes or dtypes and truncated shards are refused here,
before anything is exported.

Two ways to use the tags: `stream_weights`, the `materialize` hook of `exporter.package.export_onnx`
(a graph's parameters are read memory-mapped while it exports, meta again afterwards), and
`stream_while_running` (each module's own parameters are read just before its forward and dropped
after it: the PyTorch reference of the parity report runs with one layer's weights in memory).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

from engines.core.errors import DyVTEError
from engines.core.errors import wrap_load_errors
from exporter.models.checkpoint import read_json, require_dir, weight_files

SOURCE = "_dyvte_source"  # attribute on a meta parameter: (file, key, dtype)
EAGER_TOWER_BYTES = 256 * 2**20  # vision parts smaller than this are read into memory at load
STREAM_FRACTION = 0.5  # stream by default when the weights exceed this share of the available memory
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def swap_parameter(module: nn.Module, qualified: str, tensor: torch.Tensor, like: nn.Parameter) -> None:
    """Replace parameter `qualified` of `module` by `tensor`, keeping `like`'s requires_grad (the
    ONNX exporter folds a transposed weight only for trainable-looking parameters, and streamed
    graphs must equal eager ones) and its `_dyvte_*` tags (where the values come from)."""
    owner_name, _, leaf = qualified.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    param = nn.Parameter(tensor, requires_grad=like.requires_grad)
    for attr, value in vars(like).items():
        if attr.startswith("_dyvte_"):
            setattr(param, attr, value)
    setattr(owner, leaf, param)


def materializer(values: Callable[[str, nn.Parameter], torch.Tensor | None]):
    """A `materialize` hook for `export_onnx`: inside it, every meta parameter of the module for
    which `values(name, parameter)` gives a tensor holds that tensor; on exit they are meta again."""

    @contextmanager
    def materialize(module: nn.Module):
        made = []
        for name, p in list(module.named_parameters()):
            tensor = values(name, p) if p.is_meta else None
            if tensor is not None:
                swap_parameter(module, name, tensor, p)
                made.append((name, p))
        try:
            yield module
        finally:
            for name, p in made:
                swap_parameter(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"), p)

    return materialize


# ----------------------------------------------------------------------------- what the files hold


@dataclass(frozen=True)
class Stored:
    """One tensor of a checkpoint, as its file's header describes it."""

    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F16, BF16, F32, I64, ...


def checkpoint_index(folder: Path) -> dict[str, Stored]:
    """Checkpoint key -> where it is, over the folder's weight files (sharded or not), from the headers
    only. A truncated or damaged shard is refused by name."""
    index: dict[str, Stored] = {}
    for f in weight_files(Path(folder)):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    view = handle.get_slice(key)
                    index[key] = Stored(str(f), tuple(view.get_shape()), view.get_dtype())
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DyVTEError(f"cannot read {f} (truncated or damaged?): {exc}") from None
    return index


def weight_bytes(folders: Iterable[Path]) -> int:
    """Bytes of the .safetensors files of these folders (what an eager load reads into memory)."""
    return sum(f.stat().st_size for folder in folders for f in weight_files(Path(folder)))


def tag_parameters(module: nn.Module, index: dict[str, Stored], key_of: Callable[[str], str | None],
                   what: str, folder: Path, dtype: torch.dtype, optional: tuple[str, ...] = ()) -> None:
    """Tag every meta parameter of `module` with the file and key `key_of(name)` it is read from,
    refusing (one line, naming key and file) what an eager load would refuse: absent keys, wrong
    shapes, tensors that are not floating point. Parameters whose name starts with one of
    `optional` may be absent (never read by the computation): they are made real, zero."""
    missing = []
    for name, p in list(module.named_parameters()):
        if not p.is_meta:
            continue
        key = key_of(name)
        stored = index.get(key) if key is not None else None
        if stored is None:
            if name.startswith(optional) and optional:
                swap_parameter(module, name, torch.zeros(p.shape, dtype=p.dtype), p)
                continue
            missing.append(key or name)
            continue
        if stored.shape != tuple(p.shape):
            raise DyVTEError(f"{what}: weight {key} in {stored.file} has shape {list(stored.shape)}, "
                             f"expected {list(p.shape)}")
        if stored.dtype not in _SAFETENSORS_DTYPES:
            raise DyVTEError(f"{what}: weight {key} in {stored.file} is {stored.dtype}, expected a floating-point "
                             f"tensor ({', '.join(_SAFETENSORS_DTYPES)})")
        setattr(p, SOURCE, (stored.file, key, dtype))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DyVTEError(f"{what} at {folder} lacks weights {', '.join(missing[:3])}{more}")


# ----------------------------------------------------------------------------- lazy models


def empty_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with its parameters on the meta device and its buffers real (rotary tables, position
    ids), computed the way transformers' `from_pretrained` computes them after a meta-device build."""
    with torch.device("meta"):
        model = build()
    if hasattr(model, "_move_missing_keys_from_meta_to_device"):  # a transformers PreTrainedModel
        model._move_missing_keys_from_meta_to_device(set(), None, None, None)
        model._initialize_missing_keys(False)
    for name, buffer in model.named_buffers():
        if buffer.is_meta:
            raise RuntimeError(f"buffer {name} of {type(model).__name__} stayed on the meta device (a bug)")
    return model


def hf_key_map(model, keys: Iterable[str]) -> dict[str, str]:
    """Module parameter name -> checkpoint key, for checkpoint `keys` in a published layout, by the
    renaming transformers' `from_pretrained` applies to that model class (its conversion mapping).
    Conversions that merge or split tensors cannot be streamed and are refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_state = model.state_dict()
    prefix = model.base_model_prefix
    out: dict[str, str] = {}
    for key in sorted(keys):
        name, converted = rename_source_key(key, renamings, converters, prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name, converted = rename_source_key(key, [], [], prefix, meta_state)
        if name in meta_state:
            if converted is not None:
                raise DyVTEError(f"{key} needs transformers' weight conversion {converted!r} to load, which "
                                 "cannot be streamed; export with --no-stream")
            out.setdefault(name, key)
    return out


def published_names(model, names: Iterable[str]) -> dict[str, str]:
    """The inverse for writing: module name -> key in the published layout, by the reverse of the same
    renamings (as transformers' `save_pretrained` does for a model built from its config)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

    transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    reverse = [t.reverse_transform() for t in transforms[::-1]]
    renamings = [t for t in reverse if isinstance(t, WeightRenaming)]
    return {name: apply_renamings(name, renamings) for name in names}


def lazy_pretrained(cls, folder: Path, what: str, dtype: torch.dtype = torch.float32, config=None,
                    index: dict[str, Stored] | None = None):
    """`cls.from_pretrained(folder)` without reading a weight: the model on the meta device, each
    parameter tagged with its file and key (published names mapped by `hf_key_map`), with the
    refusals of an eager load."""
    folder = require_dir(Path(folder), what)
    if config is None:
        read_json(folder / "config.json")
        config_class = getattr(cls, "config_class", None)
        if config_class is None:  # an Auto class
            from transformers import AutoConfig as config_class
        config = wrap_load_errors(f"{what} config from {folder}", config_class.from_pretrained, str(folder),
                                  local_files_only=True)
    index = checkpoint_index(folder) if index is None else index
    build = getattr(cls, "from_config", None) or cls._from_config
    model = empty_model(lambda: wrap_load_errors(f"{what} from {folder}", build, config, dtype=dtype))
    names = hf_key_map(model, index)
    absent = [n for n, p in model.named_parameters() if n not in names]
    names.update(published_names(model, absent))  # so that a missing weight is named as the file would name it
    tag_parameters(model, index, names.get, what, folder, dtype)
    return model.eval()


def _from_file(name: str, p: nn.Parameter) -> torch.Tensor | None:
    source = getattr(p, SOURCE, None)
    if source is None:
        return None
    file, key, dtype = source
    try:
        with safe_open(file, framework="pt") as handle:
            return handle.get_tensor(key).to(dtype)
    except Exception as exc:  # the file changed or vanished since it was indexed
        raise DyVTEError(f"cannot read {key} from {file}: {exc}") from None


stream_weights = materializer(_from_file)
stream_weights.__doc__ = "Real tensors for a module's streamed parameters while the block runs, meta again after."


def streamed_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.is_meta and hasattr(p, SOURCE))


def make_real(module: nn.Module, always: bool = False) -> nn.Module:
    """Read a lazy module's weights into memory for good, when they total at most `EAGER_TOWER_BYTES`
    (or `always`); a larger one stays streamed."""
    if not always and streamed_bytes(module) > EAGER_TOWER_BYTES:
        return module
    for name, p in list(module.named_parameters()):
        tensor = _from_file(name, p) if p.is_meta else None
        if tensor is not None:
            swap_parameter(module, name, tensor, p)
    return module


def is_streamed(model: nn.Module) -> bool:
    return any(p.is_meta and hasattr(p, SOURCE) for p in model.parameters())


# ----------------------------------------------------------------------------- running a lazy model


def _load_own(module, args):
    made = []
    for name, p in list(module.named_parameters(recurse=module._dyvte_whole)):
        tensor = _from_file(name, p) if p.is_meta else None
        if tensor is not None:
            swap_parameter(module, name, tensor, p)
            made.append((name, p))
    module._dyvte_made = made


def _drop_own(module, args, output):
    for name, p in getattr(module, "_dyvte_made", ()):
        swap_parameter(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"), p)
    module._dyvte_made = []


def stream_while_running(model: nn.Module, whole: Iterable[nn.Module] = ()) -> nn.Module:
    """Hooks on a lazy model: each module reads its own streamed parameters just before its forward
    and drops them after it, so running the model holds one layer's weights at a time. Modules in
    `whole` (e.g. a vision tower whose code reads a weight without calling its owner) read all their
    parameters around their own forward instead. Installing twice is a no-op."""
    whole = list(whole)
    inside = {id(m) for w in whole for m in w.modules()}
    targets = [(w, True) for w in whole if streamed_bytes(w)]
    for module in model.modules():
        if id(module) in inside:
            continue
        if any(p.is_meta and hasattr(p, SOURCE) for p in module.parameters(recurse=False)):
            targets.append((module, False))
    for module, recurse in targets:
        if getattr(module, "_dyvte_hooked", False):
            continue
        module._dyvte_whole = recurse
        module.register_forward_pre_hook(_load_own)
        module.register_forward_hook(_drop_own)
        module._dyvte_hooked = True
    return model


# ----------------------------------------------------------------------------- the default


def available_memory() -> int:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def checkpoint_folders(checkpoint, options: dict | None = None) -> list[Path]:
    """The folders whose weights a load reads: the checkpoint, and a separate vision tower (original
    LLaVA layout); VILA's sub-folders."""
    root = Path(checkpoint)
    folders = [root / sub for sub in ("llm", "vision_tower", "mm_projector") if (root / sub).is_dir()] or [root]
    tower = (options or {}).get("vision_tower")
    return folders + ([Path(tower)] if tower else [])


def choose_streaming(folders: Iterable[Path], forced: bool | None) -> tuple[bool, str]:
    """Whether to stream a checkpoint, and why: forced by a flag, else when its weights exceed
    `STREAM_FRACTION` of the available memory."""
    return exceeds_memory(weight_bytes(folders), forced)


def exceeds_memory(size: int, forced: bool | None = None, what: str = "weights",
                   flags: tuple[str, str] = ("--stream", "--no-stream")) -> tuple[bool, str]:
    """`choose_streaming`'s rule for `size` bytes: forced by a flag (`flags`: its on and off
    spellings), else whether they exceed `STREAM_FRACTION` of the available memory; and why."""
    free = available_memory()
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    if forced is not None:
        return forced, f"{flags[0] if forced else flags[1]} given ({what} {gib(size)}, {gib(free)} available)"
    stream = size > STREAM_FRACTION * free
    relation = ">" if stream else "<="
    return stream, f"{what} {gib(size)} {relation} {STREAM_FRACTION:.0%} of {gib(free)} available memory"
