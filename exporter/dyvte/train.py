"""Training DyVTE's routers the way the paper does, on any family's `MultimodalModel`.

The MLLM is frozen. Each batch draws one layer k uniformly from 0..L-1 and runs the model to
layer k; from layer k+1 on it runs two branches, the unchanged one and one whose visual tokens are
removed (gathered out, positions keeping their ids, exactly as the runtime does at an exit). A
sample's label is exit (1) when, on its answer tokens, the removed branch's argmax agrees with the
unchanged branch's on more than 99% of positions and its LM loss is below 1.03x the unchanged
branch's; else keep (0). Router k learns it by cross-entropy on its logits for the features read
at layer k. Without reference answers the targets are the frozen model's own greedy answers.

Because the model is frozen, the unchanged branch's per-position predictions and losses are
computed once per sample (that is the branch that made the greedy answer), and each (sample,
layer) label, once computed, is kept for later epochs while it fits the cache budget.

    routers, summary = train_routers(model, samples, RouterTrainingConfig(...))
    python -m exporter.dyvte.train --model vila --data synthetic --output routers.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from exporter.data import VQASample
from engines.core.dyvte import (
    EXIT, KEEP, BatchLayout, drop_visual, layout_prompts, router_features, router_weights, splice_visual,
)
from exporter.dyvte.router import ROUTER_INNER, Routers, save_routers
from engines.core.errors import DyVTEError
from engines.core.prompt import Prompt
from exporter.models.base import MultimodalModel

IGNORE = -100


@dataclass
class RouterTrainingConfig:
    """The paper's recipe by default (lr 6e-5, cosine, 3% warm-up, no weight decay, 1 epoch); tiny
    models trained from fresh routers want a larger lr and several epochs (the built-in VILA uses
    lr 1e-3 and 12 epochs, see exporter/builtin/train_vila.py)."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 6e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    agreement: float = 0.99  # exit needs the branches to agree on more than this share of positions
    loss_ratio: float = 1.03  # ... and the removed branch's loss below this times the unchanged one's
    targets: str = "greedy"  # greedy: the model's own answers; data: the records' reference answers
    max_new_tokens: int = 32  # length limit of the greedy answers
    inner: int = ROUTER_INNER  # width of fresh routers (the published ones: 2048)
    keep_weight: float = 1.0  # cross-entropy weight of the keep class (>1: routers err towards keep)
    seed: int = 0
    summary_samples: int = 512  # samples (all layers each) behind the summary when no eval set is given
    cache_mb: float = 1024.0  # memory for cached visual embeddings and (sample, layer) labels
    progress: bool = True

    def __post_init__(self):
        if self.targets not in ("greedy", "data"):
            raise DyVTEError(f"targets must be 'greedy' or 'data', not {self.targets!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise DyVTEError("epochs and batch size must be at least 1")
        if not 0 < self.agreement <= 1 or self.loss_ratio <= 0:
            raise DyVTEError("agreement must be in (0, 1] and loss_ratio positive")


# --------------------------------------------------------------------------- the label rule


@dataclass
class LabelStats:
    """Per sample: the exit label, the branches' argmax agreement and their mean answer losses."""

    labels: torch.Tensor  # [B] long, EXIT or KEEP
    agreement: torch.Tensor  # [B]
    loss_unchanged: torch.Tensor  # [B]
    loss_removed: torch.Tensor  # [B]


def label_rule(agreement: torch.Tensor, loss_unchanged: torch.Tensor, loss_removed: torch.Tensor,
               min_agreement: float = 0.99, loss_ratio: float = 1.03) -> torch.Tensor:
    """EXIT where agreement > min_agreement and loss_removed < loss_ratio * loss_unchanged."""
    ok = (agreement > min_agreement) & (loss_removed < loss_ratio * loss_unchanged)
    return torch.where(ok, torch.full_like(agreement, EXIT, dtype=torch.long),
                       torch.full_like(agreement, KEEP, dtype=torch.long))


def _per_sample_mean(values: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    total = torch.zeros(batch, dtype=torch.float64).index_add_(0, rows, values.double())
    count = torch.zeros(batch, dtype=torch.float64).index_add_(0, rows, torch.ones_like(values, dtype=torch.float64))
    return (total / count.clamp(min=1)).float()


def _stats(ref_pred, ref_nll, pred, nll, rows, batch, min_agreement, loss_ratio) -> LabelStats:
    agreement = _per_sample_mean((pred == ref_pred).float(), rows, batch)
    loss_u = _per_sample_mean(ref_nll, rows, batch)
    loss_r = _per_sample_mean(nll, rows, batch)
    return LabelStats(label_rule(agreement, loss_u, loss_r, min_agreement, loss_ratio), agreement, loss_u, loss_r)


def exit_labels(unchanged_logits: torch.Tensor, removed_logits: torch.Tensor, targets: torch.Tensor,
                mask: torch.Tensor | None = None, min_agreement: float = 0.99, loss_ratio: float = 1.03) -> LabelStats:
    """The rule on two branches' answer logits [B, T, V] with targets [B, T] (mask: which count)."""
    mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
    rows = torch.nonzero(mask)[:, 0]
    t = targets[mask]
    u, r = unchanged_logits[mask].float(), removed_logits[mask].float()
    return _stats(u.argmax(-1), F.cross_entropy(u, t, reduction="none"), r.argmax(-1),
                  F.cross_entropy(r, t, reduction="none"), rows, targets.shape[0], min_agreement, loss_ratio)


# --------------------------------------------------------------------------- batches


@dataclass
class AnswerBatch:
    """The runtime's prefill layout of the prompts (`engines.core.dyvte.layout_prompts`) with the
    answers appended after column P = `prompt_len`.

    `targets[b, j]` is the token that position j must predict (IGNORE elsewhere): the answer slots
    are P-1 .. P-2+n. Prompt columns [0, P) are then exactly the runtime's prefill batch."""

    layout: BatchLayout
    targets: torch.Tensor  # [B, S] long

    @property
    def prompt_len(self) -> int:
        return self.layout.prompt_len

    @property
    def answer_slots(self) -> torch.Tensor:
        return self.targets != IGNORE


def answer_batch(prompts: list[Prompt], answers: list[list[int]], targets: list[list[int]]) -> AnswerBatch:
    """Inputs prompt + answers[b]; position P-1+j must predict targets[b][j] (len(targets) <=
    len(answers) + 1: the token after the last input may be predicted too)."""
    layout = layout_prompts(prompts, answers)
    P = layout.prompt_len
    tgt = torch.full(layout.input_ids.shape, IGNORE, dtype=torch.long)
    for b, (a, t) in enumerate(zip(answers, targets)):
        if len(t) > len(a) + 1:
            raise ValueError("more targets than answer positions")
        tgt[b, P - 1:P - 1 + len(t)] = torch.tensor(t, dtype=torch.long)
    return AnswerBatch(layout, tgt)


def embed_batch(model: MultimodalModel, batch: AnswerBatch, visual: list[torch.Tensor | None]) -> torch.Tensor:
    """Token embeddings with each row's visual embeddings [V_b, H] written over its visual span."""
    device = next(model.decoder.parameters()).device
    embeds = model.decoder.embed_tokens(batch.layout.input_ids.to(device))
    return splice_visual(embeds, batch.layout.visual, visual)


def run_removed_branch(model: MultimodalModel, batch: AnswerBatch, hidden_k: torch.Tensor, k: int) -> tuple:
    """Layers k+1..L-1 after the runtime's exit at layer k (`engines.core.dyvte.drop_visual`);
    (final hidden rows at the answer slots, their row ids, their targets)."""
    dec = model.decoder
    device = hidden_k.device
    lay = batch.layout
    key_mask, hidden, positions, targets = drop_visual(lay.key_mask.to(device), lay.visual, hidden_k,
                                                       lay.position_ids.to(device), batch.targets.to(device))
    L = dec.shape.num_layers
    if k + 1 < L:
        empty = dec.empty_cache(hidden.shape[0], hidden.dtype, device)
        hidden, _ = dec.run_layers(k + 1, L, hidden, positions, key_mask, [(empty, empty)] * (L - k - 1))
    slots = targets != IGNORE
    return hidden[slots], torch.nonzero(slots)[:, 0].cpu(), targets[slots].cpu()


def answer_predictions(model: MultimodalModel, hidden_rows: torch.Tensor, targets: torch.Tensor):
    """(argmax, per-position NLL) of the LM head on final hidden rows [N, H] against targets [N]."""
    logits = model.decoder.logits(hidden_rows).float().cpu()
    return logits.argmax(-1), F.cross_entropy(logits, targets, reduction="none")


# --------------------------------------------------------------------------- preparing samples


class PreparedData:
    """Prompts, answer tokens and the unchanged branch's per-position results of each sample."""

    def __init__(self, model: MultimodalModel, samples: list[VQASample], config: RouterTrainingConfig, desc: str):
        self.model, self.samples, self.config = model, samples, config
        self.prompts: list[Prompt] = []
        self.answers: list[list[int]] = []
        self.targets: list[list[int]] = []
        self.ref_pred: list[torch.Tensor] = []
        self.ref_nll: list[torch.Tensor] = []
        self.visual: list[torch.Tensor | None] = []
        self._prepare(desc)

    def __len__(self) -> int:
        return len(self.prompts)

    def _build(self, sample: VQASample) -> Prompt:
        prompt = self.model.processor.build(sample.question, sample.load_image())
        if prompt.visual_span is None:
            raise DyVTEError(f"sample {sample.id}: the prompt has no image positions")
        return prompt

    def visual_of(self, i: int) -> torch.Tensor:
        if self.visual[i] is not None:
            return self.visual[i]
        return self.model.encode_images(self._build(self.samples[i]).pixel_values)

    def _prepare(self, desc: str) -> None:
        from tqdm import tqdm

        cfg, model = self.config, self.model
        budget = cfg.cache_mb * 2**20 / 2  # half for visual embeddings
        used = 0.0
        bs = cfg.batch_size
        bar = tqdm(total=len(self.samples), desc=desc, unit="sample", disable=not cfg.progress, leave=False)
        for start in range(0, len(self.samples), bs):
            chunk = self.samples[start:start + bs]
            prompts = [self._build(s) for s in chunk]
            visual = [model.encode_images(p.pixel_values) for p in prompts]
            answers, stops = self._answers(chunk, prompts)
            batch = answer_batch(prompts, answers, [a + [0] * s for a, s in zip(answers, stops)])
            with torch.no_grad():
                hidden = embed_batch(model, batch, visual)
                L = model.shape.num_layers
                empty = model.decoder.empty_cache(hidden.shape[0], hidden.dtype, hidden.device)
                hidden, _ = model.decoder.run_layers(0, L, hidden, batch.layout.position_ids.to(hidden.device),
                                                     batch.layout.key_mask.to(hidden.device), [(empty, empty)] * L)
                slots = batch.answer_slots.to(hidden.device)
                logits = model.decoder.logits(hidden[slots]).float().cpu()
            rows = torch.nonzero(batch.answer_slots)[:, 0]
            pred = logits.argmax(-1)
            for b, (prompt, answer, stop) in enumerate(zip(prompts, answers, stops)):
                sel = rows == b
                target = list(answer)
                if stop:  # the greedy answer ended with a stop token: the token argmax gives there
                    target.append(int(pred[sel][-1]) if cfg.targets == "greedy" else stop_token(model))
                t = torch.tensor(target, dtype=torch.long)
                self.prompts.append(Prompt(prompt.input_ids, prompt.visual_span, None))
                self.answers.append(answer)
                self.targets.append(target)
                self.ref_pred.append(pred[sel])
                self.ref_nll.append(F.cross_entropy(logits[sel], t, reduction="none"))
                v = visual[b].detach().cpu()
                size = v.numel() * v.element_size()
                self.visual.append(v if used + size <= budget else None)
                used += size if used + size <= budget else 0
            bar.update(len(chunk))
        bar.close()

    def _answers(self, chunk: list[VQASample], prompts: list[Prompt]) -> tuple[list[list[int]], list[int]]:
        """Answer tokens fed as inputs, and 1 where a stop token is predicted after them (else 0)."""
        model, cfg = self.model, self.config
        if cfg.targets == "data":
            tok = model.processor.tokenizer
            out = []
            for s in chunk:
                if not s.answer:
                    raise DyVTEError(f"sample {s.id} has no reference answer (use greedy targets)")
                out.append(list(tok(s.answer, add_special_tokens=False)["input_ids"]))
            return out, [1] * len(chunk)
        from engines.backends.torch_backend import TorchBackend
        from engines.orchestrator import Runtime
        from engines.policy import GenerationConfig

        runtime = Runtime(TorchBackend(model), model.processor)
        results = runtime.generate(prompts, "none", GenerationConfig(max_new_tokens=cfg.max_new_tokens))
        answers = [r.generated_ids for r in results]
        return answers, [int(len(a) < cfg.max_new_tokens) for a in answers]


def stop_token(model: MultimodalModel) -> int:
    stops = model.processor.eos_token_ids
    if not stops:
        raise DyVTEError("the model's processor declares no stop token")
    return stops[0]


# --------------------------------------------------------------------------- examples per layer


@dataclass
class Example:
    feature: torch.Tensor  # [2H] float32
    label: int
    agreement: float
    loss_unchanged: float
    loss_removed: float


class LayerExamples:
    """Router inputs and exit labels of (sample, layer) pairs, computed in batches and cached."""

    def __init__(self, model: MultimodalModel, data: PreparedData, config: RouterTrainingConfig):
        self.model, self.data, self.config = model, data, config
        self.cache: dict[tuple[int, int], Example] = {}
        self.budget = config.cache_mb * 2**20 / 2
        self.used = 0.0

    @torch.no_grad()
    def get(self, rows: list[int], k: int) -> list[Example]:
        missing = [i for i in rows if (i, k) not in self.cache]
        fresh = dict(zip(missing, self._compute(missing, k))) if missing else {}
        out = []
        for i in rows:
            ex = self.cache.get((i, k)) or fresh[i]
            if (i, k) not in self.cache and self.used < self.budget:
                self.cache[(i, k)] = ex
                self.used += ex.feature.numel() * 4 + 64
            out.append(ex)
        return out

    def _compute(self, rows: list[int], k: int) -> list[Example]:
        model, data, cfg = self.model, self.data, self.config
        batch = answer_batch([data.prompts[i] for i in rows], [data.answers[i] for i in rows],
                             [data.targets[i] for i in rows])
        hidden = embed_batch(model, batch, [data.visual_of(i) for i in rows])
        device = hidden.device
        empty = model.decoder.empty_cache(hidden.shape[0], hidden.dtype, device)
        lay = batch.layout
        hidden_k, _ = model.decoder.run_layers(0, k + 1, hidden, lay.position_ids.to(device),
                                               lay.key_mask.to(device), [(empty, empty)] * (k + 1))
        P = batch.prompt_len  # the router reads the prefill columns, as the runtime's does
        weights = router_weights(lay.visual[:, :P]).to(device)
        features = router_features(hidden_k[:, :P], weights).float().cpu()
        final, row_ids, targets = run_removed_branch(model, batch, hidden_k, k)
        pred, nll = answer_predictions(model, final, targets)
        ref_pred = torch.cat([data.ref_pred[i] for i in rows])
        ref_nll = torch.cat([data.ref_nll[i] for i in rows])
        stats = _stats(ref_pred, ref_nll, pred, nll, row_ids, len(rows), cfg.agreement, cfg.loss_ratio)
        return [Example(features[b], int(stats.labels[b]), float(stats.agreement[b]), float(stats.loss_unchanged[b]),
                        float(stats.loss_removed[b])) for b in range(len(rows))]


# --------------------------------------------------------------------------- training


def cosine_with_warmup(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up to 1, then a cosine down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _freeze(model: MultimodalModel) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def train_routers(model: MultimodalModel, samples: list[VQASample], config: RouterTrainingConfig | None = None,
                  eval_samples: list[VQASample] | None = None) -> tuple[Routers, dict]:
    """Fresh routers trained on `samples` with the model frozen; returns them and a summary whose
    per-layer numbers come from `eval_samples` (held out), else from up to `summary_samples` of
    the training samples."""
    from tqdm import tqdm

    config = config or RouterTrainingConfig()
    if not samples:
        raise DyVTEError("no training samples")
    t0 = time.perf_counter()
    _freeze(model)
    shape = model.shape
    L = shape.num_layers
    data = PreparedData(model, samples, config, "greedy answers" if config.targets == "greedy" else "answers")
    examples = LayerExamples(model, data, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        routers = Routers(L, shape.hidden_size, config.inner)
    optimizer = torch.optim.AdamW(routers.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(data) / config.batch_size)
    total = config.epochs * per_epoch
    warmup = max(1, round(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    weight = torch.tensor([config.keep_weight, 1.0])
    generator = torch.Generator().manual_seed(config.seed)
    epoch_losses = []
    bar = tqdm(total=total, desc="training routers", unit="batch", disable=not config.progress)
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=generator).tolist()
        losses = []
        for start in range(0, len(order), config.batch_size):
            rows = order[start:start + config.batch_size]
            k = int(torch.randint(0, L, (1,), generator=generator))
            batch = examples.get(rows, k)
            features = torch.stack([e.feature for e in batch])
            labels = torch.tensor([e.label for e in batch])
            loss = F.cross_entropy(routers(k, features), labels, weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(layer=k, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}",
                            exit=f"{float(labels.float().mean()):.2f}")
        epoch_losses.append(sum(losses) / len(losses))
    bar.close()
    routers.eval()
    train_seconds = time.perf_counter() - t0
    if eval_samples:
        held = LayerExamples(model, PreparedData(model, eval_samples, config, "held-out answers"), config)
        summary_rows, source = list(range(len(held.data))), "held-out"
    else:
        held, summary_rows, source = examples, list(range(min(len(data), config.summary_samples))), "training"
    summary = summarize(routers, held, summary_rows, config)
    summary.update(
        summary_source=source, train_samples=len(data), epochs=config.epochs, steps=total,
        epoch_losses=[round(x, 5) for x in epoch_losses], seconds=round(time.perf_counter() - t0, 1),
        train_seconds=round(train_seconds, 1), config=asdict(config),
    )
    return routers, summary


@torch.no_grad()
def summarize(routers: Routers, examples: LayerExamples, rows: list[int], config: RouterTrainingConfig) -> dict:
    """Per layer: share of exit labels, router accuracy on keep and on exit; and the exit layer the
    runtime's rule would give (first layer 0..L-2 whose router says exit) next to the labels' own
    first exit layer, both as the mean number of layers the visual tokens pass through."""
    L = len(routers)
    decisions = torch.zeros(len(rows), L, dtype=torch.bool)
    labels = torch.zeros(len(rows), L, dtype=torch.bool)
    layers = []
    for k in range(L):
        batch = []
        for start in range(0, len(rows), config.batch_size):
            batch += examples.get(rows[start:start + config.batch_size], k)
        feats = torch.stack([e.feature for e in batch])
        lab = torch.tensor([e.label for e in batch]) == EXIT
        pred = routers(k, feats).argmax(-1) == EXIT
        decisions[:, k], labels[:, k] = pred, lab
        keep_n, exit_n = int((~lab).sum()), int(lab.sum())
        layers.append({
            "layer": k,
            "examples": len(batch),
            "exit_share": round(exit_n / len(batch), 4),
            "keep_accuracy": round(float((~pred[~lab]).float().mean()), 4) if keep_n else None,
            "exit_accuracy": round(float(pred[lab].float().mean()), 4) if exit_n else None,
            "mean_agreement": round(sum(e.agreement for e in batch) / len(batch), 4),
        })

    def mean_layers(flags: torch.Tensor) -> float:
        asked = flags[:, : L - 1]
        first = torch.where(asked.any(1), asked.int().argmax(1) + 1, torch.full((len(rows),), L))
        return round(float(first.float().mean()), 3)

    return {"num_layers": L, "layers": layers, "router_mean_visual_layers": mean_layers(decisions),
            "label_mean_visual_layers": mean_layers(labels)}


def format_summary(summary: dict) -> str:
    lines = [f"{'layer':>5} {'exit labels':>11} {'acc keep':>8} {'acc exit':>8} {'agreement':>9}"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for row in summary["layers"]:
        lines.append(f"{row['layer']:>5} {row['exit_share']:>11.3f} {fmt(row['keep_accuracy']):>8} "
                     f"{fmt(row['exit_accuracy']):>8} {row['mean_agreement']:>9.3f}")
    lines.append(f"visual tokens pass through {summary['router_mean_visual_layers']:.2f} layers on average with "
                 f"these routers ({summary['label_mean_visual_layers']:.2f} by the labels) of {summary['num_layers']}"
                 f" ({summary['summary_source']} samples)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exporter.dyvte.train",
                                description="Train DyVTE routers for a frozen MLLM (the paper's recipe).")
    p.add_argument("--model", required=True, help="model family (vila, ...)")
    p.add_argument("--checkpoint", help="a checkpoint folder in the family's native layout (default: built-in)")
    p.add_argument("--template", help="conversation template of original layouts")
    p.add_argument("--vision-tower", help="local vision tower folder (original LLaVA layout)")
    p.add_argument("--data", required=True, help="'synthetic' (the built-in VQA task) or a LLaVA-style .jsonl/.json")
    p.add_argument("--images", help="image folder the records' 'image' paths are relative to")
    p.add_argument("--samples", type=int, help="use the first N training samples (synthetic: default 4000)")
    p.add_argument("--eval-samples", type=int, default=0,
                   help="held-out samples for the summary (synthetic: its eval split; JSONL: the last N records)")
    p.add_argument("--output", required=True, help="where to write the routers (.safetensors, published keys)")
    p.add_argument("--summary", help="write the training summary as JSON here")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=6e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--inner", type=int, default=ROUTER_INNER, help="router hidden width (published: 2048)")
    p.add_argument("--keep-weight", type=float, default=1.0, help="loss weight of the keep class")
    p.add_argument("--targets", choices=("greedy", "data"), default="greedy")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def config_from_args(args) -> RouterTrainingConfig:
    return RouterTrainingConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_ratio=args.warmup_ratio,
        inner=args.inner, keep_weight=args.keep_weight, targets=args.targets, max_new_tokens=args.max_new_tokens,
        seed=args.seed, progress=not args.no_progress,
    )


def load_training_data(data: str, images: str | None, samples: int | None, eval_samples: int, seed: int = 0):
    from exporter.data import load_samples

    if data == "synthetic":
        train = load_samples("synthetic", split="train", size=samples or 4000, seed=seed)
        held = load_samples("synthetic", split="eval", size=eval_samples, seed=seed) if eval_samples else None
        return train, held
    records = load_samples(data, images)
    held = records[-eval_samples:] if eval_samples else None
    train = records[:-eval_samples] if eval_samples else records
    if not train:
        raise DyVTEError(f"{data}: no records left for training after holding out {eval_samples}")
    return (train[:samples] if samples else train), held


def run(args) -> int:
    from exporter.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    train, held = load_training_data(args.data, args.images, args.samples, args.eval_samples, args.seed)
    options = {k: v for k, v in (("vision_tower", args.vision_tower), ("template", args.template)) if v}
    model = load_model(args.model, args.checkpoint, **options)
    routers, summary = train_routers(model, train, config, held)
    summary.update(model=args.model, checkpoint=args.checkpoint, data=args.data)
    out = save_routers(routers, args.output, metadata={k: summary[k] for k in ("num_layers", "train_samples", "epochs")})
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    print(f"routers written to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from engines.core.errors import run_cli

    return run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
