"""Answering VQA samples with a runtime, and judging the answers: what training and the accuracy
evaluation share."""

from __future__ import annotations

import re


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: the form answers are compared in."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def prepare_prompts(runtime_or_model, samples):
    """Prompts of `samples` built by the processor of a runtime or a model."""
    processor = runtime_or_model.processor
    return [processor.build(s.question, s.load_image()) for s in samples]


def run_policy(model_or_runtime, prompts, policy: str, batch_size: int = 64, max_new_tokens: int = 4):
    """Greedy answers under one exit policy, in batches: from a `Runtime` as given, or from a model
    through the PyTorch reference runtime."""
    from engines.orchestrator import Runtime
    from engines.policy import GenerationConfig

    runtime = model_or_runtime
    if not isinstance(runtime, Runtime):
        from engines.backends.torch_backend import TorchBackend

        runtime = Runtime(TorchBackend(model_or_runtime), model_or_runtime.processor)
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    out = []
    for start in range(0, len(prompts), batch_size):
        out += runtime.generate(prompts[start:start + batch_size], policy, config)
    return out
