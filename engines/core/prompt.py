"""Prompts: building them and preprocessing images, as data that a package can carry.

A `Processor` is a tokenizer, a transformers image processor and a `PromptSpec`: plain fields that
say how the family's template is rendered and how the image placeholder becomes visual positions.
The spec goes into the package manifest and the two processors' files into the package, so an
exported runtime rebuilds exactly the same prompts with no family code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

from engines.core.errors import DyVTEError, wrap_load_errors

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Prompt:
    """One prepared sample: token ids with the visual span filled by placeholder ids."""

    input_ids: list[int]
    visual_span: tuple[int, int] | None
    pixel_values: torch.Tensor | None  # [tiles, 3, H, W]

    @property
    def num_visual(self) -> int:
        return 0 if self.visual_span is None else self.visual_span[1] - self.visual_span[0]


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: `role` system | user | assistant; `image` True on the user
    turn that holds the conversation's (one) image, which goes before that turn's text."""

    role: str
    text: str
    image: bool = False


def chat_turns(turns: list[Turn]) -> tuple[str | None, list[Turn]]:
    """(system text or None, user/assistant turns) of a conversation, checked: system messages
    only first (joined by newlines), then turns from `user` to a final `user`; consecutive messages
    of one role are joined by newlines (into one turn); at most one image, in a user turn."""
    roles = ("system", "user", "assistant")
    for t in turns:
        if t.role not in roles:
            raise DyVTEError(f"unsupported message role {t.role!r} (supported: {', '.join(roles)})")
        check_text(t.text)
        if t.image and t.role != "user":
            raise DyVTEError(f"an image can only be in a user message, not in a {t.role} message")
    if sum(t.image for t in turns) > 1:
        raise DyVTEError(f"this model takes at most 1 image per conversation (got {sum(t.image for t in turns)})")
    lead = 0
    while lead < len(turns) and turns[lead].role == "system":
        lead += 1
    system = "\n".join(t.text for t in turns[:lead]) if lead else None
    merged: list[Turn] = []
    for t in turns[lead:]:
        if t.role == "system":
            raise DyVTEError("system messages must come before the user and assistant messages")
        if merged and merged[-1].role == t.role:
            last = merged[-1]
            merged[-1] = Turn(t.role, f"{last.text}\n{t.text}", last.image or t.image)
        else:
            merged.append(t)
    if not merged or merged[0].role != "user" or merged[-1].role != "user":
        raise DyVTEError("a conversation must start and end with a user message (after any system message)")
    return system, merged


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DyVTEError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types for bad files
        raise DyVTEError(f"cannot read image {path}: {exc.__class__.__name__}") from None


@dataclass
class PromptSpec:
    """How (question, image) becomes token ids, for one model.

    template: `conversation:<name>` (a `templates.TEMPLATES` entry, original LLaVA/VILA/Eagle
        layouts) or `chat_template` (the checkpoint's Jinja template, Hugging Face layouts).
    image_marker: the text the rendered template holds where the image goes.
    insertion: `splice` tokenizes the text around the marker and splices `image_token_id` n times
        (LLaVA's `tokenizer_image_token`); `expand` replaces the marker by
        `expand_prefix + expand_token * n + expand_suffix` and tokenizes the whole string, as
        Hugging Face processors do (then `image_token_id` is `expand_token`'s id).
    """

    template: str
    image_token_id: int
    tokens_per_tile: int
    chat_template: str | None = None
    image_marker: str = IMAGE_PLACEHOLDER
    insertion: str = "splice"
    expand_prefix: str = ""
    expand_token: str = ""
    expand_suffix: str = ""
    add_special_tokens: bool = True
    image_aspect_ratio: str = "resize"
    stop_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PromptSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def check_text(question) -> str:
    """A prompt's text: a str that is valid Unicode (command-line bytes that are not UTF-8 arrive
    as lone surrogates, which no tokenizer takes)."""
    if not isinstance(question, str):
        raise DyVTEError(f"the prompt must be text, not {type(question).__name__}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DyVTEError(f"the prompt is not valid UTF-8 text (bad byte at character {exc.start})") from None
    return question


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's `pad` aspect mode: centre the image on a square canvas of the mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class Processor:
    def __init__(self, tokenizer, image_processor, spec: PromptSpec):
        if spec.image_aspect_ratio not in ("resize", "pad", "square"):
            raise DyVTEError(f"unsupported image_aspect_ratio {spec.image_aspect_ratio!r} (supported: resize, pad)")
        if spec.insertion not in ("splice", "expand"):
            raise DyVTEError(f"unknown image insertion mode {spec.insertion!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.spec = spec

    @property
    def eos_token_ids(self) -> list[int]:
        return self.spec.stop_token_ids

    # -------------------------------------------------------------- text

    def render(self, question: str, has_image: bool) -> str:
        return self.render_chat([Turn("user", question, has_image)])

    def render_chat(self, turns: list[Turn]) -> str:
        """The family's prompt for a conversation (see `chat_turns`), ending in the open assistant turn."""
        spec = self.spec
        system, turns = chat_turns(turns)
        if spec.template.startswith("conversation:"):
            from engines.core.templates import get_template

            pairs = [(t.role, f"{IMAGE_PLACEHOLDER}\n{t.text}" if t.image else t.text) for t in turns]
            text = get_template(spec.template.split(":", 1)[1]).render_chat(pairs, system)
            return text.replace(IMAGE_PLACEHOLDER, spec.image_marker)
        if spec.template == "chat_template":
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
            for t in turns:
                content = ([{"type": "image"}] if t.image else []) + [{"type": "text", "text": t.text}]
                messages.append({"role": t.role, "content": content})
            return self.tokenizer.apply_chat_template(messages, chat_template=spec.chat_template,
                                                      add_generation_prompt=True, tokenize=False)
        raise DyVTEError(f"unknown prompt template kind {spec.template!r}")

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    # -------------------------------------------------------------- image

    def transform(self, image: Image.Image) -> torch.Tensor:
        """Pixel values [tiles, 3, H, W] for one image."""
        if self.spec.image_aspect_ratio == "pad":
            mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            # int(), not round(): LLaVA's (and VILA's) expand2square truncates the mean colour
            image = expand_to_square(image, tuple(int(255 * m) for m in mean))
        out = self.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return out.reshape(-1, *out.shape[-3:])

    # -------------------------------------------------------------- both

    def build(self, question: str, image: Image.Image | None) -> Prompt:
        check_text(question)
        return self._tokenize(self.render(question, image is not None), image)

    def build_chat(self, turns: list[Turn], image: Image.Image | None = None) -> Prompt:
        """A conversation's prompt; `image` is the one a turn marks (`Turn.image`), or None."""
        marked = any(t.image for t in turns)
        if marked != (image is not None):
            raise DyVTEError("the image must be given exactly when a user turn holds it" if marked else
                             "an image was given but no user turn holds it")
        return self._tokenize(self.render_chat(turns), image)

    def _tokenize(self, text: str, image: Image.Image | None) -> Prompt:
        spec = self.spec
        if image is None:
            return Prompt(self._encode(text, spec.add_special_tokens), None, None)
        pixel_values = self.transform(image)
        n = spec.tokens_per_tile * pixel_values.shape[0]
        if text.count(spec.image_marker) != 1:
            raise DyVTEError(f"the rendered prompt must hold the image marker {spec.image_marker!r} exactly once")
        if spec.insertion == "expand":
            expansion = spec.expand_prefix + spec.expand_token * n + spec.expand_suffix
            ids = self._encode(text.replace(spec.image_marker, expansion), spec.add_special_tokens)
            positions = [i for i, t in enumerate(ids) if t == spec.image_token_id]
            if len(positions) != n or positions[-1] - positions[0] + 1 != n:
                raise DyVTEError(f"expected {n} contiguous image tokens in the prompt, found {len(positions)}")
            start = positions[0]
        else:
            before, _, after = text.partition(spec.image_marker)
            head = self._encode(before, spec.add_special_tokens)
            ids = head + [spec.image_token_id] * n + self._encode(after, False)
            start = len(head)
        return Prompt(ids, (start, start + n), pixel_values)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -------------------------------------------------------------- files

    def save(self, folder: Path) -> None:
        """Tokenizer and image-processor files, loadable by `Processor.load` with the spec."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.image_processor.save_pretrained(folder / "image_processor")

    @classmethod
    def load(cls, folder: Path, spec: PromptSpec) -> "Processor":
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = Path(folder)
        tok = wrap_load_errors(f"tokenizer from {folder}", AutoTokenizer.from_pretrained,
                               str(folder / "tokenizer"), local_files_only=True)
        img = wrap_load_errors(f"image processor from {folder}", AutoImageProcessor.from_pretrained,
                               str(folder / "image_processor"), local_files_only=True)
        return cls(tok, img, spec)
