#!/usr/bin/env python
"""Speed benchmark: de-chunking (paper §3.4) forward + backward, against the same formula computed
with every Gaussian weight evaluated.

The M×M Gaussian weights exp(−d²/2σ²) of tokens far apart on the grid underflow to denormal floats,
on which CPU exp and matmul kernels run 5–20× slower. ``DeChunk`` sets weights below exp(−60) to
exactly 0 (no float32 result changes, see ``dcdit.models.dechunking``); ``dense`` is the same code
without that cut, as the authors' release computes it. Both run on the same routing record (random
kept tokens in raster order) and the benchmark checks that their outputs agree before timing.

    python benchmarks/bench_dechunk.py                 # MNIST demo shapes: B=32, 32×32 grid, M=256, D=96
    python benchmarks/bench_dechunk.py --hidden 768 --batch 8   # DC-DiT-B/N4 at ImageNet 256² (32×32 latent)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dcdit.models.chunking import RoutingRecord, gather_tokens
from dcdit.models.dechunking import DeChunk, grid_coords, nearest_kept_slot, squared_distances


def dense_dechunk(z: torch.Tensor, record: RoutingRecord, sigma: float) -> torch.Tensor:
    """The de-chunk formula with every weight evaluated (denormals included): the baseline."""
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


def time_fwd_bwd(fn, z: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        zz = z.clone().requires_grad_(True)
        t0 = time.perf_counter()
        fn(zz).square().mean().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first run warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--grid", type=int, default=32, help="grid side (L = grid²)")
    ap.add_argument("--tokens", type=int, default=256, help="kept tokens per sample (M)")
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = random_record(args.batch, args.grid, args.tokens, seed=0)
    z = torch.randn(args.batch, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1))
    ours = DeChunk(args.sigma)
    torch.testing.assert_close(ours(z, record), dense_dechunk(z, record, args.sigma), atol=1e-6, rtol=1e-5)

    dense_s = time_fwd_bwd(lambda zz: dense_dechunk(zz, record, args.sigma), z, args.repeats)
    ours_s = time_fwd_bwd(lambda zz: ours(zz, record), z, args.repeats)
    print(f"de-chunk fwd+bwd, B={args.batch}, grid {args.grid}², M={args.tokens}, D={args.hidden}, "
          f"σ={args.sigma}, {torch.get_num_threads()} thread(s); outputs agree")
    print(f"{'variant':<28}{'median s':>10}{'vs dense':>10}")
    print(f"{'dense (every weight)':<28}{dense_s:>10.4f}{1.0:>10.2f}")
    print(f"{'DeChunk (cut below e^-60)':<28}{ours_s:>10.4f}{ours_s / dense_s:>10.2f}")


if __name__ == "__main__":
    main()
