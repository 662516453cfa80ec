"""Conversation templates of the original (non-Hugging-Face) layouts: VILA, LLaVA, Eagle.

Data, not code paths: each template is a system text, two roles and separators, rendered the way
the LLaVA-family `Conversation.get_prompt` does for a conversation (system, then user / assistant
turns) followed by an open assistant turn. Hugging Face layouts bring a Jinja chat template instead
and do not use these.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.core.errors import DyVTEError
from engines.core.prompt import IMAGE_PLACEHOLDER


@dataclass(frozen=True)
class ConvTemplate:
    name: str
    system: str  # the default system text (a conversation's system message replaces it)
    user: str
    assistant: str
    style: str  # "two": "ROLE: msg<sep>"; "tagged": role strings carry their own markup
    sep: str
    stop: tuple[str, ...] = ()
    system_tag: str = ""  # markup before the system text ("tagged" styles)
    sep2: str | None = None  # "two": after an assistant message (LLaVA's `sep2`); None: `sep`

    def render(self, question: str, has_image: bool) -> str:
        return self.render_chat([("user", f"{IMAGE_PLACEHOLDER}\n{question}" if has_image else question)])

    def render_chat(self, turns: list[tuple[str, str]], system: str | None = None) -> str:
        """`turns`: (role, text) pairs, roles `user` / `assistant` alternating from `user` to a
        final `user` (the image placeholder already in its turn's text); `system`: None for the
        template's own. Ends with the open assistant turn."""
        head = self.system_tag + (self.system if system is None else system)
        if self.style == "two":
            seps = (self.sep, self.sep if self.sep2 is None else self.sep2)
            text = head + self.sep
            for i, (role, message) in enumerate(turns):
                text += f"{self.user if role == 'user' else self.assistant}: {message}{seps[i % 2]}"
            return text + f"{self.assistant}:"
        text = head + self.sep
        for role, message in turns:
            text += f"{self.user if role == 'user' else self.assistant}{message}{self.sep}"
        return text + self.assistant


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES = {
    t.name: t
    for t in (
        ConvTemplate("vicuna_v1", VICUNA_SYSTEM, "USER", "ASSISTANT", "two", " ", ("</s>",), sep2="</s>"),
        ConvTemplate(
            "llama_3",
            "You are a helpful language "
            "and vision assistant. You are able to understand the visual content that the user provides, "
            "and assist the user with a variety of tasks using natural language.",
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            "tagged",
            "<|eot_id|>",
            ("<|eot_id|>", "<|end_of_text|>"),
            system_tag="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n",
        ),
        ConvTemplate(
            "hermes_2",
            "Answer the questions.",
            "<|im_start|>user\n",
            "<|im_start|>assistant\n",
            "tagged",
            "<|im_end|>",
            ("<|im_end|>",),
            system_tag="<|im_start|>system\n",
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
