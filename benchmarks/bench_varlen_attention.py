#!/usr/bin/env python
"""Speed benchmark: variable-length attention backends on CPU, forward + backward, in one run.

The packed inner network needs attention that stays inside each sample's segment of a (T, 3, heads,
hd) sequence. Candidates (``models/attention.py`` uses the winner on every non-flash device):

* ``padded``: scatter into a (B, M, ...) batch, SDPA with a key-padding mask, gather back (what the
  padded execution computes, padded rows included);
* ``per-segment``: ``dcdit.models.attention.sdpa_per_segment`` — SDPA once per segment, equal lengths
  batched into one call;
* ``segment-threads``: ``dcdit.models.segment_threads`` — the same kernel once per segment in the
  forward, the backward's segments spread over single-threaded workers (what the packed path runs
  on CPU with several threads and more than one length; equal to ``per-segment`` at 1 thread);
* ``grouped``: SDPA once per segment *length*: the rows of equal-length segments permuted together
  so that they share one call, and permuted back (what ``sdpa_per_segment`` did until 2026-12-01);
* ``nested``: nested jagged tensors (``torch.nested.nested_tensor_from_jagged``) through SDPA;
* ``block-diagonal``: one SDPA over all T tokens with a (T, T) same-segment mask.

Every backend is checked against ``per-segment`` before timing; a backend that fails to run is
reported with its error. Times are medians of interleaved rounds.

    python benchmarks/bench_varlen_attention.py --threads 2
    python benchmarks/bench_varlen_attention.py --threads 2 --sweep   # per-segment vs segment-threads by
                                                                      # segment count, heads and head dim
"""

from __future__ import annotations

import argparse
import random
import warnings

import torch
import torch.nn.functional as F

from common import interleaved, median
from dcdit.models import segment_threads
from dcdit.models.attention import sdpa_per_segment
from dcdit.models.packing import Packing

#: (name, segment lengths, heads, head dim): the spread-budget DC-DiT-S batch and an MNIST training batch.
CASES = [
    ("spread B8 (D 384, 6 heads)", [256, 231, 205, 180, 154, 128, 103, 77], 6, 64, ()),
    ("MNIST B32 (D 96, 4 heads)", [random.Random(i).randint(180, 340) for i in range(32)], 4, 24, ()),
    # an evaluation chunk: 100 guided samples = 200 segments (a (T, T) mask would take 13 GB: skipped)
    ("MNIST sampling B200 (D 96, 4 heads)", [random.Random(1000 + i).randint(240, 330) for i in range(200)], 4, 24,
     ("nested", "block-diagonal", "padded")),
]


def padded(qkv, packing):
    B, M = packing.batch, packing.max_len
    slot = torch.arange(packing.total) - packing.cu_seqlens.long()[packing.seg_ids]
    mask = torch.arange(M)[None] < torch.tensor(packing.sizes)[:, None]
    full = qkv.new_zeros(B, M, *qkv.shape[1:]).index_put((packing.seg_ids, slot), qkv)
    q, k, v = full.permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2)
    return out[packing.seg_ids, slot]


def grouped(qkv, packing):
    starts = packing.cu_seqlens[:-1].long()
    by_len: dict[int, list[int]] = {}
    for b, n in enumerate(packing.sizes):
        by_len.setdefault(n, []).append(b)
    order = torch.cat([(starts[torch.tensor(segs)][:, None] + torch.arange(n)).reshape(-1) for n, segs in by_len.items()])
    parts = qkv.index_select(0, order).split([n * len(segs) for n, segs in by_len.items()])
    outs = []
    for part, (n, segs) in zip(parts, by_len.items()):
        q, k, v = part.unflatten(0, (len(segs), n)).permute(2, 0, 3, 1, 4)
        outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(0, 1))
    return torch.cat(outs).index_select(0, torch.argsort(order))


def nested(qkv, packing):
    offsets = packing.cu_seqlens.long()
    q, k, v = (torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets).transpose(1, 2) for t in qkv.unbind(1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()


def block_diagonal(qkv, packing):
    same = packing.seg_ids[:, None] == packing.seg_ids[None, :]
    q, k, v = qkv.permute(1, 2, 0, 3)[:, None]  # 3 × (1, heads, T, hd)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=same)[0].transpose(0, 1)


def threaded(qkv, packing):
    return segment_threads.segment_attention(qkv, packing.sizes, packing.starts)


BACKENDS = {"padded": padded, "per-segment": sdpa_per_segment, "grouped": grouped, "segment-threads": threaded,
            "nested": nested, "block-diagonal": block_diagonal}


def fwd_bwd(fn, qkv, packing):
    def run():
        x = qkv.detach().requires_grad_(True)
        fn(x, packing).sum().backward()
    return run


#: The sweep behind ``models/attention.py``'s WORK_PER_THREAD: segment counts and (heads, head dim).
SWEEP_SEGMENTS = (8, 16, 32)
SWEEP_HEADS = ((4, 24), (2, 48), (6, 24), (4, 64), (6, 64), (12, 64), (16, 72))


def sweep(rounds: int) -> None:
    """segment-threads / per-segment forward + backward time, segments of 120–340 tokens."""
    print(f"{torch.get_num_threads()} thread(s); segment-threads time / per-segment time, forward + backward, "
          f"median of {rounds} interleaved rounds")
    for count in SWEEP_SEGMENTS:
        packing = Packing.from_counts(torch.tensor([random.Random(i).randint(120, 340) for i in range(count)]))
        for heads, hd in SWEEP_HEADS:
            qkv = torch.randn(packing.total, 3, heads, hd, generator=torch.Generator().manual_seed(0))
            fns = {"per-segment": fwd_bwd(sdpa_per_segment, qkv, packing), "segment-threads": fwd_bwd(threaded, qkv, packing)}
            secs, _ = interleaved(fns, rounds, 1)
            a, b = median(secs["per-segment"]), median(secs["segment-threads"])
            work = sum(n * n for n in packing.sizes) * heads * hd
            print(f"  {count:3d} segments, {heads:2d} heads × {hd:2d} (Σ n²·D {work:.2g}): per-segment {a * 1e3:7.1f} ms, "
                  f"segment-threads {b * 1e3:7.1f} ms, ratio {b / a:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sweep", action="store_true", help="only the segment-threads sweep")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sweep:
        return sweep(args.rounds)
    warnings.filterwarnings("ignore")  # nested tensors are a prototype API and say so at every call
    print(f"{torch.get_num_threads()} thread(s); forward + backward, median of {args.rounds} interleaved rounds")
    for name, sizes, heads, hd, skip in CASES:
        packing = Packing.from_counts(torch.tensor(sizes))
        qkv = torch.randn(packing.total, 3, heads, hd, generator=torch.Generator().manual_seed(0))
        ref = sdpa_per_segment(qkv, packing)
        fns, errors = {}, {}
        for backend, fn in BACKENDS.items():
            if backend in skip:
                errors[backend] = "skipped for this case"
                continue
            try:
                got = fn(qkv, packing)
                assert (got - ref).abs().max() < 1e-4, f"{backend} disagrees with per-segment"
                fns[backend] = fwd_bwd(fn, qkv, packing)
            except Exception as e:  # a backend without a CPU kernel
                errors[backend] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        secs, _ = interleaved(fns, args.rounds, 1)
        base = median(secs["per-segment"])
        print(f"\n{name}: lengths {min(sizes)}–{max(sizes)}, T = {sum(sizes)}, Σ n²·D = {sum(n * n for n in sizes) * heads * hd:.2g}")
        for backend in BACKENDS:
            if backend in errors:
                print(f"  {backend:<16} {errors[backend] if errors[backend].startswith('skipped') else 'failed: ' + errors[backend]}")
            else:
                s = median(secs[backend])
                print(f"  {backend:<16}{s * 1e3:9.1f} ms{s / base:8.2f}×")


if __name__ == "__main__":
    main()
