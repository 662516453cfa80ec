"""InternVL adapter: a folder in the published Hugging Face layout loads, and the decomposition equals
transformers' own InternVLForConditionalGeneration (logits) and InternVLProcessor (prompt ids)."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    InternVLForConditionalGeneration,
    InternVLProcessor,
)

from engines.backends.torch_backend import TorchBackend
from engines.orchestrator import Runtime
from exporter.dyvte.router import save_routers, seeded_routers
from engines.core.errors import DyVTEError
from exporter.models import load_model
from exporter.models.internvl import PRESETS, InternVL
from engines.core.prompt import Processor, PromptSpec
from helpers import random_image, recompute_logits, splice

TOKENS_PER_TILE = 16  # preset tiles: 56 px, patch 7 -> 8x8 grid, pixel shuffle 0.5 -> 4x4
QUESTION = "what color is the big circle?"
# (image size, tiles the GotOcr2 dynamic tiling gives with max_patches=4)
IMAGES = {"one_tile": ((40, 30), 1), "wide": ((112, 56), 3), "tall": ((56, 170), 4)}


def image(kind: str, seed: int = 1):
    return random_image(seed, IMAGES[kind][0])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """preset name -> a tiny checkpoint folder written as the published `-hf` repos are."""
    made = {}

    def get(name: str):
        if name not in made:
            folder = InternVL().preset(seed=4, name=name).native.save(tmp_path_factory.mktemp("internvl") / name)
            # the published preprocessor_config.json leaves tiling off; InternVLProcessor switches it on
            cfg_path = folder / "preprocessor_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["crop_to_patches"] = False
            cfg_path.write_text(json.dumps(cfg))
            made[name] = folder
        return made[name]

    return get


@pytest.fixture(scope="module")
def folder(folders):
    return folders("tiny")


@pytest.fixture(scope="module")
def model(folder):
    return InternVL().load(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return load_reference(folder)


@pytest.fixture
def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "internvl")


def load_reference(folder):
    return InternVLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()


def first_logits(model, prompt, policy="none"):
    return Runtime(TorchBackend(model), model.processor).generate([prompt], policy)[0].first_logits


@torch.no_grad()
def transformers_logits(reference, prompt):
    out = reference(input_ids=torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values)
    return out.logits[0, -1]


class StubVideoInternVLProcessor(InternVLProcessor):
    """transformers' own InternVLProcessor, with its video processor (needs torchvision) replaced by a
    stub object: only the class check is skipped; images and text go through the real code."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def internvl_processor(folder, chat_template):
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    img = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    seq = json.loads((folder / "processor_config.json").read_text())["image_seq_length"]
    return StubVideoInternVLProcessor(image_processor=img, tokenizer=tok, video_processor=object(),
                                      image_seq_length=seq, chat_template=chat_template)


# ----------------------------------------------------------------------------- layout


def test_folder_has_published_key_layout(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    published = {
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
        "vision_tower.embeddings.patch_embeddings.projection.weight",
        "vision_tower.encoder.layer.0.attention.q_proj.weight",
        "vision_tower.encoder.layer.0.lambda_1",
        "multi_modal_projector.layer_norm.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.weight",
    }
    assert published <= keys
    assert not any(k.startswith("model.") for k in keys)  # not the in-memory module names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "internvl" and config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["tie_word_embeddings"] is False and config["text_config"]["model_type"] == "qwen2"


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("preset,text_type", [("tiny", "qwen2"), ("tiny-llama", "llama")])
def test_none_policy_logits_equal_transformers(folders, preset, text_type):
    folder = folders(preset)
    model, reference = InternVL().load(folder), load_reference(folder)
    assert model.decoder.config.model_type == text_type
    assert reference.config.vision_feature_layer == PRESETS[preset]["vision_feature_layer"]
    prompt = model.processor.build(QUESTION, image("one_tile"))
    assert prompt.pixel_values.shape == (1, 3, 56, 56) and prompt.num_visual == TOKENS_PER_TILE
    ours, ref = first_logits(model, prompt), transformers_logits(reference, prompt)
    # measured max abs diff: ~2e-7 (qwen2 and llama)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert ref.abs().max() > 1e-2  # the comparison is not between two near-zero vectors


@pytest.mark.parametrize("kind", ["wide", "tall"])
def test_multi_tile_image_is_one_contiguous_span_and_logits_equal_transformers(model, reference, kind):
    prompt = model.processor.build(QUESTION, image(kind, seed=2))
    tiles = IMAGES[kind][1]
    assert prompt.pixel_values.shape[0] == tiles  # the grid's tiles plus the thumbnail
    assert prompt.num_visual == TOKENS_PER_TILE * tiles
    tok = model.processor.tokenizer
    s, e = prompt.visual_span
    ids = prompt.input_ids
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids[s:e] == [context] * (e - s) and ids.count(context) == e - s
    assert ids[s - 1] == tok.convert_tokens_to_ids("<img>") and ids[e] == tok.convert_tokens_to_ids("</img>")
    ours, ref = first_logits(model, prompt), transformers_logits(reference, prompt)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)  # measured: ~2e-7


@pytest.mark.parametrize("exit_layer", [0, 2])
def test_static_exit_equals_recompute_without_visual_tokens(model, reference, exit_layer):
    prompt = model.processor.build(QUESTION, image("wide", seed=3))
    result = Runtime(TorchBackend(model), model.processor).generate([prompt], f"layer:{exit_layer}")[0]
    assert result.exit_layer == exit_layer
    with torch.no_grad():  # visual features from transformers' own get_image_features, not the adapter's
        visual = reference.get_image_features(pixel_values=prompt.pixel_values).pooler_output
        embeds = splice(reference.model.language_model.embed_tokens, prompt.input_ids, prompt.visual_span,
                        visual.reshape(-1, visual.shape[-1]))
    ref = recompute_logits(reference.model.language_model, reference.lm_head, embeds, prompt.visual_span,
                           exit_layer)[0, -1]
    torch.testing.assert_close(result.first_logits, ref, rtol=0, atol=1e-5)  # measured: ~3e-7
    assert (result.first_logits - first_logits(model, prompt)).abs().max() > 1e-3  # the exit did change something


def test_vision_module_exports_with_a_free_tile_axis(model, reference):
    """No data-dependent control flow: torch.export with a dynamic tile count, then a different count."""
    vision = model.vision
    two, five = torch.randn(2, 3, 56, 56), torch.randn(5, 3, 56, 56)
    exported = torch.export.export(vision, (two,), dynamic_shapes={"pixel_values": {0: torch.export.Dim("tiles")}})
    with torch.no_grad():
        got = exported.module()(five)
        eager = vision(five)
        theirs = reference.get_image_features(pixel_values=five).pooler_output
    assert got.shape == (5, TOKENS_PER_TILE, model.shape.hidden_size)
    torch.testing.assert_close(got, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(eager, theirs, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- prompt


BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<IMG_CONTEXT>\n{% else %}{{ p['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("kind", ["one_tile", "wide", "tall", None])
@pytest.mark.parametrize("template", ["checkpoint", "starts_with_bos"])
def test_prompt_ids_and_pixels_equal_internvl_processor(folder, kind, template):
    """Against transformers' InternVLProcessor itself (constructed with a stub video processor, see
    StubVideoInternVLProcessor), through its apply_chat_template: same ids, same pixel values."""
    chat_template = (folder / "chat_template.jinja").read_text() if template == "checkpoint" else BOS_TEMPLATE
    model = InternVL().load(folder, chat_template=None if template == "checkpoint" else BOS_TEMPLATE)
    pil = image(kind, seed=5) if kind else None
    prompt = model.processor.build(QUESTION, pil)
    content = ([{"type": "image", "image": pil}] if pil is not None else []) + [{"type": "text", "text": QUESTION}]
    theirs = internvl_processor(folder, chat_template).apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    assert prompt.input_ids == theirs["input_ids"][0].tolist()
    bos = model.processor.tokenizer.bos_token_id
    assert prompt.input_ids.count(bos) == 1 and prompt.input_ids[0] == bos  # BOS once, whichever way it came
    if pil is None:
        assert prompt.visual_span is None and "pixel_values" not in theirs
    else:
        assert prompt.pixel_values.shape[0] == IMAGES[kind][1]
        torch.testing.assert_close(prompt.pixel_values, theirs["pixel_values"], rtol=0, atol=0)


def test_stop_tokens_are_im_end_and_eos(model):
    tok = model.processor.tokenizer
    assert model.processor.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]


def test_processor_round_trips_through_package_files(model, tmp_path):
    model.processor.save(tmp_path / "proc")
    spec = PromptSpec.from_dict(json.loads(json.dumps(model.processor.spec.to_dict())))
    again = Processor.load(tmp_path / "proc", spec)
    a = model.processor.build(QUESTION, image("tall", seed=6))
    b = again.build(QUESTION, image("tall", seed=6))
    assert a.input_ids == b.input_ids and a.visual_span == b.visual_span
    torch.testing.assert_close(a.pixel_values, b.pixel_values, rtol=0, atol=0)
    assert b.pixel_values.shape[0] == IMAGES["tall"][1]  # dynamic tiling survives the files


# ----------------------------------------------------------------------------- other spellings, routers


def test_in_memory_key_names_load_too(model, copy):
    """transformers 4.52+ module names (`model.language_model.*`, `lm_head.weight`) load the same model."""
    path = copy / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for key, value in tensors.items():
        if key == "language_model.lm_head.weight":
            key = "lm_head.weight"
        elif key.startswith("language_model.model."):
            key = "model.language_model." + key[len("language_model.model."):]
        else:
            key = "model." + key
        renamed[key] = value
    save_file(renamed, str(path), metadata={"format": "pt"})
    other = InternVL().load(copy)
    prompt = model.processor.build(QUESTION, image("wide"))
    torch.testing.assert_close(first_logits(other, prompt), first_logits(model, prompt), rtol=0, atol=0)


def test_routers_in_checkpoint_folder_are_attached(copy):
    cfg = json.loads((copy / "config.json").read_text())["text_config"]
    routers = seeded_routers(cfg["num_hidden_layers"], cfg["hidden_size"], seed=9)
    save_routers(routers, copy / "dyvte_routers.safetensors")
    loaded = load_model("internvl", copy)
    assert loaded.routers is not None
    for mine, theirs in zip(loaded.routers.layers, routers.layers):
        torch.testing.assert_close(mine.w1.weight, theirs.w1.weight, rtol=0, atol=0)
        torch.testing.assert_close(mine.w2.weight, theirs.w2.weight, rtol=0, atol=0)


def test_builtin_preset_runs_dynamic_exits_through_registry():
    model = load_model("internvl")
    assert model.family == "internvl" and model.routers is not None
    runtime = Runtime(TorchBackend(model), model.processor)
    prompt = runtime.prepare(QUESTION, image("wide", seed=7))
    result = runtime.generate([prompt], "dynamic")[0]
    decisions = {layer: lg[1] > lg[0] for layer, lg in result.router_logits.items()}
    if result.exit_layer is None:
        assert sorted(decisions) == list(range(model.shape.num_layers - 1)) and not any(decisions.values())
    else:
        assert decisions[result.exit_layer] and sorted(decisions) == list(range(result.exit_layer + 1))


# ----------------------------------------------------------------------------- errors


def test_truncated_weights_are_refused(copy):
    path = copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DyVTEError):
        InternVL().load(copy)


def test_missing_weight_is_named(copy):
    path = copy / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["multi_modal_projector.linear_2.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(DyVTEError, match=r"lacks weights .*multi_modal_projector\.linear_2\.weight"):
        InternVL().load(copy)


def test_other_architecture_is_refused(vila_checkpoint):
    with pytest.raises(DyVTEError, match="not an InternVL checkpoint.*'llava_llama'"):
        InternVL().load(vila_checkpoint)


def test_original_custom_code_layout_is_refused_with_a_reason(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "internvl_chat",
                                                      "architectures": ["InternVLChatModel"]}))
    with pytest.raises(DyVTEError, match="original InternVL layout"):
        InternVL().load(tmp_path)


def test_processor_config_disagreeing_with_vision_is_refused(copy):
    (copy / "processor_config.json").write_text(json.dumps({"image_seq_length": 256}))
    with pytest.raises(DyVTEError, match="256 image tokens a tile.*gives 16"):
        InternVL().load(copy)


@pytest.mark.parametrize("image_turn", [0, 1])
def test_a_conversation_equals_internvl_processor_chat_template(folder, model, image_turn):
    """System + user + assistant + user turns, the image in the first or the last user turn: the
    same ids as transformers' InternVLProcessor.apply_chat_template on the same messages."""
    from engines.core.prompt import Turn

    pil = image("one_tile", seed=6)
    users = ["what is this?", QUESTION]
    turns = [Turn("system", "be brief."), Turn("user", users[0], image_turn == 0), Turn("assistant", "a picture."),
             Turn("user", users[1], image_turn == 1)]
    prompt = model.processor.build_chat(turns, pil)

    def content(text, with_image):
        return ([{"type": "image", "image": pil}] if with_image else []) + [{"type": "text", "text": text}]

    messages = [{"role": "system", "content": [{"type": "text", "text": "be brief."}]},
                {"role": "user", "content": content(users[0], image_turn == 0)},
                {"role": "assistant", "content": [{"type": "text", "text": "a picture."}]},
                {"role": "user", "content": content(users[1], image_turn == 1)}]
    theirs = internvl_processor(folder, (folder / "chat_template.jinja").read_text()).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert prompt.input_ids == theirs["input_ids"][0].tolist()
    torch.testing.assert_close(prompt.pixel_values, theirs["pixel_values"], rtol=0, atol=0)
    # one user turn is exactly `build`
    assert model.processor.build_chat([Turn("user", QUESTION, True)], pil).input_ids == \
        model.processor.build(QUESTION, pil).input_ids
