"""Independent references the tests compare against (transformers modules only, no exporter code)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn


def random_image(seed: int, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@torch.no_grad()
def recompute_logits(base: nn.Module, lm_head: nn.Module, embeds: torch.Tensor,
                     visual_span: tuple[int, int] | None, exit_layer: int | None) -> torch.Tensor:
    """DyVTE's exit from scratch with a transformers base model, no cache: run the full sequence
    to layer K, delete the visual rows (keeping the original position ids), run the rest.
    Returns logits of the positions that remain ([1, S', vocab])."""
    seq = embeds.shape[1]
    positions = torch.arange(seq)[None]
    out = base(inputs_embeds=embeds, position_ids=positions, output_hidden_states=True, use_cache=False)
    if exit_layer is None or visual_span is None:
        return lm_head(out.last_hidden_state)
    hidden = out.hidden_states[exit_layer + 1]  # [0] is the embedding output
    keep = [i for i in range(seq) if not visual_span[0] <= i < visual_span[1]]
    layers = base.layers
    base.layers = nn.ModuleList(list(layers)[exit_layer + 1:])
    try:
        # An explicit mask: without one, transformers reads the position gap as two packed sequences.
        ones = torch.ones(1, len(keep), dtype=torch.long)
        tail = base(inputs_embeds=hidden[:, keep], position_ids=positions[:, keep], attention_mask=ones,
                    use_cache=False)
    finally:
        base.layers = layers
    return lm_head(tail.last_hidden_state)


def splice(embed: nn.Module, input_ids: list[int], visual_span, visual: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the visual embeddings written over the image positions."""
    ids = torch.tensor(input_ids).clamp(min=0)[None]
    out = embed(ids).clone()
    if visual_span is not None:
        out[0, visual_span[0]:visual_span[1]] = visual
    return out


@torch.no_grad()
def routers_with_exits(runtime, prompts, targets, margin: float = 5.0, inner: int = 64):
    """Routers fitted (least squares on fixed random GELU features of each layer's real hidden
    states) so that prompt i exits after layer targets[i] (None: never), with router logits of
    +-margin: far from any tie that float noise could flip. Works for any family's runtime."""
    from engines.core.dyvte import router_features, text_feature_weights
    from exporter.dyvte.router import Routers

    shape = runtime.backend.shape
    states: list[dict[int, torch.Tensor]] = [{} for _ in prompts]

    def observe(stage, sample, tensor):
        if stage.startswith("layers "):
            last = int(stage.split("-")[-1])
            states[sample][last] = tensor.float()

    runtime.generate(prompts, "none", observe=observe)
    torch.manual_seed(0)
    routers = Routers(shape.num_layers, shape.hidden_size, inner=inner)
    for layer, router in enumerate(routers.layers):
        if not all(layer in s for s in states):
            continue
        feats = []
        for prompt, s in zip(prompts, states):
            hidden = s[layer][None]
            weights = text_feature_weights(hidden.shape[1], torch.tensor([prompt.visual_span[1]]),
                                           torch.tensor([hidden.shape[1]]))
            feats.append(router_features(hidden, weights)[0])
        inner_act = router.act(router.w1(torch.stack(feats)))
        want = torch.tensor([margin if t == layer else -margin for t in targets])
        target = torch.stack([-want / 2, want / 2], dim=1)
        router.w2.weight.data = torch.linalg.lstsq(inner_act, target).solution.T.contiguous()
    return routers


def load_manifest(package, verify: bool = True) -> dict:
    """A package's manifest as plain JSON data (after the typed load has validated it)."""
    from engines.core.manifest import Manifest

    return Manifest.load(package, verify=verify).to_dict()


def perturb_weight(package, graph: str, scale: float = 1.01, tensor: str | None = None,
                   index: int | None = None) -> str:
    """Scale one weight of `graph` in the package's shared weights file (the largest, or the one
    named `tensor`; only its slice `index` along the first axis when given), then re-sign the
    package, as a buggy exporter would have written it. Returns the weight's name."""
    from pathlib import Path

    import onnx

    from engines.core.manifest import Manifest

    package = Path(package)
    model = onnx.load(str(package / "graphs" / f"{graph}.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]

    def info(t):
        return {e.key: e.value for e in t.external_data}

    if tensor is None:
        weight = max(external, key=lambda t: int(info(t)["length"]))
    else:
        weight = next(t for t in external if t.name == tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(weight.data_type))
    offset, length = int(info(weight)["offset"]), int(info(weight)["length"])
    if index is not None:  # one row of the first axis
        row = length // weight.dims[0]
        offset, length = offset + index * row, row
    path = package / "graphs" / info(weight)["location"]
    data = bytearray(path.read_bytes())
    values = np.frombuffer(bytes(data[offset:offset + length]), dtype=dtype) * scale
    data[offset:offset + length] = values.astype(dtype).tobytes()
    path.write_bytes(bytes(data))
    Manifest.load(package, verify=False).save(package)
    return weight.name


def write_samples(folder, prompts: list[tuple[str, Image.Image]]):
    """An images folder and a prompts file that `--images/--prompts` (validation.samples) read
    back as exactly these (question, image) pairs, in order. Returns (images folder, prompts file)."""
    from pathlib import Path

    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True)
    for k, (_, image) in enumerate(prompts):
        image.save(images / f"{k:02d}.png")  # lossless: the runtime sees the same pixels
    questions = folder / "prompts.txt"
    questions.write_text("".join(f"{q}\n" for q, _ in prompts))
    return images, questions
