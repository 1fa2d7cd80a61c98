"""The transformers backend's decode loop: continuous batching over one KV cache, and the per-row sampler.

Why not `model.generate`: it decodes every row of a batch until the longest one ends (finished rows keep
costing a step each), it starts the next batch only when the whole batch is done, it syncs with the host
every step, and its cache concatenates the whole cache once per step. Here, a batch holds up to
`batch_size` rows; every `check_every` steps the finished rows leave (the cache is index-selected, and the
columns no live row uses are trimmed off the left) and queued requests are prefilled and join (the shorter
of the two caches left-padded to the other's length). So a row costs decoding steps only while it
generates, and all rows of one call share each step: the samples of an evaluation, or the plain rollouts
of a training step and the privileged rollouts that their rewards call for (`on_done`). `on_done` can also
drop requests, queued or running: speculative follow-ups that a finished rollout shows are not needed.

The sampler (`draw`): a row's t-th token is a two-level Gumbel-max draw of softmax(logits / T) whose
2 sqrt(V) uniforms are a counter-based hash of (the request's seed, t, index): no generator per row, no
loop over rows, the same numbers on every device and in any batch, and a draw moves only when round-off
swaps two best perturbed scores. (Tried and dropped: a torch.Generator per row, a launch per row and
step; one Gumbel per vocabulary entry, V hashes per row and step, 5x slower on CPU; an inverse-CDF draw,
whose cumulative sum carries the round-off of every token before the drawn one: with a float32 forward,
batch size 1 and 16 drew different tokens in 1 of 72 draws on the random test model.)
"""
from __future__ import annotations

import functools
import inspect
import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from transformers.cache_utils import DynamicLayer

from hdpo.models import dynamic_shape_attention


@dataclass(frozen=True)
class Request:
    prompt_ids: list[int]
    limit: int  # most new tokens (>= 1); the row is cut there, unfinished
    seed: int


@dataclass
class Decoded:
    response_ids: list[int]  # up to and including the EOS when `finished`
    logprobs: list[float]  # log_softmax(logits / T) of each response token (greedy: T = 1)
    finished: bool
    dropped: bool = False  # dropped by `on_done` before it finished: the tokens decoded until then


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for int64 x in [0, 2**32): c split in 16-bit halves, so no product overflows int64 (the
    same bits on every device, no reliance on wrap-around)."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with low bias (the 'lowbias32' constants of C. Wellons' hash-prospector)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_keys(seeds: torch.Tensor) -> torch.Tensor:
    """A row's hashed seed, computed once per request (`draw` takes these)."""
    return _mix32((seeds & _M32) ^ 0x9E3779B9)


@functools.lru_cache(maxsize=8)
def _index_keys(count: int, device: str) -> torch.Tensor:
    return _mix32(torch.arange(count, device=device, dtype=torch.int64) + 0x632BE5AB)


def uniforms(keys: torch.Tensor, steps: torch.Tensor, count: int) -> torch.Tensor:
    """[B, count] float64 uniforms in (0, 1), a pure function of (seed key, step, index): counter-based, so a
    row's numbers need no generator of its own and are the same on every device and in any batch."""
    h = _mix32(keys ^ (steps & _M32))
    h = _mix32(h[:, None] ^ _index_keys(count, str(keys.device))[None, :])
    return (h.double() + 0.5) / 2.0**32


def draw(logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, temperature: float, top_p: float,
         greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, its log-prob) per row of float32 `logits` [B, V]; row b draws with the numbers of (keys[b]
    = seed_keys(its seed), steps[b]). The log-prob is log_softmax(logits / T) before the top-p cut (greedy: T = 1).

    A two-level Gumbel-max draw: the vocabulary is cut into about sqrt(V) blocks of about sqrt(V) tokens; a
    block is drawn by Gumbel-max over the blocks' log-masses (logsumexp), then a token inside it by Gumbel-max
    over its log-probs. P(block) * P(token | block) = softmax exactly, with 2 sqrt(V) random numbers instead of
    V. Like one-level Gumbel-max, and unlike an inverse-CDF draw whose cumulative sum carries the round-off of
    every token before it, a draw moves only when round-off swaps the two best perturbed scores of a level."""
    if greedy:
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.argmax(-1)
        return chosen, logp.gather(-1, chosen[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    scores = logp
    if top_p < 1.0:  # keep the most likely tokens whose mass before them is below top_p
        sp, order = logp.exp().sort(-1, descending=True)
        drop = (sp.cumsum(-1) - sp) >= top_p
        scores = logp.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    B, V = scores.shape
    size = math.isqrt(V - 1) + 1
    blocks = -(-V // size)
    grid = torch.nn.functional.pad(scores, (0, blocks * size - V), value=float("-inf")).view(B, blocks, size)
    u = uniforms(keys, steps, blocks + size)
    gumbel = -torch.log(-torch.log(u))
    block = (torch.logsumexp(grid, -1).double() + gumbel[:, :blocks]).argmax(-1)
    inside = grid.gather(1, block[:, None, None].expand(B, 1, size)).squeeze(1)
    chosen = block * size + (inside.double() + gumbel[:, blocks:]).argmax(-1)
    return chosen, logp.gather(-1, chosen[:, None]).squeeze(-1)


class _Layer(DynamicLayer):
    """A DynamicLayer that appends into spare room (DynamicLayer concatenates: a copy of the layer per step)."""

    _layer_type = None  # never registered as a default layer type

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._k, self._v, self.n = keys, values, keys.shape[-2]
        self._reserve(room)

    def _reserve(self, room: int) -> None:
        B, H, _, D = self._k.shape
        k, v = self._k.new_empty(B, H, self.n + room, D), self._v.new_empty(B, H, self.n + room, self._v.shape[-1])
        k[:, :, :self.n], v[:, :, :self.n] = self._k[:, :, :self.n], self._v[:, :, :self.n]
        self._k, self._v = k, v
        self.keys, self.values = k[:, :, :self.n], v[:, :, :self.n]

    def update(self, key_states, value_states, *args, **kwargs):
        t = key_states.shape[-2]
        if self.n + t > self._k.shape[-2]:
            self._reserve(max(t, 128))  # a copy per 128 steps (DynamicLayer: one per step)
        self._k[:, :, self.n:self.n + t], self._v[:, :, self.n:self.n + t] = key_states, value_states
        self.n += t
        self.keys, self.values = self._k[:, :, :self.n], self._v[:, :, :self.n]
        return self.keys, self.values


def _layers(cache) -> list:
    """The cache's used layers (transformers 5.17 makes one per entry of config.layer_types, which can outnumber
    the model's layers, e.g. a shrunken config: those stay empty and are left alone)."""
    layers = [x for x in getattr(cache, "layers", None) or [] if x.keys is not None]
    if not layers or not all(type(x) in (DynamicLayer, _Layer) for x in layers):
        raise RuntimeError(f"the transformers decode loop needs a cache of full-attention DynamicLayers; this "
                           f"model's is {type(cache).__name__} ({sorted({type(x).__name__ for x in layers})})")
    return layers


def _reshape(cache, rows: Optional[torch.Tensor], start: int, pad_left: int) -> list[list[torch.Tensor]]:
    """Each layer's (keys, values) for `rows` (None: all), columns from `start`, `pad_left` zero columns added."""
    out = []
    for layer in _layers(cache):
        kv = []
        for x in (layer.keys, layer.values):
            x = x[:, :, start:] if rows is None else x[rows, :, start:]
            if pad_left:
                x = torch.cat([x.new_zeros(*x.shape[:2], pad_left, x.shape[-1]), x], dim=2)
            kv.append(x)
        out.append(kv)
    return out


def _set(cache, kvs: list, room: int) -> None:
    used = [i for i, x in enumerate(cache.layers) if x.keys is not None]
    for i, (k, v) in zip(used, kvs):
        cache.layers[i] = _Layer(k, v, room)


class _Batch:
    """The live rows: their cache, attention mask, positions, sampled tokens and seed keys."""

    ROWS = ("pos", "req", "limit", "key", "tokens", "logps", "count", "done")  # one entry per row

    def __init__(self, cache, mask, pos, req, limit, key, tokens, logps, count, done):
        self.cache, self.mask, self.pos, self.req, self.limit = cache, mask, pos, req, limit
        self.key, self.tokens, self.logps, self.count, self.done = key, tokens, logps, count, done

    def __len__(self) -> int:
        return self.req.shape[0]

    def keep(self, rows: torch.Tensor, room: int) -> None:
        """Only `rows` stay; columns that none of them uses (left padding of rows gone) are trimmed."""
        mask = self.mask[rows]
        start = int(mask.any(0).int().argmax())
        _set(self.cache, _reshape(self.cache, rows, start, 0), room)
        self.mask = mask[:, start:]
        for name in self.ROWS:
            setattr(self, name, getattr(self, name)[rows])

    def join(self, other: "_Batch", room: int) -> None:
        """`other`'s rows join this batch, the shorter cache left-padded (masked) to the longer's length."""
        a, b = self.mask.shape[1], other.mask.shape[1]
        mine = _reshape(self.cache, None, 0, max(0, b - a))
        theirs = _reshape(other.cache, None, 0, max(0, a - b))
        _set(self.cache, [(torch.cat([k1, k2]), torch.cat([v1, v2])) for (k1, v1), (k2, v2) in zip(mine, theirs)],
             room)
        pad = lambda m, n: torch.cat([m.new_zeros(m.shape[0], n), m], 1) if n > 0 else m  # noqa: E731
        self.mask = torch.cat([pad(self.mask, b - a), pad(other.mask, a - b)])
        for name in self.ROWS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))


@torch.no_grad()
@dynamic_shape_attention()  # the key length grows every step: a new attention shape per step
def decode(model, requests: list[Request], temperature: float, top_p: float, greedy: bool, batch_size: int,
           eos_ids: list[int], pad_id: int,
           on_done: Optional[Callable[[list[tuple[int, Decoded]]], tuple[list[Request], list[int]]]] = None,
           check_every: int = 8) -> list[Decoded]:
    """Decode every request (in the order given, as slots free up); `on_done(finished)` gets each batch of
    newly finished (index, result) pairs and returns (more requests, queued after the others: their indices
    follow; indices of requests to drop: queued or running ones stop with the tokens they have, `dropped`,
    and finished ones are left as they are). Returns one result per request, added ones included, in index
    order."""
    device = next(model.parameters()).device
    # transformers 5.24 calls the cache argument `cache`, earlier versions `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    requests = list(requests)
    queue = deque(range(len(requests)))
    results: dict[int, Decoded] = {}
    eos = torch.tensor(eos_ids, device=device)
    width = max([r.limit for r in requests], default=1)  # grows if `on_done` adds longer requests
    room = check_every * 2  # spare cache columns after each rebuild: a window's steps fit twice

    def prefill(idx: list[int]) -> tuple[_Batch, torch.Tensor]:
        nonlocal width
        width = max(width, max(requests[i].limit for i in idx))
        plen = max(len(requests[i].prompt_ids) for i in idx)
        ids = torch.full((len(idx), plen), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), plen), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every row's next token goes to the same column
            p = requests[i].prompt_ids
            ids[row, plen - len(p):], mask[row, plen - len(p):] = torch.tensor(p, dtype=torch.long), 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(1) - 1).clamp_(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = out.get(cache_arg)
        _set(cache, _reshape(cache, None, 0, 0), room)
        n = len(idx)
        batch = _Batch(cache, mask, pos[:, -1] + 1, torch.tensor(idx, device=device),
                       torch.tensor([requests[i].limit for i in idx], device=device),
                       seed_keys(torch.tensor([requests[i].seed for i in idx], device=device, dtype=torch.int64)),
                       torch.full((n, width), pad_id, dtype=torch.long, device=device),
                       torch.zeros((n, width), device=device), torch.zeros(n, dtype=torch.long, device=device),
                       torch.zeros(n, dtype=torch.bool, device=device))
        return batch, record(batch, out.logits[:, -1].float())

    def record(b: _Batch, logits: torch.Tensor) -> torch.Tensor:
        """Sample each row's next token and return what to feed next; rows already done keep their outputs
        (and are fed a pad until they leave)."""
        at = b.count.clamp(max=b.tokens.shape[1] - 1)[:, None]
        tok, lp = draw(logits, b.key, b.count, temperature, top_p, greedy)
        going = ~b.done
        b.tokens.scatter_(1, at, torch.where(going, tok, b.tokens.gather(1, at).squeeze(1))[:, None])
        b.logps.scatter_(1, at, torch.where(going, lp, b.logps.gather(1, at).squeeze(1))[:, None])
        b.count += going.long()
        b.done |= going & (torch.isin(tok, eos) | (b.count >= b.limit))
        return torch.where(going, tok, torch.full_like(tok, pad_id))

    def widen(b: _Batch) -> None:
        if b.tokens.shape[1] < width:  # a later request allows more new tokens: room in the per-row buffers
            extra = width - b.tokens.shape[1]
            b.tokens = torch.cat([b.tokens, b.tokens.new_full((len(b), extra), pad_id)], 1)
            b.logps = torch.cat([b.logps, b.logps.new_zeros(len(b), extra)], 1)

    def stop(b: _Batch, drop: set[int]) -> None:
        """Running rows of dropped requests keep their tokens so far and leave at this harvest."""
        hit = [(r, i) for r, i in enumerate(b.req.tolist()) if i in drop]  # (row, request)
        if hit:
            rows = [r for r, _ in hit]
            counts, toks, lps = b.count[rows].tolist(), b.tokens[rows].cpu(), b.logps[rows].cpu()
            for j, ((_, i), n) in enumerate(zip(hit, counts)):
                results[i] = Decoded(toks[j, :n].tolist(), lps[j, :n].tolist(), False, True)
            b.done[rows] = True

    live: Optional[_Batch] = None
    last = None  # the token each live row is fed next
    left = 0  # an upper bound of the steps any live row still takes (known at each harvest)
    while queue or live is not None:
        free = batch_size - (0 if live is None else len(live))
        if queue and (live is None or free >= max(1, batch_size // 4) or free >= len(queue)):
            new, fed = prefill([queue.popleft() for _ in range(min(free, len(queue)))])
            if live is None:
                live, last = new, fed
            else:
                widen(live)
                live.join(new, room)
                last = torch.cat([last, fed])
            left = max(left, int((new.limit - new.count).max()))
        for _ in range(min(check_every, left)):
            live.mask = torch.cat([live.mask, live.mask.new_ones(len(live), 1)], 1)
            out = model(input_ids=last[:, None], attention_mask=live.mask, position_ids=live.pos[:, None],
                        use_cache=True, **{cache_arg: live.cache})
            live.pos = live.pos + 1
            last = record(live, out.logits[:, -1].float())
        # harvest: the one host sync per `check_every` steps
        done = live.done.nonzero().flatten()
        if len(done):
            counts, reqs = live.count[done].tolist(), live.req[done].tolist()
            toks, lps = live.tokens[done].cpu(), live.logps[done].cpu()
            finished_now = []
            for j, (i, n) in enumerate(zip(reqs, counts)):
                ids = toks[j, :n].tolist()
                results[i] = Decoded(ids, lps[j, :n].tolist(), bool(n) and ids[-1] in eos_ids)
                finished_now.append((i, results[i]))
            more, drop = on_done(finished_now) if on_done is not None else ([], [])
            for r in more:
                queue.append(len(requests))
                requests.append(r)
            drop = set(drop).difference(results)
            if drop:
                stop(live, drop)
                queue = deque(i for i in queue if i not in drop)
                results.update((i, Decoded([], [], False, True)) for i in drop.difference(results))
            stay = (~live.done).nonzero().flatten()
            if len(stay) == 0:
                live = last = None
            else:
                live.keep(stay, room)
                last = last[stay]
        left = 0 if live is None else int((live.limit - live.count).max())
    return [results[i] for i in range(len(requests))]
