"""Reading local checkpoint folders safely: JSON configs and safetensors only, clear errors.

Nothing here unpickles: weights are read from .safetensors files (sharded or not), and every
problem a user can cause (missing folder, missing or truncated file, absent keys) becomes a
one-line `DyVTEError` that names the file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from safetensors import safe_open

from engines.core.errors import DyVTEError, warn, wrap_load_errors


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, which must hold an object (regular files only: a FIFO would block)."""
    from engines.core.manifest import read_regular

    path = Path(path)
    if not path.is_file():
        raise DyVTEError(f"missing file: {path}")
    try:
        data = json.loads(read_regular(path, what="checkpoint file"))
    except ValueError as exc:
        raise DyVTEError(f"cannot parse {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DyVTEError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DyVTEError(f"{what} folder not found: {path}")
    return path


def config_int(config: dict, key: str, default: int, where: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer setting of a checkpoint config (booleans, text and floats refused by name)."""
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or \
            (hi is not None and value > hi):
        span = f" in {lo}..{hi}" if lo is not None and hi is not None else ""
        raise DyVTEError(f"{where}: {key} must be an integer{span}, not {value!r}")
    return value


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def weight_files(folder: Path) -> list[Path]:
    """The .safetensors files of a folder, following a sharded index when there is one. Shard
    names must stay inside the folder; `.weight`/`.bias` tensors must be floating point; pickle
    files beside the safetensors are ignored, with a warning."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise DyVTEError(f"{index}: weight_map must be an object of tensor name -> shard file name")
        names = sorted(set(weight_map.values()))
        root = folder.resolve()
        for n in names:
            target = (folder / n).resolve()
            if Path(n).is_absolute() or ".." in Path(n).parts or target.parent != root:
                raise DyVTEError(f"{index} names shard {n!r}, which is not a file in {folder}")
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise DyVTEError(f"missing weight shard {f} (listed in {index.name})")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise DyVTEError(
                f"{folder} holds only pickle weights (.bin/.pt); convert them to .safetensors first"
            )
        raise DyVTEError(f"no .safetensors weights in {folder}")
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl") for p in folder.glob(pattern))
    if pickles:
        warn(f"{folder} also holds pickle files ({', '.join(pickles[:3])}); they are ignored (never unpickled), "
             "only the .safetensors weights are read")
    for f in files:
        _check_float_weights(f)
    return files


def _check_float_weights(path: Path) -> None:
    """Refuse integer or boolean tensors where weights (floats) belong, from the file's header;
    and anything but a regular file (a FIFO would block the reader for ever)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise DyVTEError(f"weight file {path} is not a regular file")
    except OSError as exc:
        raise DyVTEError(f"cannot read weight file {path}: {exc.strerror}") from None
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith((".weight", ".bias")):
                    dtype = handle.get_slice(key).get_dtype()
                    if dtype not in FLOAT_DTYPES:
                        raise DyVTEError(f"{path}: weight {key} has dtype {dtype}; expected floating point weights")
    except DyVTEError:
        raise
    except Exception:  # a damaged file: the loader that reads it names it in its own words
        return


def load_safetensors(folder: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors under `prefix` (prefix stripped) from the folder's weight files."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefix):
                        out[key[len(prefix):]] = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise DyVTEError(f"cannot read {f} (truncated or damaged?): {exc}") from None
    return out


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy tensors into a module, refusing missing keys and shape mismatches by name."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DyVTEError(f"{where} lacks weights {', '.join(missing[:3])}{more}")
    for key, value in own.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(value.shape):
            raise DyVTEError(
                f"{where}: weight {key} has shape {list(got.shape)}, expected {list(value.shape)}"
            )
    module.load_state_dict({k: tensors[k] for k in own}, strict=True)


def hf_from_pretrained(cls, path: Path, what: str, dtype: torch.dtype = torch.float32, **kwargs):
    """`cls.from_pretrained` on a local folder, safetensors only, refusing missing weights.

    transformers maps the published key layouts (e.g. `language_model.model.*` of `-hf` repos)
    itself; what it would silently initialise at random is turned into an error here.
    """
    path = require_dir(Path(path), what)
    read_json(path / "config.json")
    weight_files(path)
    model, info = wrap_load_errors(
        f"{what} from {path}",
        cls.from_pretrained,
        str(path),
        output_loading_info=True,
        dtype=dtype,
        use_safetensors=True,
        local_files_only=True,
        **kwargs,
    )
    for kind in ("missing_keys", "mismatched_keys"):
        bad = sorted(str(k) for k in info.get(kind) or [])
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            label = "lacks weights" if kind == "missing_keys" else "has weights of the wrong shape:"
            raise DyVTEError(f"{what} at {path} {label} {', '.join(bad[:3])}{more}")
    return model.eval()
