"""Conversation templates of the original (non-Hugging-Face) layouts: VILA, LLaVA, Eagle.

Data, not code paths: each template is a system text, two roles and separators, rendered the way
the LLaVA-family `Conversation.get_prompt` does for one user turn followed by an open assistant turn.
Hugging Face layouts bring a Jinja chat template instead and do not use these.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.core.errors import DyVTEError
from engines.core.prompt import IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class ConvTemplate:
    name: str
    system: str
    user: str
    assistant: str
    style: str  # "two": "ROLE: msg<sep>"; "tagged": role strings carry their own markup
    sep: str
    stop: tuple[str, ...] = ()

    def render(self, question: str, has_image: bool) -> str:
        message = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question
        if self.style == "two":
            return f"{self.system}{self.sep}{self.user}: {message}{self.sep}{self.assistant}:"
        return f"{self.system}{self.sep}{self.user}{message}{self.sep}{self.assistant}"


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES = {
    t.name: t
    for t in (
        ConvTemplate("vicuna_v1", VICUNA_SYSTEM, "USER", "ASSISTANT", "two", " ", ("</s>",)),
        ConvTemplate(
            "llama_3",
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language "
            "and vision assistant. You are able to understand the visual content that the user provides, "
            "and assist the user with a variety of tasks using natural language.",
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "tagged",
            "<|eot_id|>",
            ("<|eot_id|>", "<|end_of_text|>"),
        ),
        ConvTemplate(
            "hermes_2",
            "<|im_start|>system\nAnswer the questions.",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "tagged",
            "<|im_end|>",
            ("<|im_end|>",),
        ),
    )
}


def get_template(name: str) -> ConvTemplate:
    if name not in TEMPLATES:
        raise DyVTEError(f"unknown conversation template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def guess_template(tokenizer) -> ConvTemplate:
    """VILA picks the template from the model name; the tokenizer's special tokens tell as much."""
    vocab = tokenizer.get_vocab()
    if "<|eot_id|>" in vocab:
        return TEMPLATES["llama_3"]
    if "<|im_start|>" in vocab:
        return TEMPLATES["hermes_2"]
    return TEMPLATES["vicuna_v1"]


def stop_token_ids(tokenizer, template: ConvTemplate) -> list[int]:
    vocab = tokenizer.get_vocab()
    ids = [vocab[s] for s in template.stop if s in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
