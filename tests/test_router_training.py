"""Router training: the paper's exit label, the two branches, the training loop, its files and data."""

import json

import pytest
import torch

from engines.backends.torch_backend import TorchBackend
from engines.orchestrator import Runtime
from engines.policy import GenerationConfig
from exporter.data import VQASample
from exporter.data.jsonl import read_jsonl
from exporter.data.synthetic import synthetic_split
from engines.core.dyvte import EXIT, KEEP
from exporter.dyvte.router import Routers, load_routers, save_routers
from exporter.dyvte.train import (
    LayerExamples,
    PreparedData,
    RouterTrainingConfig,
    answer_batch,
    embed_batch,
    exit_labels,
    label_rule,
    main,
    run_removed_branch,
    train_routers,
)
from engines.core.errors import DyVTEError
from exporter.models.vila import Vila
from helpers import random_image

FAST = dict(batch_size=8, lr=3e-3, inner=32, progress=False, max_new_tokens=3)


@pytest.fixture(scope="module")
def model():
    return Vila().preset(seed=5)


@pytest.fixture(scope="module")
def samples():
    return synthetic_split("train", 24, seed=1, image_size=54)


# --------------------------------------------------------------------------- the label rule


def test_label_rule_edges_agreement_above_99_percent_and_loss_below_1_03x():
    t = torch.tensor
    labels = label_rule(
        agreement=t([1.0, 0.99, 0.9901, 1.0, 1.0, 1.0, 0.5]),
        loss_unchanged=t([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0]),
        loss_removed=t([0.5, 0.5, 0.5, 1.03, 1.0299, 0.0, 0.5]),
    )
    # agreement must be above 0.99 (0.99 itself keeps), loss strictly below 1.03x (1.03x keeps);
    # a zero unchanged loss leaves nothing to be below
    assert labels.tolist() == [EXIT, KEEP, EXIT, KEEP, EXIT, KEEP, KEEP]


def branch_logits(positions: int = 200, flips: int = 0, target_logit: float = 2.0, vocab: int = 5) -> torch.Tensor:
    """Logits [T, vocab] favouring token 0, except the last `flips` positions where token 1 edges ahead."""
    logits = torch.zeros(positions, vocab)
    logits[:, 0] = target_logit
    if flips:
        logits[-flips:, 1] = target_logit + 0.01
    return logits


def test_exit_labels_from_two_branches_answer_logits():
    targets = torch.zeros(3, 200, dtype=torch.long)
    unchanged = torch.stack([branch_logits()] * 3)
    removed = torch.stack([
        branch_logits(flips=1),  # 199/200 = 99.5% agreement, loss barely up: exit
        branch_logits(flips=2),  # 99.0%: not above 99%, keep
        branch_logits(target_logit=1.0),  # same argmax everywhere, but a far higher loss: keep
    ])
    stats = exit_labels(unchanged, removed, targets)
    assert stats.agreement.tolist() == pytest.approx([0.995, 0.99, 1.0])
    assert stats.loss_removed[0] < 1.03 * stats.loss_unchanged[0]
    assert stats.loss_removed[2] > 1.03 * stats.loss_unchanged[2]
    assert stats.labels.tolist() == [EXIT, KEEP, KEEP]
    # a mask restricts the rule to the answer positions: leave out the disagreeing ones and it exits
    mask = torch.ones(3, 200, dtype=torch.bool)
    mask[:, 198:] = False
    assert exit_labels(unchanged, removed, targets, mask).labels.tolist() == [EXIT, EXIT, KEEP]


# --------------------------------------------------------------------------- the two branches


def test_removed_branch_is_the_runtime_exit_and_features_are_the_runtime_router_input(model, samples):
    runtime = Runtime(TorchBackend(model), model.processor)
    prompts = [model.processor.build(s.question, s.image) for s in samples[:3]]
    answers = [[7, 9], [8], []]  # arbitrary answer tokens: the first slot's logits are the prefill's
    batch = answer_batch(prompts, answers, [a + [0] for a in answers])
    hidden = embed_batch(model, batch, [model.encode_images(p.pixel_values) for p in prompts])
    L = model.shape.num_layers
    with torch.no_grad():
        for k in range(L - 1):
            empty = model.decoder.empty_cache(3, hidden.dtype, hidden.device)
            h_k, _ = model.decoder.run_layers(0, k + 1, hidden, batch.layout.position_ids, batch.layout.key_mask,
                                              [(empty, empty)] * (k + 1))
            final, rows, _ = run_removed_branch(model, batch, h_k, k)
            first = [final[rows == b][0] for b in range(3)]
            exited = runtime.generate(prompts, f"layer:{k}", GenerationConfig(max_new_tokens=1))
            for b in range(3):
                torch.testing.assert_close(model.decoder.logits(first[b]), exited[b].first_logits, rtol=0, atol=1e-5)

    # router features at layer k: what the runtime gives router k (routers that never exit ask them all)
    never = Routers(L, model.shape.hidden_size, inner=8)
    for r in never.layers:
        r.w2.weight.data = torch.tensor([[1.0] * 8, [-1.0] * 8])
        r.w1.weight.data = torch.randn_like(r.w1.weight).abs() * 0.1
    model_copy = Vila().preset(seed=5)
    model_copy.attach_routers(never)
    data = PreparedData(model_copy, samples[:3], RouterTrainingConfig(**FAST), "test")
    examples = LayerExamples(model_copy, data, RouterTrainingConfig(**FAST))
    asked = Runtime(TorchBackend(model_copy), model_copy.processor).generate(
        prompts, "dynamic", GenerationConfig(max_new_tokens=1))
    for k in range(L - 1):
        for b, ex in enumerate(examples.get([0, 1, 2], k)):
            torch.testing.assert_close(never(k, ex.feature[None])[0].tolist(), asked[b].router_logits[k],
                                       rtol=0, atol=1e-5)


def test_greedy_targets_are_the_models_answers_and_last_layer_always_exits(model, samples):
    config = RouterTrainingConfig(**FAST)
    data = PreparedData(model, samples[:6], config, "test")
    runtime = Runtime(TorchBackend(model), model.processor)
    prompts = [model.processor.build(s.question, s.image) for s in samples[:6]]
    greedy = runtime.generate(prompts, "none", GenerationConfig(max_new_tokens=3))
    for i, g in enumerate(greedy):
        assert data.targets[i][:len(g.generated_ids)] == g.generated_ids
        assert data.ref_pred[i].tolist() == data.targets[i]  # the unchanged branch predicts its own answer
    # removing the visual tokens after the last layer changes nothing: every label is exit
    L = model.shape.num_layers
    last = LayerExamples(model, data, config).get(list(range(6)), L - 1)
    assert [e.label for e in last] == [EXIT] * 6 and all(e.agreement == 1.0 for e in last)


# --------------------------------------------------------------------------- training and files


def test_training_lowers_the_loss_and_writes_loadable_routers(model, samples, tmp_path):
    config = RouterTrainingConfig(epochs=6, seed=0, **FAST)
    routers, summary = train_routers(model, samples, config)
    L, H = model.shape.num_layers, model.shape.hidden_size
    losses = summary["epoch_losses"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [row["layer"] for row in summary["layers"]] == list(range(L))
    for row in summary["layers"]:
        assert 0 <= row["exit_share"] <= 1 and row["examples"] == len(samples)
        assert row["keep_accuracy"] is None or 0 <= row["keep_accuracy"] <= 1
        assert row["exit_accuracy"] is None or 0 <= row["exit_accuracy"] <= 1
    assert summary["layers"][-1]["exit_share"] == 1.0  # nothing left to lose after the last layer
    path = save_routers(routers, tmp_path / "routers.safetensors")
    loaded = load_routers(path, L, H)
    assert loaded.inner == 32
    x = torch.randn(2, 2 * H)
    for k in range(L):
        torch.testing.assert_close(loaded(k, x), routers(k, x))


def test_training_is_reproducible_from_the_seed(model, samples):
    config = RouterTrainingConfig(epochs=2, seed=3, **FAST)
    a, sa = train_routers(model, samples[:12], config)
    b, sb = train_routers(model, samples[:12], config)
    assert sa["epoch_losses"] == sb["epoch_losses"]
    torch.testing.assert_close(a.layers[1].w1.weight, b.layers[1].w1.weight)


# --------------------------------------------------------------------------- data and CLI


def write_records(tmp_path, records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def record(i, image="img0.png", question="<image>\nwhat color is the circle?", answer="red"):
    return {"id": f"r{i}", "image": image, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        random_image(i).save(folder / f"img{i}.png")
    return folder


def test_jsonl_records_become_samples(tmp_path, image_dir):
    path = write_records(tmp_path, [record(0), {"id": "text-only", "conversations": []},
                                    record(1, "img1.png", "is it big?\n<image>", "no")])
    samples = read_jsonl(path, image_dir)
    assert [(s.id, s.question, s.answer) for s in samples] == [("r0", "what color is the circle?", "red"),
                                                               ("r1", "is it big?", "no")]
    assert samples[1].load_image().size == (40, 30)


@pytest.mark.parametrize("records,message", [
    ([record(0), record(1, image="missing.png")], r"data.jsonl record at line 2 \(id 'r1'\): image not found: .*missing.png"),
    ([{"id": "q", "image": "img0.png", "conversations": [{"from": "gpt", "value": "hi"}]}],
     r"record at line 1 \(id 'q'\): the conversation has no human turn"),
    ([record(0), {"id": "c", "image": "img0.png"}], r"record at line 2 \(id 'c'\): no 'conversations' list"),
    ([{"id": "e", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>"}]}],
     r"record at line 1 \(id 'e'\): the human turn holds no question"),
])
def test_bad_records_are_refused_naming_the_record(tmp_path, image_dir, records, message):
    with pytest.raises(DyVTEError, match=message):
        read_jsonl(write_records(tmp_path, records), image_dir)


def test_empty_file_bad_json_and_missing_file_are_refused(tmp_path, image_dir):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DyVTEError, match="empty.jsonl is empty"):
        read_jsonl(tmp_path / "empty.jsonl", image_dir)
    (tmp_path / "bad.jsonl").write_text(json.dumps(record(0)) + "\n{not json\n")
    with pytest.raises(DyVTEError, match="bad.jsonl line 2 is not valid JSON"):
        read_jsonl(tmp_path / "bad.jsonl", image_dir)
    with pytest.raises(DyVTEError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl", image_dir)
    with pytest.raises(DyVTEError, match="holds no records with an image"):
        read_jsonl(write_records(tmp_path, [{"id": "t", "conversations": []}]), image_dir)
    with pytest.raises(DyVTEError, match=r"line 1 \(id 'r0'\): image path 'img0.png' is relative; give the image folder"):
        read_jsonl(write_records(tmp_path, [record(0)]))


def test_data_targets_use_the_reference_answers(model, tmp_path, image_dir):
    samples = read_jsonl(write_records(tmp_path, [record(0), record(1, "img1.png", answer="blue")]), image_dir)
    data = PreparedData(model, samples, RouterTrainingConfig(targets="data", **FAST), "test")
    tok = model.processor.tokenizer
    assert data.targets == [[tok.convert_tokens_to_ids("red"), tok.eos_token_id],
                            [tok.convert_tokens_to_ids("blue"), tok.eos_token_id]]
    with pytest.raises(DyVTEError, match="sample x has no reference answer"):
        PreparedData(model, [VQASample("x", "what?", None, image=random_image(0))],
                     RouterTrainingConfig(targets="data", **FAST), "test")


def test_cli_trains_from_jsonl_and_reports_bad_data(tmp_path, image_dir, vila_checkpoint, capsys):
    data = write_records(tmp_path, [record(i, f"img{i % 3}.png") for i in range(6)])
    out, summary = tmp_path / "r.safetensors", tmp_path / "summary.json"
    code = main(["--model", "vila", "--checkpoint", str(vila_checkpoint), "--data", str(data), "--images",
                 str(image_dir), "--output", str(out), "--summary", str(summary), "--epochs", "2",
                 "--batch-size", "4", "--inner", "16", "--lr", "1e-3", "--max-new-tokens", "3", "--no-progress"])
    assert code == 0
    report = json.loads(summary.read_text())
    assert report["train_samples"] == 6 and len(report["layers"]) == 4
    assert "exit labels" in capsys.readouterr().out
    model = Vila().load(vila_checkpoint)
    assert load_routers(out, model.shape.num_layers, model.shape.hidden_size).inner == 16

    bad = write_records(tmp_path, [record(0), record(1, "gone.png")], "bad.jsonl")
    code = main(["--model", "vila", "--checkpoint", str(vila_checkpoint), "--data", str(bad), "--images",
                 str(image_dir), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("error: bad.jsonl record at line 2 (id 'r1'): image not found")
