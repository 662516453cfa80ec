"""The PyTorch reference runtime: exits, KV-cached decoding and batching against from-scratch recomputes."""

import pytest
import torch

from engines.backends.torch_backend import TorchBackend
from engines.orchestrator import Runtime
from engines.policy import GenerationConfig
from engines.core.dyvte import router_features, text_feature_weights
from engines.core.errors import DyVTEError
from exporter.models.vila import Vila
from helpers import random_image, recompute_logits, routers_with_exits, splice

QUESTIONS = ["what color is the circle?", "how many stars are there?", "is there a red square?",
             "where is the triangle?", "what shape is at the top left?", "is the star big?"]


TARGET_EXITS = [0, 1, None, 2, 1, 0]  # per prompt of `prompts()`: the exit layer the routers give


def prompts(runtime, n=6):
    return [runtime.prepare(QUESTIONS[i % len(QUESTIONS)], random_image(100 + i)) for i in range(n)]


@pytest.fixture(scope="module")
def model():
    m = Vila().preset(seed=11)
    runtime = Runtime(TorchBackend(m), m.processor)
    m.attach_routers(routers_with_exits(runtime, prompts(runtime), TARGET_EXITS))
    return m


@pytest.fixture(scope="module")
def runtime(model):
    return Runtime(TorchBackend(model), model.processor)


def reference_sequence_logits(model, prompt, generated, exit_layer):
    """No-cache logits for every position of prompt + generated tokens, exit from scratch."""
    ids = prompt.input_ids + generated
    visual = model.encode_images(prompt.pixel_values)
    embeds = splice(model.decoder.embed_tokens, ids, prompt.visual_span, visual)
    llm = model.native.llm
    return recompute_logits(llm.model, llm.lm_head, embeds, prompt.visual_span, exit_layer)[0]


@pytest.mark.parametrize("policy,exit_layer", [("none", None), ("layer:0", 0), ("layer:1", 1), ("layer:2", 2)])
def test_static_exit_and_cached_decoding_equal_recompute_without_visual_tokens(model, runtime, policy, exit_layer):
    prompt = prompts(runtime, 1)[0]
    result = runtime.generate([prompt], policy, GenerationConfig(max_new_tokens=6, keep_logits=True))[0]
    assert result.exit_layer == exit_layer
    generated = result.generated_ids
    assert len(generated) == 6
    ref = reference_sequence_logits(model, prompt, generated, exit_layer)
    # the prefill's last position, then every cached decode step, against the no-cache recompute
    steps = torch.stack(result.step_logits)
    torch.testing.assert_close(steps, ref[-len(generated) - 1:-1], rtol=0, atol=1e-5)
    torch.testing.assert_close(result.first_logits, steps[0], rtol=0, atol=0)
    assert steps.argmax(-1).tolist() == generated


def test_static_exit_changes_the_computation(model, runtime):
    prompt = prompts(runtime, 1)[0]
    full = runtime.generate([prompt], "none")[0].first_logits
    early = runtime.generate([prompt], "layer:0")[0].first_logits
    assert (full - early).abs().max() > 1e-3


def test_dynamic_exit_layer_is_first_layer_whose_router_says_exit(model, runtime):
    for prompt in prompts(runtime):
        result = runtime.generate([prompt], "dynamic", GenerationConfig(max_new_tokens=1))[0]
        decisions = {layer: lg[1] > lg[0] for layer, lg in result.router_logits.items()}
        asked = sorted(decisions)
        if result.exit_layer is None:
            assert asked == list(range(model.shape.num_layers - 1)) and not any(decisions.values())
        else:
            assert asked == list(range(result.exit_layer + 1))
            assert decisions[result.exit_layer] and not any(decisions[layer] for layer in asked[:-1])


def test_batched_per_sample_exits_equal_single_runs(runtime):
    batch = prompts(runtime)
    config = GenerationConfig(max_new_tokens=5)
    singles = [runtime.generate([p], "dynamic", config)[0] for p in batch]
    assert [s.exit_layer for s in singles] == TARGET_EXITS
    together = runtime.generate(batch, "dynamic", config)
    for alone, batched in zip(singles, together):
        assert batched.exit_layer == alone.exit_layer
        assert batched.generated_ids == alone.generated_ids
        torch.testing.assert_close(batched.first_logits, alone.first_logits, rtol=0, atol=1e-5)


def test_batched_with_text_only_sample_and_static_exit(runtime):
    batch = prompts(runtime, 2) + [runtime.prepare("is there a red square?", None)]
    config = GenerationConfig(max_new_tokens=4)
    singles = [runtime.generate([p], "layer:1", config)[0] for p in batch]
    together = runtime.generate(batch, "layer:1", config)
    assert [r.exit_layer for r in together] == [1, 1, None]
    for alone, batched in zip(singles, together):
        assert batched.generated_ids == alone.generated_ids
        torch.testing.assert_close(batched.first_logits, alone.first_logits, rtol=0, atol=1e-5)


def test_sampling_is_per_sample_reproducible_alone_or_batched(runtime):
    batch = prompts(runtime, 3)
    config = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    singles = [runtime.generate([p], "dynamic", config)[0].generated_ids for p in batch]
    assert runtime.generate(batch, "dynamic", config)[i := 0].generated_ids == singles[i]
    assert [r.generated_ids for r in runtime.generate(batch, "dynamic", config)] == singles
    greedy = [runtime.generate([p], "dynamic", GenerationConfig(max_new_tokens=8))[0].generated_ids for p in batch]
    assert singles != greedy


def test_generation_stops_at_eos(model, runtime):
    prompt = prompts(runtime, 1)[0]
    first = runtime.generate([prompt], "none", GenerationConfig(max_new_tokens=4))[0].generated_ids
    from dataclasses import replace

    from engines.core.prompt import Processor

    spec = replace(model.processor.spec, stop_token_ids=[first[2]])
    stopping = Runtime(TorchBackend(model), Processor(model.processor.tokenizer, model.processor.image_processor, spec))
    out = stopping.generate([prompt], "none", GenerationConfig(max_new_tokens=4))[0].generated_ids
    assert out == first[:2]


def test_router_mean_over_empty_text_span_uses_last_position():
    hidden = torch.randn(2, 5, 3)
    # sample 0: image ends at 2, text 2..3 averaged (4 is last); sample 1: image ends at 4 -> empty
    weights = text_feature_weights(5, torch.tensor([2, 4]), torch.tensor([5, 5]))
    feats = router_features(hidden, weights)
    torch.testing.assert_close(feats[0, :3], hidden[0, 2:4].mean(0))
    torch.testing.assert_close(feats[1, :3], hidden[1, 4])
    torch.testing.assert_close(feats[:, 3:], hidden[:, 4])
    assert torch.isfinite(feats).all()


def test_dynamic_without_routers_is_refused():
    m = Vila().preset()
    m.routers = None
    rt = Runtime(TorchBackend(m), m.processor)
    with pytest.raises(DyVTEError, match="no DyVTE routers"):
        rt.generate([rt.prepare("hi", random_image(0))], "dynamic")


def test_prompt_longer_than_context_is_refused(runtime, model):
    prompt = runtime.prepare("what " * (model.shape.max_positions - 40), random_image(0))
    with pytest.raises(DyVTEError, match="exceeds the model's context"):
        runtime.generate([prompt], "none")


def test_static_exit_outside_model_is_refused(runtime):
    with pytest.raises(DyVTEError, match="cannot exit after layer 9"):
        runtime.generate(prompts(runtime, 1), "layer:9")
