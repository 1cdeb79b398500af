#!/usr/bin/env python
"""Speed benchmark: DyDiT-gated inner blocks of a DC-DiT, eval forward, sliced execution.

Times ``--depth`` inner blocks at width ``--hidden`` on a padded batch of ``--batch`` sequences of
up to ``--tokens`` slots (the samples keep between M/2 and M real tokens, as DC-DiT batches do), in
eval mode under ``torch.inference_mode``, for four stacks sharing the same block weights:

1. ``plain``       — DiTBlocks (the ungated DC-DiT);
2. ``dydit-on``    — DynamicDiTBlocks, fresh routers (every head, group and token on);
3. ``dydit-half``  — router biases set so that half of the heads and of the MLP groups are off and
                     the token router (random weights, zero bias) skips about half of the tokens;
                     sliced execution (the real inference path);
4. ``dydit-half-masked`` — the same gates run by masking (what training does): no savings expected.

Prints median seconds per forward and inner-stack GMACs per sample (``dcdit.flops.dydit_block_macs``,
counted from the gates each sample actually took), and both ratios to ``plain``. All stacks share one
timestep (one sampling step), so the batch runs one sub-network per block.

    python benchmarks/bench_dydit.py            # D=384, 12 blocks, M=256, batch 8
    python benchmarks/bench_dydit.py --tiny     # < 10 s smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from dcdit.config import DCDiTConfig
from dcdit.flops import dydit_block_macs
from dcdit.models.dit_block import DiTBlock
from dcdit.models.dydit import DynamicDiTBlock, set_dydit_execution


def build_stacks(D: int, depth: int, heads: int, seed: int = 0):
    torch.manual_seed(seed)
    dyn = nn.ModuleList([DynamicDiTBlock(D, heads) for _ in range(depth)])
    with torch.no_grad():
        for b in dyn:
            nn.init.normal_(b.adaLN_modulation[1].weight, std=0.02)
    plain = nn.ModuleList([DiTBlock(D, heads) for _ in range(depth)])
    for p, d in zip(plain, dyn):
        p.load_state_dict(d.state_dict(), strict=False)
    half = copy.deepcopy(dyn)
    n_on = heads // 2 - 1  # router outputs on, besides the always-on index 0: heads/2 on in total
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in half:
            for r in (b.attn_router, b.mlp_router):
                r.bias.copy_(torch.tensor([15.0] * n_on + [-15.0] * (heads - 1 - n_on)))
            b.token_router[2].weight.copy_(torch.randn(b.token_router[2].weight.shape, generator=g))
            b.token_router[2].bias.zero_()
    return plain.eval(), dyn.eval(), half.eval()


def run(stack, x, c, kv_mask, t_emb, dynamic: bool):
    stats: list = []
    for block in stack:
        x = block(x, c, kv_mask, t_emb=t_emb, stats=stats) if dynamic else block(x, c, kv_mask)
    return x, stats


def time_stack(stack, inputs, dynamic, repeats, warmup):
    with torch.inference_mode():
        for _ in range(warmup):
            run(stack, *inputs, dynamic)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, stats = run(stack, *inputs, dynamic)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), stats


def stack_macs(cfg: DCDiTConfig, kept: torch.Tensor, stats) -> float:
    """Mean over samples of the inner-stack MACs (routers included for dynamic stacks)."""
    H = cfg.num_heads
    total = 0.0
    for b, M in enumerate(kept.tolist()):
        for l in range(cfg.depth):
            if stats is None:
                comps = dydit_block_macs(cfg, M, H, H, M)
                comps.pop("blocks.dydit_routers")
            else:
                s = stats[l]
                comps = dydit_block_macs(cfg, M, int(s.head_mask[b].sum()), int(s.group_mask[b].sum()), int(s.token_mask[b].sum()))
            total += sum(comps.values())
    return total / len(kept)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=256, help="padded inner length M")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="D=64, 2 blocks, 4 heads, M=32, batch 2, 2 repeats")
    args = ap.parse_args(argv)
    if args.tiny:
        args.hidden, args.depth, args.heads, args.tokens, args.batch, args.repeats, args.warmup = 64, 2, 4, 32, 2, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    D, M, B = args.hidden, args.tokens, args.batch
    cfg = DCDiTConfig(hidden_size=D, depth=args.depth, num_heads=args.heads, dydit=True)
    plain, dyn, half = (s.to(dev) for s in build_stacks(D, args.depth, args.heads))
    half_masked = copy.deepcopy(half)
    set_dydit_execution(half_masked, False)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, M, D, generator=g).to(dev)
    c = torch.randn(B, D, generator=g).to(dev)
    t_emb = torch.randn(1, D, generator=g).expand(B, D).to(dev)  # one sampling step: shared t
    kept = torch.linspace(M, M // 2, B).round().long()  # ragged real lengths, padded to M
    kv_mask = (torch.arange(M)[None] < kept[:, None]).to(dev)
    inputs = (x, c, kv_mask, t_emb)

    print(f"inner stack: D={D}, depth={args.depth}, heads={args.heads}, M={M} (real {kept.min()}..{kept.max()}), "
          f"batch={B}, device={dev}, threads={torch.get_num_threads()}")
    rows = []
    for name, stack, dynamic in (("plain", plain, False), ("dydit-on", dyn, True), ("dydit-half", half, True),
                                 ("dydit-half-masked", half_masked, True)):
        sec, stats = time_stack(stack, inputs, dynamic, args.repeats, args.warmup)
        macs = stack_macs(cfg, kept, stats if dynamic else None)
        frac = ""
        if dynamic:
            real = kv_mask.float()
            heads = statistics.mean(float(s.head_mask.mean()) for s in stats)
            groups = statistics.mean(float(s.group_mask.mean()) for s in stats)
            toks = statistics.mean(float(s.token_mask.sum() / real.sum()) for s in stats)
            frac = f"heads {heads:.2f} groups {groups:.2f} tokens {toks:.2f}"
        rows.append((name, sec, macs, frac))
    base_s, base_m = rows[0][1], rows[0][2]
    print(f"{'stack':<20}{'seconds':>10}{'GMACs/sample':>14}{'time ratio':>12}{'MAC ratio':>11}  gates on")
    for name, sec, macs, frac in rows:
        print(f"{name:<20}{sec:>10.4f}{macs / 1e9:>14.4f}{sec / base_s:>12.3f}{macs / base_m:>11.3f}  {frac}")


if __name__ == "__main__":
    main()
