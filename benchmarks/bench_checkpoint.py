#!/usr/bin/env python
"""What checkpoint safety costs: ``save_checkpoint`` (manifest with SHA-256 of every file, fsync)
against the same four files written bare (no hashes, no fsync), and the checks on reading: the quick
one ``find_checkpoint`` runs (sizes + headers) and the full one (every file's SHA-256).

Both sides write the same model, EMA and AdamW state (after one step, so the optimizer holds its two
moments) into the same folder, alternating, and the table shows medians and the ratio.

    python benchmarks/bench_checkpoint.py                          # DC-DiT-B width, 4 blocks (~50M parameters)
    python benchmarks/bench_checkpoint.py --depth 12 --repeats 3   # DC-DiT-B/N4 as in the paper (136M)
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from dcdit.checkpoint import checkpoint_problems, find_checkpoint, save_checkpoint, save_weights
from dcdit.config import build_model, load_run_config, run_config_to_dict


def save_bare(run: Path, step: int, model, ema, optimizer, cfg) -> None:
    """The four checkpoint files with nothing else (no manifest, no fsync)."""
    folder = run / "bare" / f"{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "model.safetensors", model.state_dict(), cfg, step)
    save_weights(folder / "ema.safetensors", ema.state_dict(), cfg, step)
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, folder / "training_state.pt")
    (folder / "config.yaml").write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="DC-DiT-B-N4")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    cfg = load_run_config(args.config, [f"model.depth={args.depth}"])
    model = build_model(cfg.model)
    ema = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the moments exist, as in any real checkpoint

    run = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    bare, safe, quick, full = [], [], [], []
    try:
        for r in range(args.repeats):
            bare.append(timed(lambda: save_bare(run, r, model, ema, optimizer, cfg)))
            safe.append(timed(lambda: save_checkpoint(run, r, model, ema, optimizer, cfg, {}, keep_last=1)))
            quick.append(timed(lambda: find_checkpoint(run)))
            full.append(timed(lambda: checkpoint_problems(find_checkpoint(run), full=True)))
            shutil.rmtree(run / "bare")
        size = sum(f.stat().st_size for f in find_checkpoint(run).iterdir()) / 2**20
    finally:
        shutil.rmtree(run, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.config} depth {args.depth}: {params:.1f}M parameters, checkpoint {size:.0f} MiB, "
          f"{args.repeats} repeats, load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    med = {k: statistics.median(v) for k, v in (("bare", bare), ("safe", safe), ("quick", quick), ("full", full))}
    print(f"{'step':<46}{'median s':>10}{'vs bare write':>15}")
    print(f"{'write, bare (4 files)':<46}{med['bare']:>10.3f}{1.0:>15.2f}")
    print(f"{'save_checkpoint (+ manifest SHA-256, fsync)':<46}{med['safe']:>10.3f}{med['safe'] / med['bare']:>15.2f}")
    print(f"{'find_checkpoint (sizes + headers)':<46}{med['quick']:>10.3f}{med['quick'] / med['bare']:>15.3f}")
    print(f"{'checkpoint_problems(full=True) (SHA-256)':<46}{med['full']:>10.3f}{med['full'] / med['bare']:>15.2f}")


if __name__ == "__main__":
    main()
