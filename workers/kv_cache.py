"""The KV cache of one document run: masked (the default) or compact (``--compact``).

Both show a chunk's queries exactly the kept keys before the chunk plus ordinary causal
attention inside it, so both give the same rows (docs/DESIGN.md: "masking or physical removal —
both must give the same numbers"); they differ in the memory they hold.

- Masked: one preallocated [B, Hkv, N, D] buffer per layer; evicted entries stay in it and
  are hidden by the engine's keep-mask, so memory is the whole document's at any density.
- Compact: after each chunk's decisions, every (row, kv-head)'s kept entries are gathered
  into a buffer padded to the layer's largest kept count, with a validity mask for the
  padding, so evicted entries really leave and memory tracks density. All layers are
  compacted together at the chunk's end, so the buffers' new lengths cost one device sync per
  chunk, not one per layer.

On a sliding-window layer both hide what lies outside the window from each query; the compact
cache still holds the keys a press kept there (so ``kv_cache_bytes`` overstates such a layer),
because a rescoring press may read them while they are undecided.

Either way the engine's keep-mask and score buffers stay full length (one bool and one float
per position, no head dim): the presses' bookkeeping and the density columns read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.attention import AttentionVariant, band


@dataclass
class LayerView:
    """What one layer's attention reads for the current chunk [start, end), and how the presses,
    which index keys and attention by absolute position, see it."""

    keys: torch.Tensor  # [B, Hkv, T, D] the entries the chunk attends over
    values: torch.Tensor  # [B, Hkv, T, D]
    visible: torch.Tensor  # [B, Hkv, c, T] bool: what each of the chunk's queries may attend to
    end: int
    held_bytes: int  # keys + values this layer holds for the chunk
    # Compact only: the absolute position of each entry and whether it is real (not padding).
    positions: torch.Tensor | None = None  # [B, Hkv, T] int64
    held: torch.Tensor | None = None  # [B, Hkv, T] bool

    def for_press(self, rows: slice, keys_from: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(keys, values, first position) for ``LayerContext``: positions [first, end), indexed
        from ``first``. Masked: the whole history (first = 0). Compact: [keys_from, end), which the
        caller guarantees is all still kept (keys not yet decided)."""
        if self.positions is None:
            return self.keys[rows], self.values[rows], 0
        n = self.end - keys_from
        index = self._positions_or_dump(rows, keys_from, n) - keys_from
        out = []
        for tensor in (self.keys[rows], self.values[rows]):
            r, h, _, d = tensor.shape
            buffer = tensor.new_zeros(r, h, n + 1, d)
            out.append(buffer.scatter_(2, index[..., None].expand(-1, -1, -1, d), tensor)[:, :, :n])
        return out[0], out[1], keys_from

    def at_positions(self, probs: torch.Tensor, rows: slice) -> torch.Tensor:
        """Attention probabilities [R, H, q, T] over this view's entries -> [R, H, q, end] over
        absolute positions, evicted positions 0, as the presses read them."""
        if self.positions is None:
            return probs
        r, h, q, t = probs.shape
        index = self._positions_or_dump(rows, 0, self.end)  # [R, Hkv, T]
        hkv = index.shape[1]
        index = index[:, :, None, None].expand(r, hkv, h // hkv, q, t).reshape(r, h, q, t)
        return probs.new_zeros(r, h, q, self.end + 1).scatter_(3, index, probs)[..., : self.end]

    def _positions_or_dump(self, rows: slice, lo: int, dump: int) -> torch.Tensor:
        """Entry positions, with padding and positions before ``lo`` sent to slot ``lo + dump``
        (one past what the caller keeps), so a scatter never overwrites a real position."""
        positions, held = self.positions[rows], self.held[rows]
        return torch.where(held & (positions >= lo), positions, lo + dump)


class MaskedCache:
    """Preallocated full-length buffers; the engine's keep-mask hides evicted entries."""

    def __init__(
        self, n_layers: int, shape: tuple[int, int, int], head_dim: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.keys = [torch.zeros(*shape, head_dim, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.device = device
        self.start = self.end = 0
        self.patterns: dict[AttentionVariant, torch.Tensor] = {}

    def begin_chunk(self, start: int, end: int) -> None:
        """A new chunk: its causal patterns are built on first use, once per attention variant."""
        self.start, self.end = start, end
        self.patterns = {}

    def pattern(self, variant: AttentionVariant) -> torch.Tensor:
        """The chunk's [c, end] pattern under ``variant`` (causal, narrowed to a sliding window),
        shared by every layer of that variant."""
        if variant not in self.patterns:
            keys = torch.arange(self.end, device=self.device)
            self.patterns[variant] = band(keys[self.start :], keys, variant)
        return self.patterns[variant]

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, variant: AttentionVariant
    ) -> LayerView:
        """Write the chunk's keys at their absolute positions; ``keep`` [B, Hkv, N] is the layer's
        keep-mask (a shared chunk's single row is broadcast to every row)."""
        s, e = self.start, self.end
        self.keys[layer][:, :, s:e] = key
        self.values[layer][:, :, s:e] = value
        visible = keep[:, :, None, :e] & self.pattern(variant)
        held_bytes = self.keys[layer].nbytes + self.values[layer].nbytes
        return LayerView(self.keys[layer][:, :, :e], self.values[layer][:, :, :e], visible, e, held_bytes)

    def end_chunk(self, keep: list[torch.Tensor]) -> None:
        """Nothing to do: the keep-mask already hides what the decisions evicted."""


class CompactCache:
    """Per layer only the kept entries, in position order, padded to the layer's largest count."""

    def __init__(
        self, n_layers: int, shape: tuple[int, int, int], head_dim: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        b, hkv, _ = shape
        self.keys = [torch.zeros(b, hkv, 0, head_dim, device=device, dtype=dtype) for _ in range(n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.positions = [torch.zeros(b, hkv, 0, device=device, dtype=torch.int64) for _ in range(n_layers)]
        self.valid = [torch.zeros(b, hkv, 0, device=device, dtype=torch.bool) for _ in range(n_layers)]
        self.device = device
        self.start = self.end = 0
        self.chunk_positions = torch.zeros(0, dtype=torch.int64)
        self.patterns: dict[AttentionVariant, torch.Tensor] = {}

    def begin_chunk(self, start: int, end: int) -> None:
        """The chunk's own positions; its causal patterns are built on first use, per variant."""
        self.start, self.end = start, end
        self.chunk_positions = torch.arange(start, end, device=self.device)
        self.patterns = {}

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor, variant: AttentionVariant
    ) -> LayerView:
        """Append the chunk's entries to the held ones (``keep`` is not needed: what is held is
        exactly what was kept when the previous chunk ended); :meth:`end_chunk` compacts them.

        Every held entry lies before the chunk, so each query sees all of them, except that a
        sliding-window layer's queries see only the held entries inside their window."""
        b, hkv, m = self.valid[layer].shape
        c = self.end - self.start
        if variant not in self.patterns:
            self.patterns[variant] = band(self.chunk_positions, self.chunk_positions, variant)
        held = self.valid[layer][:, :, None].expand(b, hkv, c, m)
        if variant.sliding_window is not None:
            distance = self.chunk_positions[:, None] - self.positions[layer][:, :, None, :]
            held = held & (distance < variant.sliding_window)
        visible = torch.cat((held, self.patterns[variant].expand(b, hkv, c, c)), dim=-1)
        self.keys[layer] = torch.cat((self.keys[layer], key.expand(b, -1, -1, -1)), dim=2)
        self.values[layer] = torch.cat((self.values[layer], value.expand(b, -1, -1, -1)), dim=2)
        self.positions[layer] = torch.cat((self.positions[layer], self.chunk_positions.expand(b, hkv, c)), dim=2)
        self.valid[layer] = torch.cat((self.valid[layer], self.valid[layer].new_ones(b, hkv, c)), dim=2)
        keys, values = self.keys[layer], self.values[layer]
        held_bytes = keys.nbytes + values.nbytes
        return LayerView(keys, values, visible, self.end, held_bytes, self.positions[layer], self.valid[layer])

    def end_chunk(self, keep: list[torch.Tensor]) -> None:
        """Drop what this chunk's decisions evicted in every layer: gather each (row, kv-head)'s
        kept entries to the front, in position order, and cut each layer's buffer to its largest
        kept count (the counts of all layers are read back at once)."""
        kept = [k.gather(-1, p) & v for k, p, v in zip(keep, self.positions, self.valid, strict=True)]
        counts = torch.stack([k.sum(dim=-1).amax() for k in kept]).tolist()
        for layer, (kept_here, count) in enumerate(zip(kept, counts, strict=True)):
            order = torch.argsort((~kept_here).to(torch.uint8), dim=-1, stable=True)[..., :count]
            entries = order[..., None].expand(-1, -1, -1, self.keys[layer].shape[-1])
            self.keys[layer] = self.keys[layer].gather(2, entries)
            self.values[layer] = self.values[layer].gather(2, entries)
            self.positions[layer] = self.positions[layer].gather(2, order)
            self.valid[layer] = kept_here.gather(2, order)


def make_cache(
    compact: bool, n_layers: int, shape: tuple[int, int, int], head_dim: int, device: torch.device, dtype: torch.dtype
) -> MaskedCache | CompactCache:
    """The cache of a document run: ``shape`` is (configs, kv-heads, document length)."""
    return (CompactCache if compact else MaskedCache)(n_layers, shape, head_dim, device, dtype)
