"""Layouts for a held cache sized per (layer, kv-head) (issue 36, "a cache sized per head"),
measured before building one: one chunk's attention over the keys each (config, kv-head) holds,
when heads hold unevenly many, in each layout, with the bytes its key/value tensors take.

Today's held band gives every (row, kv-head) of a band the slots of its densest one (``padded``).
The candidates:

- ``bands:B``: *quantile bands*. Per layer, the (row, kv-head)s sorted by what they hold; band b
  takes the same ranks in every layer, with the slots of the largest need at those ranks over all
  layers (rounded up as workers/engine/capacity.py rounds). Shapes are then equal in every layer
  (one compiled layer region still serves all), and which (row, kv-head) sits in which band is a
  per-layer index tensor: a gather of the queries in, a scatter of the outputs out.
- ``pool``: what the step builds (workers/engine/pool.py): one pool of pages (their size from
  capacity.page_size) that every
  (row, kv-head) of the layer shares, each a segment of what it holds plus the chunk's room, and
  paged attention over it (the step's own code, timed here).
- ``ideal``: every (row, kv-head) attended alone over exactly what it holds (a Python loop, the
  lower bound of the work, not a candidate for the step).

Needs per (layer, row, kv-head) are drawn per profile (fixed seed): ``threshold`` has the shape
BENCHMARKS.md measured for knorm@-16 at 16k tokens (the densest head keeps every key, the mean one
about 0.31 of them); ``adakv`` spreads a ratio-0.5 budget between heads (shares 0.1 to 0.9 of the
document, mean 0.5); ``uniform`` is every head alike (the layouts must cost what padded costs).
The same queries, keys and values go through every layout, and each layout's output is checked
against ``padded``'s (float32, 1e-4) before it is timed.

    python bench/head_layouts.py --positions 4096,16384 --profiles threshold,adakv,uniform
    python bench/head_layouts.py --positions 256 --rows 2 --layers 2 --repeats 1   # smoke size
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch
import torch.nn.functional as F

from workers.engine import capacity, pool
from workers.modeling.attention import AttentionVariant

PROFILES = ("threshold", "adakv", "uniform")


def needs_of(profile: str, layers: int, rows: int, kv_heads: int, positions: int, seed: int) -> torch.Tensor:
    """[layers, rows, kv-heads] keys held before a chunk, per the profile (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if profile == "uniform":
        shares = torch.full((layers, rows, kv_heads), 0.5)
    elif profile == "adakv":
        shares = (0.5 + 0.4 * (2 * torch.rand(layers, rows, kv_heads, generator=g) - 1)).clamp(0.1, 0.9)
    else:  # threshold: lognormal spread, mean 0.31, the densest head full
        raw = torch.exp(1.2 * torch.randn(layers, rows, kv_heads, generator=g))
        shares = (raw * 0.31 / raw.mean()).clamp(max=1.0)
        shares.view(-1)[int(shares.argmax())] = 1.0
    return (shares * positions).round().long().clamp(min=1)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """query [n, G, c, D] (a kv-head's query heads folded), keys/values [n, S, D], held [n]: the
    first held[i] slots of row i are the keys it held before the chunk, every query sees them;
    the next c are the chunk's own, seen causally (what a held band holds: keys first, then the
    chunk's, empties after)."""
    n, groups, c, d = query.shape
    offset = torch.arange(keys.shape[1], device=keys.device)[None, None, :] - held[:, None, None]  # [n, 1, S]
    step = torch.arange(c, device=keys.device).repeat(groups)[None, :, None]  # [1, G*c, 1]: each query's
    mask = offset <= step  # a held key (offset < 0), or one of the chunk's up to the query's own
    out = F.scaled_dot_product_attention(query.reshape(n, groups * c, d), keys, values, attn_mask=mask)
    return out.reshape(n, groups, c, d)


def rounded_slots(need: int, positions: int) -> int:
    """The padded held band's slots before the pool (m x 2^k, m in 4..7, at most ``positions``)."""
    if need <= 4:
        return min(positions, need)
    octave = 1 << max(0, need.bit_length() - 3)
    return min(positions, next((m for m in (4, 5, 6, 7) if m * octave >= need), 8) * octave)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Padded:
    """Today: every (row, kv-head) of the layer in one block of the densest one's slots."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, needs: torch.Tensor, chunk: int) -> None:
        slots = rounded_slots(int(needs.max()) + chunk, keys.shape[1])
        self.keys, self.values = keys[:, :slots].contiguous(), values[:, :slots].contiguous()
        self.needs = needs
        self.nbytes = self.keys.nbytes + self.values.nbytes

    def run(self, query: torch.Tensor) -> torch.Tensor:
        return attend(query, self.keys, self.values, self.needs)


class QuantileBands:
    """Band b takes ranks [edges[b], edges[b+1]) of every layer's (row, kv-head)s sorted by need,
    with the slots of the largest need at those ranks over all layers: equal shapes per layer.
    Each band's keys live in a tensor of their own (built here, untimed); a chunk gathers each
    band's queries in and scatters its outputs back (timed)."""

    def __init__(self, all_needs: torch.Tensor, n_bands: int, keys, values, needs: torch.Tensor, chunk: int) -> None:
        ranked = all_needs.flatten(1).sort(dim=-1).values  # [layers, rows x kv-heads]
        count = ranked.shape[-1]
        edges = [round(b * count / n_bands) for b in range(n_bands + 1)]
        order = needs.argsort()
        self.bands = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            slots = rounded_slots(int(ranked[:, hi - 1].max()) + chunk, keys.shape[1])
            which = order[lo:hi]
            band_keys, band_values = keys[which, :slots].contiguous(), values[which, :slots].contiguous()
            self.bands.append((which, band_keys, band_values, needs[which]))
        self.nbytes = sum(k.nbytes + v.nbytes for _, k, v, _ in self.bands)

    def run(self, query: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(query)
        for which, keys, values, needs in self.bands:
            out.index_copy_(0, which, attend(query.index_select(0, which), keys, values, needs))
        return out


class Pool:
    """The step's pool (workers/engine/pool.py) for the layer: each (row, kv-head) an owner holding
    its ``needs`` keys (positions 0..need-1) plus room for a chunk, attended page by page."""

    def __init__(self, keys, values, needs: torch.Tensor, chunk: int) -> None:
        n, _, d = keys.shape
        page = capacity.page_size(int(needs.sum()), n, chunk)
        pages = capacity.pages_for(int(needs.sum()), n, chunk, page)
        self.pool = pool.allocate(pages, page, n, 1, d, keys.dtype, keys.device, chunk)
        counts = needs.view(n, 1)
        pool._lay_out(self.pool, counts, chunk)
        slot = self.pool.first_page * page  # [n]
        for i, held in enumerate(needs.tolist()):  # untimed setup
            at = slice(int(slot[i]), int(slot[i]) + held)
            self.pool.keys.view(-1, d)[at] = keys[i, :held]
            self.pool.values.view(-1, d)[at] = values[i, :held]
            self.pool.positions.view(-1)[at] = torch.arange(held)
        self.pool.counts.copy_(counts)
        self.query_positions = torch.arange(chunk, device=keys.device) + keys.shape[1]  # after every key
        at = needs[:, None] + torch.arange(chunk, device=keys.device)  # [n, chunk]: the chunk's own keys
        self.chunk_keys = keys.gather(1, at[..., None].expand(-1, -1, d))[:, None]  # [n, 1, chunk, D]
        self.chunk_values = values.gather(1, at[..., None].expand(-1, -1, d))[:, None]
        self.scaling = d**-0.5
        self.nbytes = self.pool.keys.nbytes + self.pool.values.nbytes

    def run(self, query: torch.Tensor) -> torch.Tensor:
        pages = self.pool.owner.shape[0]
        out, _ = pool.attend(
            self.pool, query, self.chunk_keys, self.chunk_values, self.query_positions, self.scaling,
            AttentionVariant(), pages,
        )  # fmt: skip
        return out


class Ideal:
    """Every (row, kv-head) alone over exactly what it holds: the lower bound of the work."""

    def __init__(self, keys, values, needs: torch.Tensor, chunk: int) -> None:
        self.heads = [(keys[i : i + 1, : n + chunk].contiguous(), values[i : i + 1, : n + chunk].contiguous())
                      for i, n in enumerate(needs.tolist())]  # fmt: skip
        self.needs = needs
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in self.heads)

    def run(self, query: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(query)
        for i, (keys, values) in enumerate(self.heads):
            out[i : i + 1] = attend(query[i : i + 1], keys, values, self.needs[i : i + 1])
        return out


def timed(fn, repeats: int, device: torch.device) -> float:
    """The best of ``repeats`` runs after one untimed one (seconds)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - tic)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", default="4096,16384", help="document lengths: what a full head holds")
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--bands", default="2,4,8", help="quantile band counts to time")
    parser.add_argument("--rows", type=int, default=5, help="configs of the batch")
    parser.add_argument("--layers", type=int, default=30, help="layers whose needs size the bands (SmolLM2: 30)")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--groups", type=int, default=3, help="query heads per kv-head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    machine = f"{platform.processor() or platform.machine()} ({device})"
    print(f"# {machine}, torch {torch.__version__}, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.1f}; per chunk of {args.chunk} queries, one layer, {args.rows} configs x "
          f"{args.kv_heads} kv-heads x {args.groups} query heads, head_dim {args.head_dim}, float32")  # fmt: skip
    print(f"{'positions':>9} {'profile':>9} {'layout':>8} {'ms':>8} {'x padded':>8} {'MiB':>8} {'x held':>7}")
    for positions in (int(p) for p in args.positions.split(",")):
        for profile in args.profiles.split(","):
            needs = needs_of(profile, args.layers, args.rows, args.kv_heads, positions, args.seed)
            layer = int(needs.flatten(1).max(dim=1).values.argmax())  # the layer with the densest head
            needs_layer = needs[layer].flatten()
            n = needs_layer.shape[0]
            g = torch.Generator().manual_seed(args.seed + 1)
            query = torch.randn(n, args.groups, args.chunk, args.head_dim, generator=g).to(device)
            keys = torch.randn(n, positions + args.chunk, args.head_dim, generator=g).to(device)
            values = torch.randn(n, positions + args.chunk, args.head_dim, generator=g).to(device)
            needs_layer = needs_layer.to(device)
            chunk = args.chunk  # every layout has room for the chunk being written, as the step's
            layouts = {"padded": Padded(keys, values, needs_layer, chunk)}
            for b in (int(x) for x in args.bands.split(",")):
                layouts[f"bands:{b}"] = QuantileBands(needs, b, keys, values, needs_layer, chunk)
            layouts["pool"] = Pool(keys, values, needs_layer, chunk)
            layouts["ideal"] = Ideal(keys, values, needs_layer, chunk)
            reference = layouts["padded"].run(query)
            # what the layer holds: each (row, kv-head)'s keys plus the chunk it writes
            held = 2 * int(needs_layer.sum() + n * args.chunk) * args.head_dim * keys.element_size()
            base = None
            for name, layout in layouts.items():
                torch.testing.assert_close(layout.run(query), reference, rtol=1e-4, atol=1e-4)
                seconds = timed(lambda layout=layout, query=query: layout.run(query), args.repeats, device)
                nbytes = layout.nbytes
                base = base or seconds
                print(f"{positions:>9} {profile:>9} {name:>8} {1e3 * seconds:>8.2f} {seconds / base:>8.3f} "
                      f"{nbytes / 2**20:>8.2f} {nbytes / held:>7.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
