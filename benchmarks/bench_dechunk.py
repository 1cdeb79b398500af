#!/usr/bin/env python
"""Speed benchmark: de-chunking (paper §3.4) forward + backward in its four forms, in one run.

* ``dense``: the direct formula with every Gaussian weight evaluated, as the authors' release
  computes it (far weights underflow to denormal floats, on which CPU exp and matmul run 5–20× slower);
* ``direct``: ``DeChunk`` on padded slots (B, M, D) — the padded execution's form: (M, M) weights
  with those below exp(−60) set to exactly 0, and the (L, M) distance table for the plug-back;
* ``grid``: ``DeChunk`` on packed tokens (T, D), forced to the separable blur on the grid (two
  matmuls), with the two-pass nearest-kept-cell search;
* ``pairs``: ``DeChunk`` on packed tokens (T, D), forced to the window-pairs form (a sparse (T, T)
  kernel over the kept neighbours in the truncated window), the same plug-back.

Packed execution chooses between ``grid`` and ``pairs`` per batch (``prefer_pairs``); the line after
the table says which one it chooses here. All four run on the same routing record (every sample keeps M random tokens, in raster order);
the benchmark checks that they agree before timing, then times them interleaved (median of rounds).

    python benchmarks/bench_dechunk.py                                  # 64×64 latent (512 px), B 2, M 1024, D 1152
    python benchmarks/bench_dechunk.py --grid 64 --sigma 2              # the same at σ = 2 (the 512 px setting)
    python benchmarks/bench_dechunk.py --batch 32 --grid 32 --tokens 330 --hidden 96   # MNIST training shapes
    python benchmarks/bench_dechunk.py --batch 8 --grid 32 --tokens 165 --hidden 384   # spread budgets
"""

from __future__ import annotations

import argparse

import torch

from common import interleaved, machine_info, median, print_machine
from dcdit.models.chunking import RoutingRecord, gather_tokens
from dcdit.models.dechunking import (
    DeChunk,
    grid_coords,
    nearest_kept_slot,
    prefer_pairs,
    squared_distances,
    window_ranges,
)


def dense_dechunk(z: torch.Tensor, record: RoutingRecord, sigma: float) -> torch.Tensor:
    """The de-chunk formula with every weight evaluated (denormals included): the release's form."""
    p = record.p.gather(1, record.kept_idx).clamp(1e-4, 1 - 1e-4)
    pos = grid_coords(record.kept_idx, record.grid)
    w = torch.exp(-squared_distances(pos, pos) / (2 * sigma**2)) * p[:, None, :] * record.slot_mask[:, None, :]
    w = w / (w.sum(-1, keepdim=True) + (~record.slot_mask)[..., None])
    out = p[..., None] * z + (1 - p[..., None]) * torch.bmm(w, z)
    return gather_tokens(out, nearest_kept_slot(record))


def random_record(B: int, grid: int, M: int, seed: int) -> RoutingRecord:
    g = torch.Generator().manual_seed(seed)
    L = grid * grid
    kept = torch.stack([torch.randperm(L, generator=g)[:M].sort().values for _ in range(B)])  # (B, M)
    mask = torch.zeros(B, L, dtype=torch.bool).scatter_(1, kept, True)
    return RoutingRecord(torch.rand(B, L, generator=g), mask, mask.clone(), kept, torch.full((B,), M), (grid, grid))


def fwd_bwd(fn, z: torch.Tensor):
    def run():
        zz = z.clone().requires_grad_(True)
        fn(zz).sum().backward()  # a constant output gradient: the benchmark adds no (B, L, D) work of its own
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grid", type=int, default=64, help="grid side (L = grid²)")
    ap.add_argument("--tokens", type=int, default=1024, help="kept tokens per sample (M)")
    ap.add_argument("--hidden", type=int, default=1152)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=["dense", "direct", "grid", "pairs"],
                    choices=["dense", "direct", "grid", "pairs"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print_machine(machine_info())
    record = random_record(args.batch, args.grid, args.tokens, seed=0)
    z = torch.randn(args.batch, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    dechunk = {form: DeChunk(args.sigma, packed_form=form) for form in ("auto", "grid", "pairs")}
    forms = {
        "dense": lambda zz: dense_dechunk(zz, record, args.sigma),
        "direct": lambda zz: dechunk["auto"](zz, record),
        # every slot is real: packed = flattened
        "grid": lambda zz: dechunk["grid"](zz.reshape(-1, args.hidden), record),
        "pairs": lambda zz: dechunk["pairs"](zz.reshape(-1, args.hidden), record),
    }
    forms = {k: forms[k] for k in args.variants}
    outs = {k: f(z) for k, f in forms.items()}
    ref = next(iter(outs.values()))
    for k, out in outs.items():
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), f"{k} disagrees with {next(iter(outs))}"
    secs, _ = interleaved({k: fwd_bwd(f, z) for k, f in forms.items()}, args.rounds, 1)
    base = median(secs[args.variants[0]])
    print(f"de-chunk fwd+bwd, B={args.batch}, grid {args.grid}², M={args.tokens}, D={args.hidden}, σ={args.sigma}, "
          f"{torch.get_num_threads()} thread(s); outputs agree; median of {args.rounds} interleaved rounds")
    print(f"{'form':<10}{'median s':>10}{'vs ' + args.variants[0]:>12}")
    for k in forms:
        print(f"{k:<10}{median(secs[k]):>10.4f}{median(secs[k]) / base:>12.2f}")
    pairs = window_ranges(record.kept_mask, record.grid, args.sigma).pairs
    grid_macs = args.batch * args.grid**2 * 2 * args.grid
    chosen = "pairs" if prefer_pairs(pairs, args.batch, record.grid, args.hidden) else "grid"
    print(f"window pairs {pairs}, grid-blur MACs per channel {grid_macs} (ratio {grid_macs / pairs:.2f}): "
          f"packed execution uses {chosen}")


if __name__ == "__main__":
    main()
