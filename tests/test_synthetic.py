"""The built-in synthetic VQA task: deterministic, disjoint splits, answers that need the image."""

import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from exporter.data.synthetic import (
    COLOURS,
    COLUMNS,
    KINDS,
    NUMBERS,
    ROWS,
    SHAPES,
    cell_centre,
    describe,
    scene_of,
    split_of,
    synthetic_sample,
    synthetic_split,
)
from engines.core.errors import DyVTEError
from exporter.models.tokenizer import build_word_tokenizer


def expected_answer(question: str, scene) -> str:
    """The answer re-derived from the scene's objects, independently of the generator's code."""
    words = re.findall(r"\w+", question)
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((s for s in SHAPES if s in words or s + "s" in words or s + "es" in words), None)
    match = [o for o in scene if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]
    if question.startswith("how many"):
        return NUMBERS[len(match)]
    if question.startswith("is there"):
        return "yes" if match else "no"
    assert len(match) == 1, f"{question!r} must single out one object in {scene}"
    (obj,) = match
    if question.startswith("what color"):
        return obj.colour
    if question.startswith("what shape"):
        return obj.shape
    if question.startswith("what size"):
        return obj.size
    return obj.row if "row" in words else obj.column


def test_same_seed_gives_same_samples_and_other_seed_others():
    a = synthetic_split("train", 14, seed=3)
    b = synthetic_split("train", 14, seed=3)
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert synthetic_sample("train", 9, seed=3).question == a[9].question  # by index, not by position in a list
    other = synthetic_split("train", 14, seed=4)
    assert [(s.question, s.answer) for s in other] != [(s.question, s.answer) for s in a]


def test_train_and_eval_scenes_are_disjoint():
    key = lambda scene: tuple(sorted((o.cell, o.colour, o.shape, o.size) for o in scene))  # noqa: E731
    train = {key(scene_of("train", i)) for i in range(1500)}
    evals = {key(scene_of("eval", i)) for i in range(300)}
    assert not train & evals
    assert all(split_of(scene_of("eval", i)) == "eval" for i in range(50))
    assert all(split_of(scene_of("train", i)) == "train" for i in range(50))


def test_answers_follow_from_the_scene():
    for split in ("train", "eval"):
        for i, s in enumerate(synthetic_split(split, 140)):
            assert s.answer == expected_answer(s.question, scene_of(split, i)), s.question


def test_the_question_alone_does_not_give_the_answer():
    samples = synthetic_split("train", 2100)
    by_question = defaultdict(Counter)
    for s in samples:
        by_question[s.question][s.answer] += 1
    # the best any text-only guesser can do: the most frequent answer of each question
    text_only = sum(c.most_common(1)[0][1] for c in by_question.values()) / len(samples)
    assert text_only < 0.6
    kinds = Counter(s.kind for s in samples)
    assert set(kinds) == set(KINDS) and max(kinds.values()) - min(kinds.values()) <= 1
    for kind in KINDS:
        answers = Counter(s.answer for s in samples if s.kind == kind)
        assert len(answers) >= 2 and max(answers.values()) / sum(answers.values()) < 0.6, (kind, answers)


def test_answers_are_one_word_in_the_builtin_vocabulary():
    tok = build_word_tokenizer()
    vocab = tok.get_vocab()
    allowed = set(COLOURS) | set(SHAPES) | set(NUMBERS) | set(ROWS) | set(COLUMNS) | {"yes", "no", "big", "small"}
    for s in synthetic_split("eval", 70):
        assert s.answer in allowed and s.answer in vocab
        ids = tok(s.question, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, s.question


def test_images_show_the_objects_in_their_cells():
    for i in range(21):
        s = synthetic_sample("eval", i, image_size=104)
        img = np.asarray(s.image)
        assert img.shape == (104, 104, 3)
        scene = scene_of("eval", i)
        for o in scene:
            cx, cy = cell_centre(o.cell, 104)
            patch = img[int(cy) - 2:int(cy) + 3, int(cx) - 2:int(cx) + 3].reshape(-1, 3)
            assert (np.abs(patch.astype(int) - COLOURS[o.colour]).sum(1) == 0).any(), (o, s.question)
        for c in set(range(9)) - {o.cell for o in scene}:
            cx, cy = cell_centre(c, 104)
            assert img[int(cy), int(cx)].sum() == 0


def test_each_object_lies_inside_one_16_pixel_block_at_104_px():
    """At the built-in size, one object = one visual token after 8-px patches and 2x2 merging."""
    for i in range(14):
        s = synthetic_sample("train", i)
        lit = np.asarray(s.image).sum(-1) > 0
        for o in scene_of("train", i):
            cx, cy = cell_centre(o.cell, 104)
            bx, by = int(cx // 16) * 16, int(cy // 16) * 16
            window = lit[max(0, by - 4):by + 20, max(0, bx - 4):bx + 20].copy()
            window[4:20, 4:20] = False  # the block itself; nothing of this object spills beyond it
            assert not window.any(), (i, o)


def test_description_lists_objects_in_reading_order():
    scene = scene_of("eval", 3)
    text = describe(scene)
    assert text.count(",") == len(scene) - 1
    first = min(scene, key=lambda o: o.cell)
    assert text.startswith(f"{first.size} {first.colour} {first.shape} {first.row} {first.column}")


def test_unknown_split_is_refused():
    with pytest.raises(DyVTEError, match="unknown synthetic split 'test'"):
        synthetic_sample("test", 0)
