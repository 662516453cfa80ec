"""Train the built-in VILA from scratch on the synthetic VQA task, then its DyVTE routers.

    python -m exporter.builtin.train_vila            # writes exporter/builtin/vila/ (~27 min on one core)

Stage 1 trains every parameter of the `builtin` preset (SigLIP-style tower, 2x2 down-sampling
projector, 8-layer Llama) on fresh synthetic training samples each step, with the loss on the answer
tokens (one word, then `</s>`). Two choices make it a model on which DyVTE can be measured:
- label smoothing keeps the answer loss away from zero, so that the routers' 1.03x loss rule
  compares losses of a sensible size rather than of 1e-6;
- in a share of the batches the visual tokens are removed after a random layer (the exit the
  runtime performs), so the text tokens learn to absorb the image early, which large MLLMs do by
  themselves (DyVTE's "early fusion" finding) and a tiny model trained for minutes does not.
Stage 2 freezes the model and trains the routers with `exporter.dyvte.train` (the paper's rule; a
larger lr and several epochs because the routers start from scratch on a small model).

Reproducible from `--seed`: data, initialisation and layer draws are seeded (bit-for-bit equal
results need the same torch build and thread count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exporter.builtin import BUILTIN_DIR
from exporter.data.synthetic import (
    CAPTION_QUESTION,
    COLOURS,
    MAX_OBJECTS,
    NUMBERS,
    COLUMNS,
    ROWS,
    SHAPES,
    SIZES,
    describe,
    labelled_sample,
    synthetic_split,
)
from exporter.dyvte.router import save_routers
from exporter.dyvte.train import (
    RouterTrainingConfig,
    answer_batch,
    cosine_with_warmup,
    embed_batch,
    format_summary,
    run_removed_branch,
    train_routers,
)
from engines.core.errors import DyVTEError
from engines.core.prompt import Prompt


@dataclass
class BaseTrainingConfig:
    steps: int = 12000  # stage 1
    batch_size: int = 8  # small batches: progress here is per step, not per sample
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    residual_init_scale: float = 0.0  # attention/MLP output projections start at this times their init
    curriculum: tuple = ((0, 1), (600, 3), (1200, 5))  # (from step, max objects per scene)
    vision_steps: int = 200  # stage 0: the tower + projector alone, on the dense attribute loss
    dense_weight: float = 1.0  # weight of the dense attribute loss during stage 1 (0: off)
    referent_weight: float = 1.0  # weight of the intermediate "what is asked about" loss (0: off)
    referent_from_layer: int = 2  # ... read after layers referent_from_layer .. L-1
    caption_share: float = 0.0  # share of samples that ask for a description of the image instead
    polish_from_step: int = 5500  # from here on: label smoothing and exit practice (below)
    label_smoothing: float = 0.1
    exit_share: float = 0.5  # share of batches with the visual tokens removed after a random layer
    eval_every: int = 1000
    eval_samples: int = 350
    eval_policies: tuple = ("none", "layer:1", "layer:3")
    seed: int = 0


VISION_OFFSET = 10**8  # stage 0 draws training samples from here on, apart from stage 1's


ATTRIBUTES = (tuple(COLOURS), SHAPES, SIZES, ROWS, COLUMNS)


class DenseProbe(nn.Module):
    """Each visual token's colour, shape, size, row and column (0 = no object there), read linearly
    from the token as the language model's first layer sees it: RMS-normalised.

    It gives the vision half the direct signal a pretrained SigLIP brings to a real VILA: trained
    through the language model alone, a tiny tower learns shapes very slowly, and the projector
    tends to blow up whichever attribute the model learns first until, once normalised, the others
    are drowned out. The probe is discarded after training; it is not part of the model."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = tuple(len(group) + 1 for group in ATTRIBUTES)
        self.head = nn.Linear(hidden, sum(self.sizes))

    def loss(self, visual: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.head(F.rms_norm(visual, visual.shape[-1:])).split(self.sizes, dim=-1)
        return sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), targets[..., i].reshape(-1), ignore_index=-100)
                   for i, lg in enumerate(logits)) / len(logits)


class ReferentProbe(nn.Module):
    """What the question is about, read from the last prompt position after each decoder layer from
    `first` on: the attributes of the object it names (0 = none, for counts and a "no" to "is there
    ...") and, for counts, the number.

    Intermediate supervision for the multi-hop lookup (question word -> matching visual token ->
    its attribute): trained on the answer alone, a small model finds that lookup very slowly. As a
    side effect the text holds the image's answer early, which is DyVTE's early-fusion finding."""

    def __init__(self, hidden: int, num_layers: int, first: int):
        super().__init__()
        self.first = first
        self.sizes = tuple(len(group) + 1 for group in ATTRIBUTES) + (MAX_OBJECTS,)
        self.heads = nn.ModuleList(nn.Linear(hidden, sum(self.sizes)) for _ in range(first, num_layers))

    def loss(self, states: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for head, state in zip(self.heads, states[self.first:]):
            logits = head(F.rms_norm(state, state.shape[-1:])).split(self.sizes, dim=-1)
            total = total + sum(F.cross_entropy(lg, targets[:, i], ignore_index=-100) for i, lg in enumerate(logits))
        return total / (len(self.heads) * len(self.sizes))


def referent_targets(sample, objects) -> torch.Tensor:
    """[6]: the attributes (1-based, 0 = none) of the object the question names, then the count
    (-100 where it does not apply)."""
    out = torch.full((6,), -100, dtype=torch.long)
    names_one = sample.kind in ("color", "shape", "row", "column", "size") or (
        sample.kind == "exists" and sample.answer == "yes")
    if sample.kind == "count":
        out[5] = NUMBERS.index(sample.answer)
    if names_one:  # the generator places the object asked about first
        o = objects[0]
        values = (o.colour, o.shape, o.size, o.row, o.column)
        out[:5] = torch.tensor([list(group).index(v) + 1 for group, v in zip(ATTRIBUTES, values)])
    elif sample.kind in ("count", "exists"):
        out[:5] = 0
    return out


def dense_targets(objects, labels: np.ndarray, side: int, step: int, min_share: float = 0.1) -> torch.Tensor:
    """[side*side, 5] (colour, shape, size, row, column) class per visual token, 1-based, 0 = none: the object
    covering most of the token's `step` x `step` pixel block (the padded grid's), if it covers at
    least `min_share` of it."""
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    padded = np.zeros((side * step, side * step), dtype=np.int64)
    padded[: labels.shape[0], : labels.shape[1]] = labels
    regions = padded.reshape(side, step, side, step).transpose(0, 2, 1, 3).reshape(side * side, -1)
    out = torch.zeros(side * side, 5, dtype=torch.long)
    for t, region in enumerate(regions):
        counts = np.bincount(region, minlength=len(objects) + 1)
        counts[0] = 0
        best = int(counts.argmax())
        if best and counts[best] >= min_share * region.size:
            o = objects[best - 1]
            out[t] = torch.tensor([colours.index(o.colour) + 1, shapes.index(o.shape) + 1, sizes.index(o.size) + 1,
                                   ROWS.index(o.row) + 1, COLUMNS.index(o.column) + 1])
    return out


def answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of a one-word (or caption) answer, without special tokens."""
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DyVTEError(f"the answer {answer!r} encodes to no tokens")
    return ids


class FastPrompts:
    """`processor.build` with the token ids cached per question: the synthetic questions come from a
    few templates, and re-rendering the chat template per sample costs more than a training step's
    forward pass on this small model. `check` asserts the cached path equals the processor's."""

    def __init__(self, model):
        self.processor = model.processor
        self._ids: dict[str, tuple[list[int], tuple[int, int]]] = {}

    def pixels(self, image) -> torch.Tensor:
        return self.processor.transform(image)

    def __call__(self, sample) -> Prompt:
        image = sample.load_image()
        if sample.question not in self._ids:
            built = self.processor.build(sample.question, image)
            self._ids[sample.question] = (built.input_ids, built.visual_span)
            return built
        ids, span = self._ids[sample.question]
        return Prompt(list(ids), span, self.pixels(image))

    def check(self, sample) -> None:
        fast, slow = self(sample), self.processor.build(sample.question, sample.load_image())
        if fast.input_ids != slow.input_ids or fast.visual_span != slow.visual_span \
                or not torch.equal(fast.pixel_values, slow.pixel_values):
            raise RuntimeError("cached prompts differ from the processor's (a bug in FastPrompts)")


def base_loss(model, prompts: list[Prompt], answers: list[list[int]], eos: int, exit_layer: int | None,
              label_smoothing: float, visual: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Answer loss (answer + end of turn) with the visual tokens `visual` [B, V, H] spliced in, and
    (without an exit) the last prompt position's hidden state after each layer."""
    batch = answer_batch(prompts, answers, [a + [eos] for a in answers])
    hidden = embed_batch(model, batch, list(visual))
    dec = model.decoder
    L = dec.shape.num_layers
    end = L if exit_layer is None else exit_layer + 1
    empty = dec.empty_cache(hidden.shape[0], hidden.dtype, hidden.device)
    states = []
    for layer in range(end):
        hidden, _ = dec.run_layers(layer, layer + 1, hidden, batch.layout.position_ids, batch.layout.key_mask, [(empty, empty)])
        states.append(hidden[:, batch.prompt_len - 1])
    if exit_layer is None:
        slots = batch.answer_slots
        rows, targets = hidden[slots], batch.targets[slots]
    else:
        rows, _, targets = run_removed_branch(model, batch, hidden, exit_layer)
        states = []
    return F.cross_entropy(dec.logits(rows).float(), targets, label_smoothing=label_smoothing), states


def quick_accuracy(model, samples, policy="none") -> float:
    from exporter.data.answers import normalise, prepare_prompts, run_policy

    results = run_policy(model, prepare_prompts(model, samples), policy)
    return sum(normalise(r.text) == s.answer for r, s in zip(results, samples)) / len(samples)


def _optimizer(params, config: BaseTrainingConfig, steps: int):
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, steps, min(config.warmup_steps, steps // 4 + 1), config.min_lr_ratio))
    return optimizer, scheduler


def train_base(model, config: BaseTrainingConfig, log=print) -> dict:
    """Stage 0 (tower + projector on the dense loss), then stage 1 (everything: answer + dense loss)."""
    torch.manual_seed(config.seed)
    for layer in model.decoder.layers:  # residual branches start (near) silent: 8 layers train like fewer
        for weight in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
            weight.data.mul_(config.residual_init_scale)
    prompts_of = FastPrompts(model)
    tok = model.processor.tokenizer
    eos = model.processor.eos_token_ids[0]  # the template's end of turn (</s>, <|im_end|>, ...)
    L = model.shape.num_layers
    vcfg = model.vision.tower.config
    side = -(-(vcfg.image_size // vcfg.patch_size) // 2)
    probe = DenseProbe(model.shape.hidden_size)
    referent = ReferentProbe(model.shape.hidden_size, L, config.referent_from_layer)
    generator = torch.Generator().manual_seed(config.seed)
    eval_set = synthetic_split("eval", config.eval_samples, seed=config.seed, image_size=vcfg.image_size)
    history, t0 = [], time.perf_counter()
    model.train()

    def batch_at(start: int, max_objects: int):
        drawn = [labelled_sample("train", start + i, config.seed, vcfg.image_size, max_objects)
                 for i in range(config.batch_size)]
        samples = [d[0] for d in drawn]
        for i, (sample, objects, _) in enumerate(drawn):
            if (start + i) % 20 < round(config.caption_share * 20):
                sample.question, sample.answer, sample.kind = CAPTION_QUESTION, describe(objects), "caption"
        dense = torch.stack([dense_targets(objs, labels, side, 2 * vcfg.patch_size) for _, objs, labels in drawn])
        refs = torch.stack([referent_targets(sample, objs) for sample, objs, _ in drawn])
        return samples, dense, refs

    # stage 0: the vision half alone
    if config.vision_steps:
        params = list(model.vision.parameters()) + list(probe.parameters())
        optimizer, scheduler = _optimizer(params, config, config.vision_steps)
        running = []
        for step in range(config.vision_steps):
            samples, dense, _ = batch_at(VISION_OFFSET + step * config.batch_size, 5)
            loss = probe.loss(model.vision(torch.cat([prompts_of.pixels(s.image) for s in samples])), dense)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            running.append(loss.item())
            if (step + 1) % 50 == 0:
                log(f"vision step {step + 1}/{config.vision_steps}  dense loss {sum(running) / len(running):.4f}  "
                    f"{time.perf_counter() - t0:.0f}s")
                running = []

    # stage 1: the whole model
    params = [p for p in model.parameters() if p.requires_grad] + list(probe.parameters()) + list(referent.parameters())
    optimizer, scheduler = _optimizer(params, config, config.steps)
    running, running_dense = [], []
    for step in range(config.steps):
        max_objects = [n for start, n in config.curriculum if step >= start][-1]
        samples, dense, refs = batch_at(step * config.batch_size, max_objects)
        if step == 0:
            prompts_of.check(samples[0])
        prompts = [prompts_of(s) for s in samples]
        answers = [answer_ids(tok, s.answer) for s in samples]
        draw = torch.rand((), generator=generator).item()
        layer = int(torch.randint(0, L - 1, (1,), generator=generator))
        polish = step >= config.polish_from_step
        exit_layer = layer if polish and draw < config.exit_share else None
        visual = model.vision(torch.cat([p.pixel_values for p in prompts]))
        loss, states = base_loss(model, prompts, answers, eos, exit_layer,
                                 config.label_smoothing if polish else 0.0, visual)
        dense_loss = probe.loss(visual, dense)
        total = loss + config.dense_weight * dense_loss
        if states and config.referent_weight:
            total = total + config.referent_weight * referent.loss(states, refs)
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        running.append(loss.item())
        running_dense.append(dense_loss.item())
        if (step + 1) % 50 == 0:
            log(f"step {step + 1}/{config.steps}  loss {sum(running) / len(running):.4f}  "
                f"dense {sum(running_dense) / len(running_dense):.4f}  {time.perf_counter() - t0:.0f}s")
            running, running_dense = [], []
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            model.eval()
            acc = {p: quick_accuracy(model, eval_set, p) for p in config.eval_policies}
            model.train()
            history.append({"step": step + 1, "seconds": round(time.perf_counter() - t0, 1), **acc})
            log(f"  eval ({config.eval_samples} samples): " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    model.eval()
    return {"config": asdict(config), "history": history, "seconds": round(time.perf_counter() - t0, 1)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exporter.builtin.train_vila", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=str(BUILTIN_DIR / "vila"), help="where the VILA folder goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=BaseTrainingConfig.steps)
    p.add_argument("--batch-size", type=int, default=BaseTrainingConfig.batch_size)
    p.add_argument("--exit-share", type=float, default=BaseTrainingConfig.exit_share)
    p.add_argument("--vision-steps", type=int, default=BaseTrainingConfig.vision_steps)
    p.add_argument("--polish-from", type=int, default=BaseTrainingConfig.polish_from_step,
                   help="step from which label smoothing and exit practice apply")
    p.add_argument("--eval-samples", type=int, default=BaseTrainingConfig.eval_samples,
                   help="evaluation samples behind the accuracy printed during stage 1")
    p.add_argument("--router-samples", type=int, default=4000)
    p.add_argument("--router-epochs", type=int, default=12)
    p.add_argument("--router-lr", type=float, default=1e-3)
    p.add_argument("--router-inner", type=int, default=128)
    p.add_argument("--router-keep-weight", type=float, default=1.0)
    p.add_argument("--router-eval-samples", type=int, default=500)
    p.add_argument("--base-from", help="skip stages 0-1: take the base model from this VILA folder")
    p.add_argument("--save-base", help="also write the base model (before routers) to this folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args, argv: list[str] | None = None) -> int:
    from exporter.models.vila import Vila

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    t0 = time.perf_counter()
    if args.base_from:
        model = Vila().load(Path(args.base_from))
        base_log = json.loads((Path(args.base_from) / "training.json").read_text()).get("base", {}) \
            if (Path(args.base_from) / "training.json").is_file() else {}
    else:
        model = Vila().preset(seed=args.seed, name="builtin")
        model.routers = None
        config = BaseTrainingConfig(steps=args.steps, batch_size=args.batch_size, exit_share=args.exit_share,
                                    vision_steps=args.vision_steps, eval_samples=args.eval_samples,
                                    polish_from_step=args.polish_from,
                                    seed=args.seed)
        base_log = train_base(model, config, log=lambda m: print(m, flush=True))
        if args.save_base:
            model.native.save(Path(args.save_base))
            (Path(args.save_base) / "training.json").write_text(json.dumps({"base": base_log}, indent=2))
    model.routers = None
    rconfig = RouterTrainingConfig(epochs=args.router_epochs, batch_size=32, lr=args.router_lr,
                                   inner=args.router_inner, keep_weight=args.router_keep_weight,
                                   max_new_tokens=4, seed=args.seed, progress=not args.no_progress)
    train = synthetic_split("train", args.router_samples, seed=args.seed + 1)
    held = synthetic_split("eval", args.router_eval_samples, seed=args.seed + 1)
    routers, summary = train_routers(model, train, rconfig, held)
    print(format_summary(summary), flush=True)
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.native.save(staging)
    save_routers(routers, staging / "routers.safetensors",
                 metadata={k: summary[k] for k in ("num_layers", "train_samples", "epochs")})
    (staging / "training.json").write_text(json.dumps(
        {"base": base_log, "routers": summary, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1),
         "command": "python -m exporter.builtin.train_vila " + " ".join(argv or sys.argv[1:])}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"built-in VILA written to {out} in {time.perf_counter() - t0:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    from engines.core.errors import run_cli

    return run_cli(lambda args: run(args, argv), build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
