"""Conversations (system / user / assistant turns, the image in any user turn) in the family's own
chat prompt: the original LLaVA-family layouts (`Conversation.get_prompt` with `sep` / `sep2`),
one user turn exactly as `build`, and what a conversation may not be. (Hugging Face chat templates
are checked against transformers' InternVLProcessor in test_internvl.py.)"""

import pytest

from conftest import sample_pairs
from engines.core.errors import DyVTEError
from engines.core.prompt import Turn, chat_turns
from engines.core.templates import TEMPLATES, VICUNA_SYSTEM


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_one_user_turn_renders_as_before(name):
    t = TEMPLATES[name]
    assert t.render_chat([("user", "<image>\nQ?")]) == t.render("Q?", True)
    assert t.render_chat([("user", "Q?")]) == t.render("Q?", False)


def test_multi_turn_layouts_are_llava_conversation_prompts():
    turns = [("user", "<image>\nQ1"), ("assistant", "A1"), ("user", "Q2")]
    # SeparatorStyle.TWO: sep after user messages, sep2 after assistant messages
    assert TEMPLATES["vicuna_v1"].render_chat(turns) == \
        f"{VICUNA_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert TEMPLATES["vicuna_v1"].render_chat(turns, "Be brief.") == \
        "Be brief. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    # MPT style (hermes_2): role markup + message + sep each
    assert TEMPLATES["hermes_2"].render_chat(turns, "S") == (
        "<|im_start|>system\nS<|im_end|><|im_start|>user\n<image>\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
        "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n")


def test_chat_turns_joins_systems_and_same_role_runs():
    system, turns = chat_turns([Turn("system", "a"), Turn("system", "b"), Turn("user", "x", True), Turn("user", "y"),
                                Turn("assistant", "z"), Turn("user", "w")])
    assert system == "a\nb"
    assert turns == [Turn("user", "x\ny", True), Turn("assistant", "z"), Turn("user", "w")]
    assert chat_turns([Turn("user", "q")]) == (None, [Turn("user", "q")])


@pytest.mark.parametrize("turns, needle", [
    ([Turn("tool", "x"), Turn("user", "q")], "unsupported message role 'tool'"),
    ([Turn("user", "q"), Turn("system", "s"), Turn("user", "q")], "system messages must come before"),
    ([Turn("user", "q"), Turn("assistant", "a")], "start and end with a user message"),
    ([Turn("assistant", "a"), Turn("user", "q")], "start and end with a user message"),
    ([Turn("system", "s")], "start and end with a user message"),
    ([Turn("user", "q", True), Turn("assistant", "a"), Turn("user", "r", True)], "at most 1 image"),
    ([Turn("assistant", "a", True), Turn("user", "q")], "only be in a user message"),
    ([Turn("user", "a\ud800b")], "not valid UTF-8"),
])
def test_what_a_conversation_may_not_be(turns, needle):
    with pytest.raises(DyVTEError, match=needle):
        chat_turns(turns)


def test_build_chat_places_the_image_in_its_turn(vila_exit_model):
    processor = vila_exit_model.processor
    question, image = sample_pairs([0])[0]
    one = processor.build_chat([Turn("user", question, True)], image)
    assert one.input_ids == processor.build(question, image).input_ids
    first = processor.build_chat([Turn("user", "look.", True), Turn("assistant", "ok."), Turn("user", question)], image)
    last = processor.build_chat([Turn("user", "look."), Turn("assistant", "ok."), Turn("user", question, True)], image)
    assert first.num_visual == last.num_visual == one.num_visual
    assert first.visual_span[0] < last.visual_span[0] and len(first.input_ids) == len(last.input_ids)
    with pytest.raises(DyVTEError, match="no user turn holds it"):
        processor.build_chat([Turn("user", question)], image)
    with pytest.raises(DyVTEError, match="exactly when a user turn holds it"):
        processor.build_chat([Turn("user", question, True)], None)
