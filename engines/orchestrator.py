"""The runtime orchestrator: prefill segment by segment, exit the visual tokens, decode with a KV cache.

It owns DyVTE's logic once, for every backend and family: a backend only runs graphs (vision,
token embedding, decoder segments, routers, LM head) on torch tensors. Samples of a batch that
exit at different layers are split into cohorts during prefill, so each runs at its own length,
and merged again for decoding, where every layer keeps its own (left-padded) cache length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engines.backends.base import Backend
from engines.kv_cache import KVCache
from engines.memory import RuntimeLimits
from engines.policy import ExitPolicy, GenerationConfig, TokenSampler
from engines.core.dyvte import drop_visual, exit_decision, layout_prompts, router_weights, splice_visual
from engines.core.errors import DyVTEError
from engines.core.prompt import Prompt


@dataclass
class Generation:
    """One sample's result, in the fields the CLI's --json prints."""

    input_ids: list[int]
    visual_span: tuple[int, int] | None
    generated_ids: list[int] = field(default_factory=list)
    text: str = ""
    exit_layer: int | None = None
    router_logits: dict[int, list[float]] = field(default_factory=dict)
    first_logits: torch.Tensor | None = None  # the prefill's last-position logits
    step_logits: list[torch.Tensor] = field(default_factory=list)  # with keep_logits: one per token
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Cohort:
    """Samples that are in the same mode (visual tokens present or gone) during prefill."""

    rows: torch.Tensor  # indices into the batch
    hidden: torch.Tensor  # [b, S, H]
    position_ids: torch.Tensor  # [b, S], original numbering (a gap where the image was)
    key_mask: torch.Tensor  # [b, S] 1 = real token, 0 = left padding
    visual: torch.Tensor  # [b, S] True at visual positions
    caches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def select(self, idx: torch.Tensor) -> "Cohort":
        return Cohort(
            self.rows[idx], self.hidden[idx], self.position_ids[idx], self.key_mask[idx], self.visual[idx],
            [(k[idx], v[idx], m[idx]) for k, v, m in self.caches],
        )

    def drop_visual(self) -> "Cohort":
        """The exit (see `engines.core.dyvte.drop_visual`)."""
        key_mask, hidden, positions = drop_visual(self.key_mask, self.visual, self.hidden, self.position_ids)
        return Cohort(self.rows, hidden, positions, key_mask, torch.zeros_like(key_mask, dtype=torch.bool),
                      self.caches)


class Runtime:
    """Generation with DyVTE on any backend: `Runtime(backend, processor).generate(prompts, ...)`."""

    def __init__(self, backend: Backend, processor, limits: RuntimeLimits | None = None):
        """`limits`: the batch / token budget `generate` and `prefill` enforce (None: unbounded,
        as for the PyTorch reference in training); `open_package` sets one."""
        self.backend = backend
        self.processor = processor
        self.limits = limits

    def admits(self, batch: int, tokens: int) -> bool:
        """Whether a batch of `batch` rows holding `tokens` cache positions in all (prompts + new
        tokens) is within this runtime's limits (what a scheduler asks before joining requests)."""
        return self.limits is None or self.limits.admits(batch, tokens)

    def prepare(self, question: str, image=None) -> Prompt:
        return self.processor.build(question, image)

    def prepare_chat(self, turns, image=None) -> Prompt:
        """A conversation (`engines.core.prompt.Turn`s: system / user / assistant; the user turn
        with `image=True` holds `image`) in the family's chat prompt."""
        return self.processor.build_chat(turns, image)

    # ------------------------------------------------------------------ public

    @torch.no_grad()
    def generate(
        self,
        prompts: list[Prompt],
        policy: ExitPolicy | str = "dynamic",
        config: GenerationConfig | None = None,
        on_token: Callable[[int, int], None] | None = None,
        observe: Callable[[str, int, torch.Tensor], None] | None = None,
        probe_routers: bool = False,
    ) -> list[Generation]:
        """Generate for a batch. `on_token(sample, token)` streams tokens as they are chosen;
        `observe(stage, sample, tensor)` sees every stage's output of the prefill (visual
        embeddings, each segment's hidden states at the sample's real positions) for parity
        checks; `probe_routers` records router logits at every candidate layer without acting on
        them (with policy `none`)."""
        policy = ExitPolicy.parse(policy) if isinstance(policy, str) else policy
        config = config or GenerationConfig()
        self.check(prompts, policy, config.max_new_tokens, whole_batch=False)
        chunks = self._chunks(prompts, config.max_new_tokens)
        if len(chunks) > 1:  # over the limits: run in batches that fit, results in order
            out: list[Generation] = []
            for start, stop in chunks:
                tokens = observed = None
                if on_token is not None:
                    tokens = lambda sample, token, _o=start: on_token(sample + _o, token)  # noqa: E731
                if observe is not None:
                    observed = lambda stage, sample, t, _o=start: observe(stage, sample + _o, t)  # noqa: E731
                out += self.generate(prompts[start:stop], policy, config, tokens, observed, probe_routers)
            return out
        results = [Generation(list(p.input_ids), p.visual_span) for p in prompts]
        t0 = time.perf_counter()
        batch = self.prefill(prompts, policy, results, observe, probe_routers, reserve=config.max_new_tokens)
        t2 = time.perf_counter()
        self._decode(batch, config, results, on_token)
        t3 = time.perf_counter()
        for r in results:
            r.text = self.processor.decode(r.generated_ids)
            r.timings_ms = {
                "vision": 1e3 * batch.vision_seconds,
                "prefill": 1e3 * (t2 - t0 - batch.vision_seconds),
                "decode": 1e3 * (t3 - t2),
                "total": 1e3 * (t3 - t0),
            }
        return results

    @torch.no_grad()
    def prefill(self, prompts: list[Prompt], policy: ExitPolicy, results: list[Generation], observe=None,
                probe: bool = False, reserve: int = 1) -> "Prefilled":
        """Vision, then the decoder segment by segment with each sample exiting at its own layer;
        returns the batch's KV cache (with `reserve` free slots) and its last-position logits.
        Exit layers and router logits are written into `results`."""
        t0 = time.perf_counter()
        visual = self._encode_images(prompts, observe)
        vision_seconds = time.perf_counter() - t0
        cohorts, logits = self._prefill(prompts, visual, policy, results, observe, probe)
        rows = self._cache_rows(cohorts, len(prompts))
        positions = torch.tensor([len(p.input_ids) for p in prompts], device=self.backend.device)
        return Prefilled(rows, positions, logits, vision_seconds, list(self.backend.segments), reserve,
                         self.backend.shape.max_positions - 1)

    @torch.no_grad()
    def decode_step(self, cache: KVCache, tokens: list[int], positions: torch.Tensor) -> torch.Tensor:
        """One token for every row of `cache` (written into it); returns the logits [B, vocab].
        Every segment gets its own key mask: its layers' caches are as long as its rows' exits
        made them."""
        b = self.backend
        ids = torch.tensor(tokens, device=b.device)[:, None]
        masks, past = cache.step_inputs()
        logits, new = b.decode_step(ids, positions[:, None], masks, past)
        cache.append(new)
        return logits[:, -1]

    # ------------------------------------------------------------------ checks

    def _chunks(self, prompts: list[Prompt], max_new_tokens: int) -> list[tuple[int, int]]:
        """Consecutive [start, stop) ranges of `prompts` that each fit the runtime's limits."""
        if self.limits is None:
            return [(0, len(prompts))]
        chunks, start, tokens = [], 0, 0
        for i, p in enumerate(prompts):
            need = len(p.input_ids) + max_new_tokens
            if i > start and not self.limits.admits(i - start + 1, tokens + need):
                chunks.append((start, i))
                start, tokens = i, 0
            tokens += need
        chunks.append((start, len(prompts)))
        return chunks

    def check(self, prompts: list[Prompt], policy: ExitPolicy, max_new_tokens: int, whole_batch: bool = True) -> None:
        """Refuse (DyVTEError) what this backend cannot run: no prompts, a dynamic policy without
        routers, a static exit where no segment ends, a prompt too long for the context, a prompt
        over the runtime's token limit, and (`whole_batch`, for callers that cannot split it) a
        batch over the runtime's limits."""
        b = self.backend
        if not prompts:
            raise DyVTEError("nothing to generate: no prompts given")
        if policy.kind == "dynamic" and not b.router_layers:
            raise DyVTEError(
                "this model has no DyVTE routers: pass --routers FILE, or use --exit-policy none or layer:K"
            )
        if policy.kind == "static":
            ends = [end - 1 for _, end in b.segments]
            if policy.layer not in ends:
                raise DyVTEError(
                    f"cannot exit after layer {policy.layer}: exits are possible after layers "
                    f"{_ranges(ends)} of this model (0-based)"
                )
        limit = b.shape.max_positions
        for i, p in enumerate(prompts):
            if len(p.input_ids) + max_new_tokens > limit:
                raise DyVTEError(
                    f"prompt {i} has {len(p.input_ids)} tokens (with the image); with {max_new_tokens} "
                    f"new tokens it exceeds the model's context of {limit} positions"
                )
        if self.limits is not None:
            if whole_batch:
                self.limits.check(len(prompts), sum(len(p.input_ids) + max_new_tokens for p in prompts))
            else:
                for p in prompts:
                    self.limits.check(1, len(p.input_ids) + max_new_tokens)

    # ------------------------------------------------------------------ stages

    def _encode_images(self, prompts: list[Prompt], observe=None) -> list[torch.Tensor | None]:
        """Visual embeddings per sample; images of equal shape go through the tower together."""
        out: list[torch.Tensor | None] = [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(prompts):
            if p.pixel_values is not None:
                groups.setdefault(tuple(p.pixel_values.shape), []).append(i)
        for idx in groups.values():
            pixels = torch.cat([prompts[i].pixel_values for i in idx])
            feats = self.backend.encode_images(pixels)
            tiles = [prompts[i].pixel_values.shape[0] for i in idx]
            for i, chunk in zip(idx, torch.split(feats, tiles)):
                out[i] = chunk.reshape(-1, feats.shape[-1])
                if observe:
                    observe("vision", i, out[i])
                if out[i].shape[0] != prompts[i].num_visual:
                    raise DyVTEError(
                        f"the vision graph gave {out[i].shape[0]} visual tokens but the prompt has "
                        f"{prompts[i].num_visual} image positions"
                    )
        return out

    def _batch_inputs(self, prompts: list[Prompt], visual: list[torch.Tensor | None]) -> Cohort:
        """Left-padded embeddings with the visual embeddings spliced in, positions and masks."""
        dev = self.backend.device
        layout = layout_prompts(prompts)
        hidden = splice_visual(self.backend.embed(layout.input_ids.to(dev)), layout.visual, visual)
        return Cohort(torch.arange(len(prompts)), hidden, layout.position_ids.to(dev), layout.key_mask.to(dev),
                      layout.visual.to(dev))

    def _prefill(self, prompts, visual, policy, results, observe=None, probe=False):
        b = self.backend
        cohorts = [self._batch_inputs(prompts, visual)]
        for index, (start, end) in enumerate(b.segments):
            nxt = []
            for c in cohorts:
                empty = torch.zeros(c.hidden.shape[0], b.shape.num_kv_heads, 0, b.shape.head_dim,
                                    dtype=b.dtype, device=b.device)
                phase = "pre_exit" if bool(c.visual.any()) else "post_exit"
                c.hidden, presents = b.run_segment(index, c.hidden, c.position_ids, c.key_mask,
                                                   [(empty, empty)] * (end - start), phase)
                c.caches.extend((k, v, c.key_mask) for k, v in presents)
                if observe:
                    valid = c.key_mask.bool()
                    for j, row in enumerate(c.rows.tolist()):
                        observe(f"layers {start}-{end - 1}", row, c.hidden[j][valid[j]])
                nxt.extend(self._exit_step(c, end - 1, policy, results, probe))
            cohorts = nxt
        logits = torch.zeros(len(prompts), b.shape.vocab_size, dtype=torch.float32)
        for c in cohorts:
            logits[c.rows] = b.logits(c.hidden[:, -1:, :])[:, -1].float().cpu()
        for i, r in enumerate(results):
            r.first_logits = logits[i]
        return cohorts, logits

    def _exit_step(self, c: Cohort, layer: int, policy: ExitPolicy, results, probe=False) -> list[Cohort]:
        """Ask the policy whether samples of this cohort exit after `layer`; split if they differ."""
        if layer >= self.backend.shape.num_layers - 1 or (policy.kind == "none" and not probe):
            return [c]
        has_visual = c.visual.any(dim=1)
        if not bool(has_visual.any()):
            return [c]
        if policy.kind == "static":
            leave = has_visual if layer == policy.layer else torch.zeros_like(has_visual)
        elif layer in self.backend.router_layers and (policy.kind == "dynamic" or probe):
            logits = self.backend.router_logits(layer, c.hidden, router_weights(c.visual)).float().cpu()
            for row, lg, hv in zip(c.rows.tolist(), logits, has_visual.tolist()):
                if hv:
                    results[row].router_logits[layer] = lg.tolist()
            if policy.kind != "dynamic":
                return [c]
            leave = exit_decision(logits).to(has_visual.device) & has_visual
        else:
            return [c]
        if not bool(leave.any()):
            return [c]
        for row in c.rows[leave.cpu()].tolist():
            results[row].exit_layer = layer
        if bool(leave.all()):
            return [c.drop_visual()]
        go, stay = torch.nonzero(leave).flatten(), torch.nonzero(~leave).flatten()
        return [c.select(go).drop_visual(), c.select(stay)]

    @staticmethod
    def _cache_rows(cohorts: list[Cohort], batch: int):
        """Per sample, per layer, the (keys [KV, T, D], values) of its real tokens, from the
        cohorts' prefill caches (left-padded, so a sample's tokens are the last n of its row)."""
        rows: list[list] = [[] for _ in range(batch)]
        for c in cohorts:
            for j, row in enumerate(c.rows.tolist()):
                for k, v, mask in c.caches:
                    n = int(mask[j].sum())
                    rows[row].append((k[j, :, k.shape[2] - n:], v[j, :, v.shape[2] - n:]))
        return rows

    def _decode(self, batch: "Prefilled", config, results, on_token) -> None:
        sampler = TokenSampler(config, len(results))
        stop = set(self.processor.eos_token_ids or [])
        logits = batch.logits
        tokens = sampler(logits)
        done = [False] * len(results)
        positions = batch.positions
        for step in range(config.max_new_tokens):
            for i, t in enumerate(tokens):
                if done[i]:
                    continue
                if t in stop:
                    done[i] = True
                    continue
                results[i].generated_ids.append(t)
                if config.keep_logits:
                    results[i].step_logits.append(logits[i].float().cpu())
                if on_token:
                    on_token(i, t)
            if all(done) or step == config.max_new_tokens - 1:
                break
            logits = self.decode_step(batch.cache, tokens, positions)
            positions = positions + 1
            tokens = sampler(logits)


@dataclass
class Prefilled:
    """A prefilled batch, ready to decode: per row, per layer, the (keys, values) of its real tokens
    (the prefill's outputs), each row's next position id, the last position's logits [B, vocab]
    (float32, CPU). `cache` is the batch's own KV cache (made on first use); a scheduler instead
    inserts the rows it keeps into its running cache (`KVCache.insert`)."""

    rows: list
    positions: torch.Tensor
    logits: torch.Tensor
    vision_seconds: float = 0.0
    ranges: list = field(default_factory=list)  # the backend's segments
    reserve: int = 1  # free columns the cache keeps for the tokens to come
    limit: int | None = None  # most columns (the model's context less one)
    _cache: KVCache | None = None

    @property
    def cache(self) -> KVCache:
        if self._cache is None:
            self._cache = self.new_cache(range(len(self.rows)), self.reserve)
        return self._cache

    def new_cache(self, keep, reserve: int, max_slots: int | None = None) -> KVCache:
        """A KV cache of rows `keep` of this batch."""
        return KVCache.from_rows([self.rows[i] for i in keep], self.ranges, reserve, self.limit, max_slots)


def _ranges(values: list[int]) -> str:
    """Compact "0..5, 9" rendering of sorted integers."""
    values = sorted(values)
    out, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur != prev + 1:
            out.append(f"{start}..{prev}" if prev != start else f"{start}")
            start = cur
    return ", ".join(out)

