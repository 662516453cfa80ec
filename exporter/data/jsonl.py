"""LLaVA-style conversation records (one JSON object a line, or a JSON list) with an image folder.

A record: `{"id": ..., "image": "rel/path.jpg", "conversations": [{"from": "human", "value":
"<image>\\n question"}, {"from": "gpt", "value": "answer"}, ...]}`. The first human turn is the
question (the `<image>` marker is removed: each family's template places the image itself) and the
gpt turn after it, if any, the reference answer. Records without an `image` (text-only, as in the
LLaVA-665k mix) are skipped: routers decide about visual tokens. Every problem names the record
by line and id.
"""

from __future__ import annotations

import json
from pathlib import Path

from exporter.data import VQASample
from engines.core.errors import DyVTEError

IMAGE_MARKER = "<image>"


def _records(path: Path) -> list[tuple[str, object]]:
    """(where, parsed object) pairs from JSONL ("line N"), or one JSON list ("item N", LLaVA's .json)."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DyVTEError(f"{path} is empty: expected one JSON record per line")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise DyVTEError(f"{path} is not valid JSON: {exc}") from None
        return [(f"item {i + 1}", item) for i, item in enumerate(items)]
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"line {number}", json.loads(line)))
        except ValueError as exc:
            raise DyVTEError(f"{path} line {number} is not valid JSON: {exc}") from None
    return out


def _turn_text(turn, where: str) -> str:
    value = turn.get("value") if isinstance(turn, dict) else None
    if not isinstance(value, str):
        raise DyVTEError(f"{where}: a conversation turn has no text 'value'")
    return value


def parse_record(record, where: str, image_folder: Path | None) -> VQASample | None:
    """One record -> a sample, None for a text-only record; `where` names it in errors."""
    if not isinstance(record, dict):
        raise DyVTEError(f"{where}: expected a JSON object, got {type(record).__name__}")
    image = record.get("image")
    if image is None:
        return None
    if not isinstance(image, str):
        raise DyVTEError(f"{where}: 'image' must be one path (several images per record are not supported)")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DyVTEError(f"{where}: no 'conversations' list")
    human = [i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("from") in ("human", "user")]
    if not human:
        raise DyVTEError(f"{where}: the conversation has no human turn (a turn with \"from\": \"human\")")
    first = human[0]
    question = _turn_text(turns[first], where).replace(IMAGE_MARKER, " ").strip()
    if not question:
        raise DyVTEError(f"{where}: the human turn holds no question besides the image")
    answer = None
    reply = turns[first + 1] if first + 1 < len(turns) else None
    if isinstance(reply, dict) and reply.get("from") in ("gpt", "assistant"):
        answer = _turn_text(reply, where).strip() or None
    path = Path(image)
    if not path.is_absolute():
        if image_folder is None:
            raise DyVTEError(f"{where}: image path {image!r} is relative; give the image folder (--images DIR)")
        path = Path(image_folder) / path
    if not path.is_file():
        raise DyVTEError(f"{where}: image not found: {path}")
    return VQASample(id=str(record.get("id", where)), question=question, answer=answer, image_path=path)


def read_jsonl(path: str | Path, image_folder: str | Path | None = None) -> list[VQASample]:
    """All image records of a LLaVA-style file; a clear error for the first bad record."""
    path = Path(path)
    if not path.is_file():
        raise DyVTEError(f"data file not found: {path}")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise DyVTEError(f"image folder not found: {image_folder}")
    samples = []
    for position, record in _records(path):
        rid = record.get("id") if isinstance(record, dict) else None
        where = f"{path.name} record at {position}" + (f" (id {rid!r})" if rid is not None else "")
        sample = parse_record(record, where, Path(image_folder) if image_folder else None)
        if sample is not None:
            samples.append(sample)
    if not samples:
        raise DyVTEError(f"{path} holds no records with an image")
    return samples
