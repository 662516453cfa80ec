"""LLaVA-1.5 adapter: both on-disk layouts load and equal independent references built from
transformers' own modules (LlavaForConditionalGeneration, LlavaProcessor, CLIPVisionModel,
LlamaForCausalLM). Logits are compared in fp32 with atol 1e-5, rtol 0."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from engines.backends.torch_backend import TorchBackend
from engines.cli import main
from engines.orchestrator import Runtime
from engines.core.errors import DyVTEError
from exporter.models import load_model
from exporter.models.llava import Llava, _keep_file_lm_head
from helpers import random_image, recompute_logits, splice

ATOL = 1e-5
QUESTION = "what color is the big circle?"
VICUNA_HEAD = (
    "<s> a chat between a curious user and an artificial intelligence assistant . the assistant "
    "gives helpful , detailed , and polite answers to the user ' s questions . user :"
)
TOWER_NAME = "openai/clip-vit-large-patch14-336"


def first_logits(model, prompt, policy="none"):
    return Runtime(TorchBackend(model), model.processor).generate([prompt], policy)[0]


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def preset():
    return Llava().preset(seed=4)


@pytest.fixture(scope="module")
def hf_folder(preset, tmp_path_factory):
    return preset.native.save(tmp_path_factory.mktemp("llava") / "llava-1.5-tiny-hf")


@pytest.fixture(scope="module")
def hf_model(hf_folder):
    return Llava().load(hf_folder)


@pytest.fixture(scope="module")
def original(preset, tmp_path_factory):
    """(checkpoint folder with routers, vision tower folder) in the original layout."""
    root = tmp_path_factory.mktemp("llava-orig")
    folder = preset.native.save_original(root / "llava-v1.5-tiny", root / "clip-tower", routers=preset.routers,
                                         vision_tower_name=TOWER_NAME)
    return folder, root / "clip-tower"


@pytest.fixture(scope="module")
def original_model(original):
    folder, tower = original
    return Llava().load(folder, vision_tower=tower)


# --------------------------------------------------------------------------- Hugging Face layout


def test_hf_folder_holds_the_published_key_layout(hf_folder):
    with safe_open(str(hf_folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {
        "language_model.model.layers.0.self_attn.q_proj.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.lm_head.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.weight",
    } <= keys
    published = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
                 "multi_modal_projector.")
    assert all(k.startswith(published) for k in keys), sorted(k for k in keys if not k.startswith(published))


@pytest.mark.parametrize("image_seed,size", [(1, (40, 30)), (2, (30, 30)), (3, (25, 61))])
def test_hf_layout_none_policy_equals_llava_for_conditional_generation(preset, hf_folder, hf_model, image_seed,
                                                                      size):
    model = hf_model
    prompt = model.processor.build(QUESTION, random_image(image_seed, size))
    ours = first_logits(model, prompt).first_logits
    ids = torch.tensor([prompt.input_ids])
    with torch.no_grad():
        in_memory = preset.native.hf(input_ids=ids, pixel_values=prompt.pixel_values).logits[0, -1]
        from_folder = LlavaForConditionalGeneration.from_pretrained(hf_folder).eval()
        by_transformers = from_folder(input_ids=ids, pixel_values=prompt.pixel_values).logits[0, -1]
    # measured: ~1.5e-7 against both
    torch.testing.assert_close(ours, in_memory, rtol=0, atol=ATOL)
    torch.testing.assert_close(ours, by_transformers, rtol=0, atol=ATOL)
    assert in_memory.abs().max() > 0.1  # the comparison is not between two near-zero vectors
    s, e = prompt.visual_span
    assert e - s == 25  # 30 px / patch 6 = 5x5 patches (CLS dropped by the "default" strategy)
    assert [i for i, t in enumerate(prompt.input_ids) if t == preset.native.hf.config.image_token_index] == list(
        range(s, e))


@pytest.mark.parametrize("question,image_seed,size", [
    (QUESTION, 1, (40, 30)),
    ("how many stars are there?", 5, (64, 20)),
    ("describe the picture please", 6, (30, 30)),
])
def test_hf_prompt_equals_llava_processor(hf_folder, hf_model, question, image_seed, size):
    """LlavaProcessor (constructable without torchvision: its image processor is the PIL variant)
    from the folder's own tokenizer, image processor and chat template, with llava-1.5's expansion
    settings, gives the same ids and pixel values."""
    model = hf_model
    tokenizer = AutoTokenizer.from_pretrained(hf_folder)
    image_processor = AutoImageProcessor.from_pretrained(hf_folder)
    template = json.loads((hf_folder / "chat_template.json").read_text())["chat_template"]
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=6,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    image = random_image(image_seed, size)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == f"USER: <image>\n{question} ASSISTANT:"
    expected = processor(text=text, images=image, return_tensors="pt")
    prompt = model.processor.build(question, image)
    assert prompt.input_ids == expected["input_ids"][0].tolist()
    torch.testing.assert_close(prompt.pixel_values, expected["pixel_values"], rtol=0, atol=0)
    assert model.processor.eos_token_ids == [tokenizer.eos_token_id]


def test_config_that_ties_embeddings_keeps_the_files_separate_lm_head(preset, hf_folder, tmp_path):
    folder = shutil.copytree(hf_folder, tmp_path / "tied")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    cfg["text_config"]["tie_word_embeddings"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    hf = preset.native.hf
    assert not torch.equal(hf.lm_head.weight, hf.model.language_model.embed_tokens.weight)
    model = Llava().load(folder)
    torch.testing.assert_close(model.decoder.lm_head.weight, hf.lm_head.weight, rtol=0, atol=0)
    prompt = model.processor.build(QUESTION, random_image(1))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([prompt.input_ids]), pixel_values=prompt.pixel_values).logits[0, -1]
    torch.testing.assert_close(first_logits(model, prompt).first_logits, ref, rtol=0, atol=ATOL)


def test_a_head_tied_on_load_is_replaced_by_the_files_own(tmp_path):
    """The guard for transformers versions that tie despite a separate head in the file (5.24 does not)."""
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    stored = torch.randn(10, 4)
    save_file({"language_model.lm_head.weight": stored}, str(tmp_path / "model.safetensors"))
    _keep_file_lm_head(head, embed, tmp_path, ("language_model.lm_head.weight", "lm_head.weight"))
    torch.testing.assert_close(head.weight, stored, rtol=0, atol=0)
    assert head.weight.data_ptr() != embed.weight.data_ptr()
    same = nn.Linear(4, 10, bias=False)
    same.weight = embed.weight
    save_file({"lm_head.weight": embed.weight.detach().clone()}, str(tmp_path / "model.safetensors"))
    _keep_file_lm_head(same, embed, tmp_path, ("language_model.lm_head.weight", "lm_head.weight"))
    assert same.weight.data_ptr() == embed.weight.data_ptr()  # a truly tied checkpoint stays tied


# --------------------------------------------------------------------------- original layout


def llava_expand2square(image: Image.Image, mean) -> Image.Image:
    """The original code base's `pad` mode: the mean colour as int(x * 255), image centred."""
    fill = tuple(int(x * 255) for x in mean)
    w, h = image.size
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


class HandAssembledLlava:
    """LLaVA-1.5's forward from the files, with transformers modules and no exporter code."""

    def __init__(self, folder, tower_folder):
        cfg = json.loads((folder / "config.json").read_text())
        tensors = load_file(str(folder / "model.safetensors"))
        self.tower = CLIPVisionModel.from_pretrained(tower_folder).eval()
        self.fc1 = nn.Linear(cfg["mm_hidden_size"], cfg["hidden_size"])
        self.fc2 = nn.Linear(cfg["hidden_size"], cfg["hidden_size"])
        for fc, i in ((self.fc1, 0), (self.fc2, 2)):
            fc.weight.data = tensors[f"model.mm_projector.{i}.weight"]
            fc.bias.data = tensors[f"model.mm_projector.{i}.bias"]
        text = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in ("model_type", "architectures")}
        self.llm = LlamaForCausalLM(LlamaConfig(**text)).eval()
        extra = ("model.mm_projector.", "model.visual_gates_router.")
        lm = {k: v for k, v in tensors.items() if not k.startswith(extra)}
        self.llm.load_state_dict(lm, strict=True)
        self.tensors = tensors

    @torch.no_grad()
    def visual(self, pixel_values):
        feats = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        return self.fc2(nn.functional.gelu(self.fc1(feats)))[0]

    @torch.no_grad()
    def logits(self, prompt):
        embeds = splice(self.llm.model.embed_tokens, prompt.input_ids, prompt.visual_span,
                        self.visual(prompt.pixel_values))
        return self.llm(inputs_embeds=embeds).logits[0, -1]


@pytest.fixture(scope="module")
def hand(original):
    return HandAssembledLlava(*original)


@pytest.mark.parametrize("image_seed,size", [(1, (40, 30)), (3, (25, 61))])
def test_original_layout_none_policy_equals_hand_assembly(original_model, hand, image_seed, size):
    prompt = original_model.processor.build(QUESTION, random_image(image_seed, size))
    ref = hand.logits(prompt)
    ours = first_logits(original_model, prompt).first_logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=ATOL)  # measured: ~1e-7
    assert ref.abs().max() > 0.1


def test_original_layout_prompt_is_vicuna_with_image_spliced_and_padded(original_model, original):
    image = random_image(1, (40, 30))
    prompt = original_model.processor.build(QUESTION, image)
    s, e = prompt.visual_span
    assert e - s == 25 and set(prompt.input_ids[s:e]) == {-200}
    tok = original_model.processor.tokenizer
    assert tok.decode(prompt.input_ids[:s]) == VICUNA_HEAD
    assert tok.decode(prompt.input_ids[e:]) == "what color is the big circle ? assistant :"
    assert original_model.processor.eos_token_ids == [tok.eos_token_id]
    # image_aspect_ratio "pad": centred on the mean colour as LLaVA computes it, then the CLIP processor
    image_processor = AutoImageProcessor.from_pretrained(original[1])
    expected = image_processor(images=llava_expand2square(image, image_processor.image_mean),
                               return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(prompt.pixel_values, expected, rtol=0, atol=0)


def test_original_layout_attaches_the_files_routers(original_model, hand):
    routers = original_model.routers
    assert routers is not None and len(routers) == 4
    for layer, router in enumerate(routers.layers):
        for name in ("w1", "w2"):
            stored = hand.tensors[f"model.visual_gates_router.{layer}.{name}.weight"]
            torch.testing.assert_close(getattr(router, name).weight, stored, rtol=0, atol=0)


def test_original_layout_reads_a_full_clip_model_tower_folder(preset, original, original_model, tmp_path):
    """openai/clip-vit-large-patch14-336 is a CLIPModel folder (text half included): it loads too."""
    folder, tower_folder = original
    tower = CLIPVisionModel.from_pretrained(tower_folder)
    clip = CLIPModel(CLIPConfig(
        vision_config=tower.config.to_dict(),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=8,
    ))
    clip.vision_model.load_state_dict(tower.state_dict())
    full = tmp_path / "clip-full"
    clip.save_pretrained(full)
    shutil.copy(tower_folder / "preprocessor_config.json", full)
    assert json.loads((full / "config.json").read_text())["model_type"] == "clip"
    model = Llava().load(folder, vision_tower=full)
    prompt = model.processor.build(QUESTION, random_image(1))
    a = first_logits(model, prompt).first_logits
    b = first_logits(original_model, prompt).first_logits
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)


# --------------------------------------------------------------------------- exits


@pytest.mark.parametrize("layout,k", [("hf", 0), ("hf", 2), ("original", 1)])
def test_static_exit_equals_recompute_without_visual_tokens(preset, original_model, layout, k):
    model = preset if layout == "hf" else original_model
    parts = model.native
    prompt = model.processor.build(QUESTION, random_image(1))
    result = first_logits(model, prompt, f"layer:{k}")
    assert result.exit_layer == k
    embeds = splice(parts.llm_base.embed_tokens, prompt.input_ids, prompt.visual_span,
                    model.encode_images(prompt.pixel_values))
    ref = recompute_logits(parts.llm_base, parts.lm_head, embeds, prompt.visual_span, k)[0, -1]
    torch.testing.assert_close(result.first_logits, ref, rtol=0, atol=ATOL)
    # the exit really changed the computation
    assert max_diff(result.first_logits, first_logits(model, prompt).first_logits) > 1e-3


# --------------------------------------------------------------------------- CLI and errors


def test_cli_runs_original_layout_with_vision_tower_and_its_routers(capsys, original, image_file):
    folder, tower = original
    code = main(["run", "--model", "llava", "--checkpoint", str(folder), "--vision-tower", str(tower),
                 "--image", str(image_file), "--prompt", "what color?", "--max-new-tokens", "2", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0
    obj = json.loads(out)
    s, e = obj["visual_span"]
    assert e - s == 25 and obj["exit_policy"] == "dynamic" and len(obj["router_logits"]) >= 1


def test_missing_vision_tower_is_a_one_line_error(capsys, original, image_file):
    folder, _ = original
    with pytest.raises(DyVTEError, match=r"--vision-tower.*") as info:
        Llava().load(folder)
    assert TOWER_NAME in str(info.value) and "\n" not in str(info.value)
    code = main(["run", "--model", "llava", "--checkpoint", str(folder), "--image", str(image_file),
                 "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("error: ") and "--vision-tower" in err.splitlines()[-1]


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_truncated_weights_file(hf_folder, original, tmp_path, layout):
    src = hf_folder if layout == "hf" else original[0]
    folder = shutil.copytree(src, tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(DyVTEError, match=r"truncated or damaged|cannot load LLaVA") as info:
        load_model("llava", folder, vision_tower=original[1] if layout == "original" else None)
    assert "\n" not in str(info.value)


def test_vila_folder_is_refused_with_a_hint(vila_checkpoint):
    with pytest.raises(DyVTEError, match="--model vila"):
        Llava().load(vila_checkpoint)


def test_vision_tower_of_the_wrong_width_is_named(original, tmp_path):
    folder, tower_folder = original
    other = tmp_path / "wide-tower"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=2, image_size=30, patch_size=6)).save_pretrained(other)
    shutil.copy(tower_folder / "preprocessor_config.json", other)
    with pytest.raises(DyVTEError, match="mm_hidden_size 32"):
        Llava().load(folder, vision_tower=other)


def test_hf_layout_refuses_original_only_options(hf_folder, original):
    with pytest.raises(DyVTEError, match="original LLaVA layout"):
        Llava().load(hf_folder, vision_tower=original[1])


def test_preset_is_registered_and_seeded():
    a, b = load_model("llava"), Llava().preset(seed=0)
    prompt = a.processor.build(QUESTION, random_image(1))
    assert a.routers is not None and len(a.routers) == a.shape.num_layers == 4
    torch.testing.assert_close(first_logits(a, prompt).first_logits, first_logits(b, prompt).first_logits,
                               rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_vision_module_exports_without_data_dependent_branches(preset, original_model, layout):
    vision = (preset if layout == "hf" else original_model).vision
    pixels = torch.randn(2, 3, 30, 30)
    program = torch.export.export(vision, (pixels,))
    with torch.no_grad():
        want = vision(pixels)
        torch.testing.assert_close(program.module()(pixels), want, rtol=0, atol=1e-6)
    assert want.shape == (2, 25, 64)
