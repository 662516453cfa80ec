"""InternVL (InternVL2 / 2.5 / 3, Hugging Face layout): InternViT, pixel shuffle, MLP projector, Qwen2/Llama.

Native layout: one Hugging Face folder (`OpenGVLab/InternVL3-1B-hf` style): `config.json` with
`model_type` `internvl` (`InternVLForConditionalGeneration`, a `vision_config` and a `text_config`),
safetensors weights (published key names `vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`; transformers maps them on load), the
tokenizer with its chat template, `preprocessor_config.json` (GotOcr2 image processor) and
`processor_config.json`.

The model is transformers' `InternVLForConditionalGeneration`; the adapter only regroups it:
`InternVLVision` runs the tower, drops the CLS token, pixel-shuffles the patch grid and projects,
with every shape fixed at construction so nothing in it depends on the data. `InternVLProcessor`
cannot be constructed without torchvision (its video processor), so the prompt is expressed as a
`PromptSpec` that reproduces it: the chat template's `<IMG_CONTEXT>` becomes
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, tiles from the image processor's
dynamic tiling (`crop_to_patches`, which `InternVLProcessor` always switches on; a thumbnail is
added when there is more than one tile).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from exporter.dyvte.router import has_router_weights, load_routers, seeded_routers
from engines.core.errors import DyVTEError
from exporter.models.base import Family, MultimodalModel, assemble, preset_text_config, seeded
from engines.core.errors import wrap_load_errors
from exporter.models.checkpoint import hf_from_pretrained, read_json, require_dir
from exporter.models.decoder import SUPPORTED_TEXT_MODEL_TYPES
from engines.core.prompt import PromptSpec
from exporter.models.tokenizer import SPECIAL_TOKENS, build_word_tokenizer

# What InternVLProcessor reads from the tokenizer, with the published tokens as fallbacks.
IMAGE_TOKENS = {"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>"}
TEXT_CONFIGS = {"qwen2": Qwen2Config, "llama": LlamaConfig}


class InternVLVision(nn.Module):
    """InternViT -> drop CLS -> pixel shuffle -> projector: [tiles, 3, H, W] -> [tiles, V, hidden].

    Mirrors `InternVLModel.get_image_features` with the shapes taken from the config: the tower runs
    only the layers up to `vision_feature_layer` (the last one also applies the tower's final norm,
    as transformers reads `last_hidden_state` there), the patch grid side and the shuffle factor are
    plain ints, and the batch (tile) axis is the only free one.
    """

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layer: int, downsample_ratio: float):
        super().__init__()
        cfg = tower.config
        num_layers = cfg.num_hidden_layers
        if not -num_layers - 1 <= feature_layer <= num_layers:
            raise DyVTEError(f"vision_feature_layer {feature_layer} is outside the {num_layers}-layer vision tower")
        # hidden_states[k]: 0 is the embedding output, k the output of layer k-1
        self.depth = feature_layer % (num_layers + 1)
        self.final_norm = feature_layer == -1
        image_h, image_w = _pair(cfg.image_size)
        patch_h, patch_w = _pair(cfg.patch_size)
        if image_h != image_w or patch_h != patch_w:
            raise DyVTEError(f"non-square vision input ({cfg.image_size} px, patch {cfg.patch_size}) is not supported")
        self.side = image_h // patch_h
        factor = round(1 / downsample_ratio)
        if abs(factor * downsample_ratio - 1) > 1e-6 or self.side % factor:
            raise DyVTEError(
                f"downsample_ratio {downsample_ratio} does not divide the {self.side}x{self.side} patch grid"
            )
        self.factor = factor
        self.tower = tower
        self.projector = projector

    @property
    def tokens_per_tile(self) -> int:
        return (self.side // self.factor) ** 2

    def pixel_shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """[n, side*side, c] -> [n, (side/f)^2, c*f*f], the channel order of transformers' `pixel_shuffle`."""
        side, f, c = self.side, self.factor, x.shape[-1]
        x = x.reshape(-1, side, side // f, c * f)  # neighbours along a row merged
        x = x.permute(0, 2, 1, 3).reshape(-1, side // f, side // f, c * f * f)  # then along a column
        return x.permute(0, 2, 1, 3).reshape(-1, (side // f) ** 2, c * f * f)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower.embeddings(pixel_values)
        for layer in self.tower.encoder.layer[: self.depth]:
            hidden = layer(hidden)
        if self.final_norm:
            hidden = self.tower.layernorm(hidden)
        return self.projector(self.pixel_shuffle(hidden[:, 1:, :]))


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _size_of(image_processor) -> tuple[int, int]:
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    return get("height"), get("width")


# Built-in presets as data: tiny shapes of the InternVL3 architecture. 56 px tiles, patch 7: an
# 8x8 grid, pixel-shuffled to 16 tokens a tile (InternVL3: 448 px, patch 14 -> 256).
PRESET_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nyou are a helpful language and vision assistant .<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRESETS = {
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=56, patch_size=7),
        text_model_type="qwen2",
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        max_patches=4,
    ),
    # InternVL3-8B's shapes (InternViT-300M at 448 px, 256 tokens a tile, Qwen2.5-7B) for export-bench,
    # built on the meta device; one tile an image (the published processor allows 12) keeps validation short.
    "internvl-8b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=448, patch_size=14),
        text_model_type="qwen2",
        llm=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, vocab_size=151674),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        max_patches=1,
    ),
    "internvl-small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=448, patch_size=14),
        text_model_type="qwen2",
        llm=dict(hidden_size=896, intermediate_size=4736, num_hidden_layers=7, num_attention_heads=7,
                 num_key_value_heads=1, max_position_embeddings=32768, rms_norm_eps=1e-6, vocab_size=151674),
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        max_patches=1,
    ),
    "tiny-llama": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                    image_size=56, patch_size=7),
        text_model_type="llama",
        llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6),
        downsample_ratio=0.5,
        vision_feature_layer=-2,
        max_patches=4,
    ),
}


def preset_tokenizer() -> PreTrainedTokenizerFast:
    """The word tokenizer plus ChatML markers, with the named image/video tokens the -hf tokenizers carry."""
    words = build_word_tokenizer(["<|im_start|>", "<|im_end|>", "<video>"])
    extra = [t for t in SPECIAL_TOKENS if t not in ("<unk>", "<s>", "</s>", "<pad>")]
    extra += ["<|im_start|>", "<|im_end|>", "<video>"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=extra,
        model_specific_special_tokens={**IMAGE_TOKENS, "video_token": "<video>"},
    )
    tok.chat_template = PRESET_CHAT_TEMPLATE
    return tok


class InternVLParts:
    """The native pieces, kept so a model can be written back as a Hugging Face folder."""

    def __init__(self, hf: InternVLForConditionalGeneration, tokenizer, image_processor, chat_template: str,
                 image_seq_length: int | None = None):
        self.hf, self.tokenizer, self.image_processor = hf, tokenizer, image_processor
        self.chat_template, self.image_seq_length = chat_template, image_seq_length

    def save(self, folder: Path) -> Path:
        """The published `-hf` layout: weights, tokenizer, image processor, processor config, template."""
        folder = Path(folder)
        self.hf.save_pretrained(folder)
        return self._save_processing(folder)

    def save_files(self, folder: Path) -> Path:
        """Everything of the layout but the weights: config, tokenizer, processor files."""
        self.hf.config.save_pretrained(folder)
        return self._save_processing(Path(folder))

    def published_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sub-folder -> {key in the published layout: tensor} (meta tensors allowed)."""
        from exporter.streaming import published_names

        state = self.hf.state_dict()
        return {"": {published_names(self.hf, state)[k]: v for k, v in state.items()}}

    def _save_processing(self, folder: Path) -> Path:
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        processor_config = {"processor_class": "InternVLProcessor"}
        if self.image_seq_length is not None:
            processor_config["image_seq_length"] = self.image_seq_length
        (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
        (folder / "chat_template.jinja").write_text(self.chat_template)
        return folder


def _stop_token_ids(tokenizer, extra_ids) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab["<|im_end|>"]] if "<|im_end|>" in vocab else []
    for i in [tokenizer.eos_token_id, *extra_ids]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


def _assemble(parts: InternVLParts, source: dict, extra_stop_ids=()) -> MultimodalModel:
    hf, tok, image_processor = parts.hf, parts.tokenizer, parts.image_processor
    cfg = hf.config
    if not isinstance(cfg.vision_feature_layer, int):
        raise DyVTEError(f"vision_feature_layer {cfg.vision_feature_layer!r} (several layers) is not supported")
    if cfg.vision_feature_select_strategy != "default":
        raise DyVTEError(
            f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} is not supported (only 'default')"
        )
    vision = InternVLVision(hf.model.vision_tower, hf.model.multi_modal_projector, cfg.vision_feature_layer,
                            cfg.downsample_ratio).eval()
    per_tile = vision.tokens_per_tile
    if parts.image_seq_length is not None and parts.image_seq_length != per_tile:
        raise DyVTEError(
            f"processor_config.json says {parts.image_seq_length} image tokens a tile, the vision model gives "
            f"{per_tile} ({vision.side}x{vision.side} patches, downsample_ratio {cfg.downsample_ratio})"
        )
    if not type(image_processor).__name__.startswith("GotOcr2ImageProcessor"):
        raise DyVTEError(f"unsupported InternVL image processor {type(image_processor).__name__} (expected GotOcr2)")
    tile = vision.side * _pair(hf.config.vision_config.patch_size)[0]
    if _size_of(image_processor) != (tile, tile):
        raise DyVTEError(
            f"the image processor makes {_size_of(image_processor)} px tiles, the vision model wants {tile}"
        )
    image_processor.crop_to_patches = True  # InternVLProcessor passes this on every call

    names = {key: str(getattr(tok, key, None) or default) for key, default in IMAGE_TOKENS.items()}
    marker = names["context_image_token"]
    image_token_id = tok.convert_tokens_to_ids(marker)
    if image_token_id != cfg.image_token_id:
        raise DyVTEError(
            f"the tokenizer gives {marker} id {image_token_id}, the config's image_token_id is {cfg.image_token_id}"
        )
    # InternVLProcessor.apply_chat_template adds special tokens unless the rendered prompt starts with BOS.
    probe = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}],
                                    chat_template=parts.chat_template, add_generation_prompt=True, tokenize=False)
    add_special = not (tok.bos_token is not None and probe.startswith(tok.bos_token))
    spec = PromptSpec(
        template="chat_template",
        chat_template=parts.chat_template,
        image_token_id=image_token_id,
        tokens_per_tile=per_tile,
        image_marker=marker,
        insertion="expand",
        expand_prefix=names["start_image_token"],
        expand_token=marker,
        expand_suffix=names["end_image_token"],
        add_special_tokens=add_special,
        stop_token_ids=_stop_token_ids(tok, extra_stop_ids),
    )
    return assemble("internvl", vision, tok, image_processor, spec,
                    (hf.model.language_model, hf.lm_head, cfg.text_config), source, parts)


def _read_chat_template(folder: Path, tokenizer) -> str:
    """The template InternVLProcessor would use: chat_template.json, chat_template.jinja, then the tokenizer's."""
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        template = read_json(legacy).get("chat_template")
    elif (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    else:
        proc = folder / "processor_config.json"
        template = (read_json(proc).get("chat_template") if proc.is_file() else None) or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise DyVTEError(f"{folder} has no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")
    return template


class InternVL(Family):
    name = "internvl"
    description = "InternVL2/2.5/3 (Hugging Face layout): InternViT + pixel shuffle + MLP projector + Qwen2/Llama"

    @seeded
    def preset(self, seed: int = 0, name: str = "tiny") -> MultimodalModel:
        if name not in PRESETS:
            raise DyVTEError(f"unknown InternVL preset {name!r}; choose from {', '.join(PRESETS)}")
        p = PRESETS[name]
        tok = preset_tokenizer()
        text_config = preset_text_config(tok, TEXT_CONFIGS[p["text_model_type"]], **p["llm"])
        vision_config = InternVLVisionConfig(**p["vision"])
        side = p["vision"]["image_size"] // p["vision"]["patch_size"]
        per_tile = int(side * p["downsample_ratio"]) ** 2
        config = InternVLConfig(
            vision_config=vision_config, text_config=text_config, tie_word_embeddings=False,
            image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"]),
            image_seq_length=per_tile, downsample_ratio=p["downsample_ratio"],
            vision_feature_layer=p["vision_feature_layer"],
        )
        hf = InternVLForConditionalGeneration(config).eval()
        with torch.no_grad():  # transformers zero-initialises these; give them content to test against
            emb = hf.model.vision_tower.embeddings
            emb.cls_token.normal_(0, 0.5)
            emb.position_embeddings.normal_(0, 0.5)
        size = p["vision"]["image_size"]
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": size, "width": size}, crop_to_patches=True, max_patches=p["max_patches"],
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        )
        parts = InternVLParts(hf, tok, image_processor, PRESET_CHAT_TEMPLATE, image_seq_length=per_tile)
        model = _assemble(parts, {"preset": name, "seed": seed})
        model.attach_routers(seeded_routers(text_config.num_hidden_layers, text_config.hidden_size, seed))
        return model

    def load(self, checkpoint: Path, dtype=torch.float32, chat_template: str | None = None, lazy: bool = False,
             **_) -> MultimodalModel:
        """`lazy`: the weights stay on disk (see `exporter.streaming`); vision parts under
        `EAGER_TOWER_BYTES` are read at once."""
        checkpoint = require_dir(Path(checkpoint), "InternVL checkpoint")
        root = read_json(checkpoint / "config.json")
        model_type = root.get("model_type")
        if model_type != "internvl":
            if model_type == "internvl_chat" or "InternVLChatModel" in (root.get("architectures") or []):
                raise DyVTEError(
                    f"{checkpoint} is in the original InternVL layout (custom code, model_type 'internvl_chat'); "
                    "only the Hugging Face layout (model_type 'internvl', the '-hf' repos) is supported"
                )
            raise DyVTEError(
                f"{checkpoint} is not an InternVL checkpoint (model_type {model_type!r}, expected 'internvl' "
                "with InternVLForConditionalGeneration weights)"
            )
        text_type = (root.get("text_config") or {}).get("model_type", "qwen2")
        if text_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise DyVTEError(
                f"unsupported InternVL language model {text_type!r}; supported: {', '.join(SUPPORTED_TEXT_MODEL_TYPES)}"
            )
        if lazy:
            from exporter.streaming import lazy_pretrained, make_real

            hf = lazy_pretrained(InternVLForConditionalGeneration, checkpoint, "InternVL model", dtype)
            make_real(hf.model.vision_tower)
            make_real(hf.model.multi_modal_projector)
        else:
            hf = hf_from_pretrained(InternVLForConditionalGeneration, checkpoint, "InternVL model", dtype)
        tokenizer = wrap_load_errors(
            f"tokenizer from {checkpoint}", AutoTokenizer.from_pretrained, str(checkpoint), local_files_only=True
        )
        image_processor = wrap_load_errors(
            f"image processor from {checkpoint}", AutoImageProcessor.from_pretrained, str(checkpoint),
            local_files_only=True,
        )
        template = chat_template or _read_chat_template(checkpoint, tokenizer)
        proc_file = checkpoint / "processor_config.json"
        image_seq_length = read_json(proc_file).get("image_seq_length") if proc_file.is_file() else None
        gen_file = checkpoint / "generation_config.json"
        gen_eos = read_json(gen_file).get("eos_token_id") if gen_file.is_file() else None
        extra_stop = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        parts = InternVLParts(hf, tokenizer, image_processor, template, image_seq_length)
        model = _assemble(parts, {"checkpoint": str(checkpoint)}, extra_stop)
        if has_router_weights(checkpoint):
            model.attach_routers(load_routers(checkpoint, model.shape.num_layers, model.shape.hidden_size))
        return model
