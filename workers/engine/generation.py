"""Greedy generation under compression: every config of a batch answers from its own cache.

After the prompt has run through the chunk step (the protocol's chunks, eviction between them),
each row holds its config's first generated token (``DocumentState.next_token``). Decoding then
feeds every row its own last token at the next position, one token per step for every row in
one batched forward, through the same chunk step with a chunk of one token: the key is written,
attention runs over what the row's cache holds, and the config's policy goes on deciding while
the model generates (a key leaving the protected window is decided under a threshold; the keep
limit is re-applied after every ``interval``-th generated token under ratio and budget, kvpress's
``compression_interval``). ``decide=False`` freezes the cache after the prompt, for prefill-only
studies.

Greedy only (argmax): scoring needs no sampling. Rows are independent, so a row that emitted a
stop token keeps running until every row has stopped, and what it produced after its stop is
dropped; whether every row stopped is read back every ``STOP_CHECK_EVERY`` tokens, not per
token. Decoding runs at exact shapes (uncompiled): each step attends over one more position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.engine.chunk_plan import ChunkBounds
from workers.engine.step import ChunkStep, LayerRun

# Tokens between two host checks of "has every row stopped": one device sync per this many tokens.
STOP_CHECK_EVERY = 16


@dataclass(frozen=True)
class Decoded:
    """Per batch row: what it generated, why it stopped, and what its cache held while it did."""

    token_ids: list[list[int]]  # up to and including the stop token
    stop_reasons: list[str]  # "eos" (a stop token) or "length" (max_new_tokens)
    # Keys each row held before each decoding step, summed over layers and kv-heads [rows][steps],
    # and what the uncompressed model holds then [steps]: a row's density over its own steps.
    kept_by_step: list[list[int]]
    total_by_step: list[int]


def decode(
    step: ChunkStep,
    n_prompt: int,
    first_index: int,
    max_new_tokens: int,
    stop_token_ids: list[int],
    keys_total_at: Callable[[int], int],
    decide: bool = True,
    interval: int = 1,
) -> Decoded:
    """Generate up to ``max_new_tokens`` per row after a prompt of ``n_prompt`` tokens that
    ``step`` has just run in ``first_index`` chunks (decoding steps number on from there).
    ``keys_total_at(p)``: keys the uncompressed model holds before position ``p`` (the density's
    denominator)."""
    state, device = step.state, step.device
    rows = step.batch
    generated = torch.zeros(rows, max_new_tokens, dtype=torch.int64, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.int64, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    stops = torch.tensor(stop_token_ids, dtype=torch.int64, device=device)
    kept = torch.zeros(rows, max_new_tokens, dtype=torch.int64, device=device)
    totals = []
    token = state.next_token.clone()
    for t in range(max_new_tokens):
        generated[:, t] = token
        newly = ~stopped & torch.isin(token, stops)
        lengths = torch.where(newly, t + 1, lengths)
        stopped |= newly
        if t + 1 == max_new_tokens or (t % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and bool(stopped.all())):
            break
        position = n_prompt + t
        rank = decide and (t + 1) % interval == 0
        token, held = _decode_step(step, first_index + t, position, token, decide, rank)
        if decide:
            step.decided_until = position + 1
        kept[:, t] = held
        totals.append(keys_total_at(position))
    reasons = ["eos" if s else "length" for s in stopped.tolist()]
    ids = [row[:n].tolist() for row, n in zip(generated, lengths.tolist(), strict=True)]
    return Decoded(ids, reasons, kept[:, : len(totals)].tolist(), totals)


def _decode_step(
    step: ChunkStep, index: int, position: int, token: torch.Tensor, decide: bool, rank: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row at ``position``: a chunk of one through the step's layer work. Returns
    (each row's next token [B], keys each row held before it [B])."""
    as_tensor = dict(device=step.device, dtype=torch.int64)
    bounds = ChunkBounds(
        index=torch.tensor(index, **as_tensor),
        start=torch.tensor(position, **as_tensor),
        end=torch.tensor(position + 1, **as_tensor),
        query_positions=step.positions[position : position + 1],
        positions=step.positions[: position + 1],
        deferred=position - step.decided_until,
    )
    run = LayerRun(step, bounds, decide=decide, rank=rank)
    logits = step.hooked.model(
        input_ids=token[:, None], position_ids=bounds.query_positions[None], use_cache=False, kvorch_run=run
    ).logits
    step.hooked.hidden_states.clear()
    return logits[:, -1].argmax(dim=-1), run.kept
