"""A small word-level tokenizer for the built-in presets (no download, fully deterministic).

Real checkpoints bring their own tokenizer; the presets need one whose vocabulary fits a tiny
embedding table. Words outside the vocabulary map to `<unk>`.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<img>", "</img>", "<IMG_CONTEXT>"]

# Chat-template words of the families' templates, then the words of the synthetic VQA task.
BASE_WORDS = """
a chat between curious user and an artificial intelligence assistant the gives helpful detailed
polite answers to s questions you are language vision able understand visual content that provides
assist with variety of tasks using natural system im_start im_end answer
: . , ? ! ' - _ | < > / \\ ( ) [ ] =
what which how many is there are in on at of this image picture color colour shape size count
position where left right top bottom middle center upper lower big small large tiny
red green blue yellow purple orange white black gray grey pink brown cyan
circle square triangle star cross diamond ring rectangle
yes no none one two three four five six seven eight nine ten
0 1 2 3 4 5 6 7 8 9 describe tell me please
or row column object objects shapes circles squares triangles crosses stars diamonds zero
""".split()


def build_word_tokenizer(extra_words: list[str] | None = None,
                         extra_special: list[str] | None = None) -> PreTrainedTokenizerFast:
    """`extra_special`: further special tokens matched whole in the text (e.g. ChatML's `<|im_start|>`)."""
    words: list[str] = []
    for w in SPECIAL_TOKENS + BASE_WORDS + list(extra_words or []) + list(extra_special or []):
        if w not in words:
            words.append(w)
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "<img>", "</img>", "<IMG_CONTEXT>"] + list(extra_special or []),
    )
