#!/usr/bin/env python
"""CPU time, page faults and peak memory with and without ``dcdit.malloc.reuse_freed_memory``, in one run.

The allocator's thresholds are process-wide and one-way, so each side runs in its own child process,
the two alternating round by round (plain first in even rounds, tuned first in odd ones) so that load
from other processes falls on both alike. Each child loads the shipped MNIST DC-DiT checkpoint, runs
one warm-up (or ``--config``'s model with fresh weights), then times

* guided sampling forwards of ``--rows`` rows (the Table-1 study's evaluation chunk: 100 samples and
  their unconditional halves) at t = 950, 750, 500, 250, 50, and
* training steps (diffusion loss, backward, AdamW) at batch ``--batch``,

and reports per call the wall time, its user and system CPU seconds and minor page faults, and its
peak RSS. The sampling outputs of the two sides must be the same bit for bit (checked by hash).

    python benchmarks/bench_malloc.py                       # 1 thread, 3 rounds
    python benchmarks/bench_malloc.py --threads 2 --rounds 5
    python benchmarks/bench_malloc.py --config runs/table1/configs/isoflop.yaml   # the study's isoflop DiT/2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import machine_info, print_machine
from dcdit import DEMO_CHECKPOINT

TIMESTEPS = (950, 750, 500, 250, 50)


def usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def measure(fn, calls: int) -> dict:
    """Per-call medians of wall, user, sys and minor faults over ``calls`` calls of ``fn(i)``."""
    rows = []
    for i in range(calls):
        u0, s0, f0 = usage()
        t0 = time.perf_counter()
        fn(i)
        wall = time.perf_counter() - t0
        u1, s1, f1 = usage()
        rows.append((wall, u1 - u0, s1 - s0, f1 - f0))
    return {k: statistics.median(r[j] for r in rows) for j, k in enumerate(("wall_s", "user_s", "sys_s", "minor_faults"))}


def worker(args) -> dict:
    """One side: the measurements of one child process (printed as JSON)."""
    from dcdit.checkpoint import load_model
    from dcdit.config import build_model, load_run_config
    from dcdit.diffusion import create_diffusion
    from dcdit.malloc import reuse_freed_memory
    from dcdit.models.interface import predict_guided

    applied = reuse_freed_memory() if args.worker == "tuned" else False
    torch.set_num_threads(args.threads)
    if args.config:  # a config's model with fresh weights (a DiT's time does not depend on its weights)
        torch.manual_seed(0)
        cfg = load_run_config(args.config)
        model = build_model(cfg.model)
    else:
        model, cfg, _ = load_model(DEMO_CHECKPOINT)
    g = torch.Generator().manual_seed(0)
    n = args.rows // 2
    x = torch.randn(n, cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size, generator=g)
    y = torch.arange(n) % cfg.model.num_classes
    xx, yy = torch.cat([x, x]), torch.cat([y, torch.full_like(y, cfg.model.num_classes)])
    hashes = []  # of the timed sampling outputs, compared across sides

    def sample(i: int) -> None:
        with torch.inference_mode():
            out, _ = predict_guided(model.eval(), xx, torch.full((2 * n,), TIMESTEPS[i % len(TIMESTEPS)]), yy, 2.0)
        hashes.append(hashlib.sha256(out.numpy().tobytes()).hexdigest())

    diffusion = create_diffusion(timestep_respacing="", noise_schedule=cfg.model.noise_schedule)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    xb = torch.randn(args.batch, *x.shape[1:], generator=g)
    yb = torch.arange(args.batch) % cfg.model.num_classes

    def train(i: int) -> None:
        model.train()
        t = torch.randint(0, diffusion.num_timesteps, (args.batch,), generator=torch.Generator().manual_seed(i))
        loss = diffusion.training_losses(model, xb, t, model_kwargs=dict(y=yb))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sample(0)
    hashes.clear()  # the warm-up's output is not compared
    result = {"applied": applied, "sampling": measure(sample, args.forwards)}
    train(0)
    result["training"] = measure(train, args.train_steps)
    result["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    result["sampling_sha256"] = hashlib.sha256("".join(hashes).encode()).hexdigest()
    return result


def child(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--threads", str(args.threads), "--rows", str(args.rows),
           "--forwards", str(args.forwards), "--batch", str(args.batch), "--train-steps", str(args.train_steps)]
    cmd += ["--config", args.config] if args.config else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "DCDIT_MALLOC": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200, help="rows of a guided sampling forward (samples × 2)")
    ap.add_argument("--forwards", type=int, default=5, help="timed sampling forwards per child")
    ap.add_argument("--batch", type=int, default=32, help="training batch")
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps per child")
    ap.add_argument("--config", default=None, help="time this YAML config's model with fresh weights instead of the "
                                                   "shipped MNIST DC-DiT (e.g. a DiT/2 baseline from `dcdit baselines`)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", choices=["plain", "tuned"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)
    runs = {"plain": [], "tuned": []}
    for r in range(args.rounds):
        for side in (("plain", "tuned") if r % 2 == 0 else ("tuned", "plain")):
            runs[side].append(child(side, args))
            print(f"round {r + 1}/{args.rounds}: {side} done", flush=True)
    if not runs["tuned"][0]["applied"]:
        print("reuse_freed_memory() did not apply here (not glibc?): both sides are glibc's defaults")
    hashes = {x["sampling_sha256"] for side in runs.values() for x in side}
    print(f"sampling outputs identical across sides and rounds: {len(hashes) == 1}")
    print(f"\n| {args.threads} thread(s), medians of {args.rounds} rounds | plain | tuned | tuned ÷ plain |\n|---|---|---|---|")
    summary = {}
    for part in ("sampling", "training"):
        for key in ("wall_s", "user_s", "sys_s", "minor_faults"):
            p, t = (statistics.median(x[part][key] for x in runs[s]) for s in ("plain", "tuned"))
            summary[f"{part} {key}"] = (p, t)
            print(f"| {part} {key.replace('_', ' ')} per call | {p:.4g} | {t:.4g} | {t / p:.2f} |" if p else
                  f"| {part} {key.replace('_', ' ')} per call | {p:.4g} | {t:.4g} | |")
    p, t = (statistics.median(x["max_rss_gb"] for x in runs[s]) for s in ("plain", "tuned"))
    summary["max_rss_gb"] = (p, t)
    print(f"| peak RSS (GB) | {p:.2f} | {t:.2f} | {t / p:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "runs": runs, "summary": summary}, indent=1))
    return 0 if len(hashes) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
