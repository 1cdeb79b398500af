#!/usr/bin/env python
"""Speed benchmark: packed vs padded execution of DC-DiT against the DiT baseline, in one run.

Two cases (issue 17), each timing all models interleaved round by round (medians over the rounds):

1. **Spread-budget forward** (eval, batch 8): a DC-DiT-S-like model (32×32×4 latent, D 384, 12
   blocks, 6 heads, N = 4, router="random" keeping ~L/4) with per-sample tail-drop fractions
   0, 0.1, …, 0.7, executed packed and padded, against DiT-S/2 (same width and depth, the isoparam
   baseline of ``dcdit.baselines`` at the DC-DiT's depth). Reported: time ratio to DiT-S/2 next to
   the mean-kept MAC ratio (``dcdit.flops``, each sample at its own kept count), and the share of a
   forward spent in the dynamic machinery (router + plan/chunk + de-chunk + residual).
2. **MNIST training step** (forward, backward, AdamW; batch 32 real digits): the shipped demo
   checkpoint (its trained router) packed and padded, against the FLOP-matched DiT/2 that
   ``dcdit baselines mnist`` writes (isoflop at the nominal budget L/N). Reported: time per MAC
   relative to the DiT. The optimizer's learning rate is 0 so every round routes the same tokens
   (its work does not depend on the rate).

``--profile`` adds, per model, a phase breakdown (forward hooks; backward and optimizer timed
around their calls) and torch.profiler's top operators by self CPU time.

    python benchmarks/bench_packed.py --threads 2 1            # both cases, 2 then 1 thread(s)
    python benchmarks/bench_packed.py --threads 2 --profile    # with the breakdowns
    python benchmarks/bench_packed.py --tiny --rounds 2        # smoke test, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from common import (DYNAMIC, PHASES, PhaseTimer, in_execution, interleaved, machine_info, mean_components, median, no_gc,
                    phase_flops, print_machine, record_components)
from dcdit.baselines import build_baselines, isoparam_dit
from dcdit.config import DCDiTConfig, build_model, load_run_config
from dcdit.diffusion import create_diffusion
from dcdit.flops import dit_macs
from dcdit.ratio_loss import ratio_loss

SPREAD_FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


# ------------------------------------------------------------------------------------------ models


def spread_config(tiny: bool) -> DCDiTConfig:
    """The DC-DiT-S-like config of the issue's measurement (or a tiny one for smoke tests)."""
    if tiny:
        return DCDiTConfig(input_size=16, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10,
                           encoder_width=16, conv_norm_groups=8, router="random", target_ratio=4.0)
    return DCDiTConfig(input_size=32, in_channels=4, hidden_size=384, depth=12, num_heads=6, num_classes=1000,
                       router="random", target_ratio=4.0)


def dcdit_pair(cfg: DCDiTConfig, seed: int):
    torch.manual_seed(seed)
    packed = build_model(dataclasses.replace(cfg, execution="packed")).eval()
    return {"packed": packed, "padded": in_execution(packed, "padded")}


def add_ratios(rows: dict, base: str) -> None:
    """Time, MAC and time-per-MAC ratios of every row to ``base``. ``paired_time_per_mac_ratio`` is the
    median over rounds of each round's own ratio: the rounds interleave the models, so a drift of the
    machine's speed during the run (±20% seen on this VM, docs/benchmarks.md) cancels in it, while
    the ratio of the medians keeps it."""
    b = rows[base]
    for r in rows.values():
        r["time_ratio"] = r["sec"] / b["sec"]
        r["mac_ratio"] = r["macs"] / b["macs"]
        r["time_per_mac_ratio"] = r["time_ratio"] / r["mac_ratio"]
        r["paired_time_per_mac_ratio"] = median([x / y for x, y in zip(r["sec_all"], b["sec_all"])]) / r["mac_ratio"]


def mean_macs(cfg: DCDiTConfig, execution: str, record) -> float:
    """Mean MACs per sample of the forward pass that produced ``record``, as ``execution`` runs it."""
    return sum(record_components(dataclasses.replace(cfg, execution=execution), [record]).values())


# ------------------------------------------------------------------------------------------ case 1


def spread_forward(args) -> dict:
    cfg = spread_config(args.tiny)
    dit_cfg = dataclasses.replace(isoparam_dit(cfg), depth=cfg.depth)
    dc = dcdit_pair(cfg, args.seed)
    torch.manual_seed(args.seed)
    dit = build_model(dit_cfg).eval()
    B = len(SPREAD_FRACTIONS)
    g = torch.Generator().manual_seed(args.seed)
    H = cfg.input_size
    x = torch.randn(B, cfg.in_channels, H, H, generator=g)
    t = torch.linspace(0, 999, B).round().long()
    y = torch.randint(0, cfg.num_classes, (B,), generator=g)
    fractions = torch.tensor(SPREAD_FRACTIONS)

    def dc_call(model):
        def call():
            torch.manual_seed(args.seed)  # the random router draws the same boundaries for both executions
            return model(x, t, y, fractions)[1]
        return call

    fns = {"DiT/2": lambda: dit(x, t, y), "DC-DiT packed": dc_call(dc["packed"]), "DC-DiT padded": dc_call(dc["padded"])}
    with torch.inference_mode():
        secs, outs = interleaved(fns, args.rounds, args.warmup)
    rec = outs["DC-DiT packed"][-1]
    counts = rec.kept_count.tolist()
    dit_macs_ = dit_macs(dit_cfg).total
    rows = {"DiT/2": dict(sec=median(secs["DiT/2"]), macs=dit_macs_, sec_all=secs["DiT/2"])}
    for ex in ("packed", "padded"):
        name = f"DC-DiT {ex}"
        M = int(rec.kept_count.max())
        padded_cfg = dataclasses.replace(cfg, execution="padded")
        macs_at = sum(mean_components(padded_cfg, [M] * B).values()) if ex == "padded" else None  # the padded batch's work
        rows[name] = dict(sec=median(secs[name]), macs=mean_macs(cfg, ex, rec), macs_padded=macs_at, sec_all=secs[name])
    add_ratios(rows, "DiT/2")
    out = dict(config=dataclasses.asdict(cfg), dit_config=dataclasses.asdict(dit_cfg), fractions=SPREAD_FRACTIONS,
               kept_counts=counts, padded_M=int(rec.kept_count.max()), rows=rows)
    out["breakdown"] = {ex: forward_breakdown(dc[ex], (x, t, y, fractions), cfg, rec, args) for ex in ("packed", "padded")}
    return out


def forward_breakdown(model, inputs, cfg, record, args) -> dict:
    """Median seconds per forward phase (hooks) next to the phase's MAC share."""
    timer = PhaseTimer(model)
    try:
        with torch.inference_mode(), no_gc():
            for _ in range(args.rounds):
                torch.manual_seed(args.seed)
                model(*inputs)
    finally:
        timer.remove()
    secs = timer.median_seconds()
    macs = phase_flops(record_components(dataclasses.replace(cfg, execution=model.execution), [record]))
    total_s, total_m = sum(secs.values()), sum(macs.values())
    return dict(seconds=secs, time_share={k: v / total_s for k, v in secs.items()},
                mac_share={k: v / total_m for k, v in macs.items()},
                dynamic_time_share=sum(secs[k] for k in DYNAMIC) / total_s,
                dynamic_mac_share=sum(macs[k] for k in DYNAMIC) / total_m)


# ------------------------------------------------------------------------------------------ case 2


def mnist_batch(n: int, seed: int):
    """n real training digits, spread over the classes (the file is sorted by class), and a timestep,
    noise and label each — the same for every model."""
    from dcdit.data.mnist import load_mnist_tensors

    xs, ys = load_mnist_tensors("train")
    idx = torch.linspace(0, len(xs) - 1, n).round().long()
    g = torch.Generator().manual_seed(seed)
    return xs[idx], ys[idx], torch.randint(0, 1000, (n,), generator=g), torch.randn(n, *xs.shape[1:], generator=g)


def training_models(args):
    """{name: (model, config)}: the demo checkpoint packed and padded, and the isoflop DiT/2 of
    ``dcdit baselines mnist`` (random weights: only its cost matters)."""
    from dcdit.checkpoint import load_model
    from dcdit.cli import DEMO_CHECKPOINT

    run_cfg = load_run_config("mnist", [])
    if args.tiny:
        dc_cfg = dataclasses.replace(run_cfg.model, hidden_size=32, depth=1, num_heads=2, encoder_width=8)
        run_cfg = dataclasses.replace(run_cfg, model=dc_cfg)
        torch.manual_seed(args.seed)
        packed = build_model(dc_cfg)
    else:
        packed, ckpt_cfg, _ = load_model(DEMO_CHECKPOINT)
        dc_cfg = ckpt_cfg.model
    packed.execution = "packed"
    iso = build_baselines(run_cfg)["isoflop"]["config"]
    torch.manual_seed(args.seed)
    return {"DC-DiT packed": (packed, dc_cfg), "DC-DiT padded": (in_execution(packed, "padded"), dc_cfg),
            "isoflop DiT/2": (build_model(iso), iso)}


def train_step(model, opt, diffusion, batch, target_ratio, phases: dict | None = None):
    """One step as ``dcdit.train`` takes it: diffusion loss (+ 0.03 · ratio loss), backward, clip, AdamW."""
    x, y, t, noise = batch
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    terms = diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=noise)
    loss = terms["loss"].mean()
    record = terms.get("aux")
    if record is not None:
        loss = loss + 0.03 * ratio_loss(record, target_ratio, 16)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if phases is not None:
        phases.setdefault("forward+loss", []).append(t1 - t0)
        phases.setdefault("backward", []).append(t2 - t1)
        phases.setdefault("clip+optimizer", []).append(time.perf_counter() - t2)
    return record


def training_step(args) -> dict:
    models = training_models(args)
    batch = mnist_batch(args.train_batch, args.seed)
    diffusion = create_diffusion("", noise_schedule="cosine")
    opts = {n: torch.optim.AdamW(m.parameters(), lr=0.0, weight_decay=0.0) for n, (m, _) in models.items()}
    for m, _ in models.values():
        m.train()

    def call(name):
        model, cfg = models[name]

        def fn():
            torch.manual_seed(args.seed)  # the same label dropout for every model
            return train_step(model, opts[name], diffusion, batch, getattr(cfg, "target_ratio", 4.0))
        return fn

    secs, outs = interleaved({n: call(n) for n in models}, args.rounds, args.warmup)
    rec = outs["DC-DiT packed"][-1]
    counts = rec.kept_count.tolist()
    iso_cfg = models["isoflop DiT/2"][1]
    dc_cfg = models["DC-DiT packed"][1]
    rows = {"isoflop DiT/2": dict(sec=median(secs["isoflop DiT/2"]), macs=dit_macs(iso_cfg).total)}
    for ex in ("packed", "padded"):
        rows[f"DC-DiT {ex}"] = dict(sec=median(secs[f"DC-DiT {ex}"]), macs=mean_macs(dc_cfg, ex, rec))
    for name, r in rows.items():
        r["sec_all"] = secs[name]
    add_ratios(rows, "isoflop DiT/2")
    out = dict(batch=args.train_batch, kept_counts=counts, padded_M=max(counts), dit_config=dataclasses.asdict(iso_cfg),
               rows=rows)
    if args.profile:
        out["profile"] = {n: profile_training_step(models[n][0], opts[n], diffusion, batch, args) for n in models}
    return out


def profile_training_step(model, opt, diffusion, batch, args) -> dict:
    """Where a training step goes: forward phases (hooks; DC-DiT only), backward and optimizer, and
    torch.profiler's top operators by self CPU time (one step)."""
    from torch.profiler import ProfilerActivity, profile

    steps: dict = {}
    timer = PhaseTimer(model) if hasattr(model, "dechunk") else None
    try:
        with no_gc():
            for _ in range(args.rounds):
                torch.manual_seed(args.seed)
                train_step(model, opt, diffusion, batch, 4.0, steps)
    finally:
        if timer is not None:
            timer.remove()
    out = {"step_phases": {k: median(v) for k, v in steps.items()}}
    if timer is not None:
        out["forward_phases"] = timer.median_seconds()
    torch.manual_seed(args.seed)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, opt, diffusion, batch, 4.0)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top_ops]
    out["top_ops_ms"] = [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events]
    return out


# ------------------------------------------------------------------------------------------ report


def print_rows(title: str, rows: dict, base: str) -> None:
    print(title)
    print(f"    {'model':<18}{'s (median)':>12}{'time ratio':>12}{'MAC ratio':>11}{'time/MAC':>10}{'paired':>8}")
    for name, r in rows.items():
        print(f"    {name:<18}{r['sec']:>12.4f}{r['time_ratio']:>12.3f}{r['mac_ratio']:>11.3f}{r['time_per_mac_ratio']:>10.3f}"
              f"{r['paired_time_per_mac_ratio']:>8.3f}")
    print(f"    (ratios to {base}; MACs per sample from dcdit.flops, DC-DiT at each sample's own kept count; paired:\n"
          f"     the median of the per-round time/MAC ratios, robust to the machine's speed drifting during the run)")


def print_report(res: dict, args) -> None:
    if "spread_forward" in res:
        print_spread(res["spread_forward"])
    if "training_step" in res:
        print_training(res["training_step"])


def print_spread(s: dict) -> None:
    print_rows(f"\n[1] spread-budget forward, batch {len(s['fractions'])}, fractions {s['fractions']}: kept "
               f"{s['kept_counts']} (mean {sum(s['kept_counts']) / len(s['kept_counts']):.0f}, padded M {s['padded_M']})",
               s["rows"], "DiT/2")
    for ex, b in s["breakdown"].items():
        phases = "  ".join(f"{k} {b['time_share'][k]:.1%}" for k in PHASES)
        print(f"    {ex}: dynamic machinery {b['dynamic_time_share']:.1%} of the time ({b['dynamic_mac_share']:.1%} of "
              f"the MACs) | {phases}")


def print_training(tr: dict) -> None:
    print_rows(f"\n[2] training step (forward, backward, AdamW), batch {tr['batch']}: kept mean "
               f"{sum(tr['kept_counts']) / len(tr['kept_counts']):.0f}, padded M {tr['padded_M']}",
               tr["rows"], "isoflop DiT/2")
    for name, p in tr.get("profile", {}).items():
        print(f"\n    profile {name}: " + "  ".join(f"{k} {v * 1e3:.0f} ms" for k, v in p["step_phases"].items()))
        if "forward_phases" in p:
            print("      forward: " + "  ".join(f"{k} {v * 1e3:.0f} ms" for k, v in p["forward_phases"].items()))
        for key, ms, n in p["top_ops_ms"]:
            print(f"      {ms:9.1f} ms  {n:5d}×  {key}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads values, run in turn")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (each model once per round); medians reported")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--cases", nargs="+", default=["spread", "train"], choices=["spread", "train"])
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="phase breakdown and top operators of a training step")
    ap.add_argument("--top-ops", type=int, default=12)
    ap.add_argument("--tiny", action="store_true", help="tiny models: a smoke test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results", help="folder for packed.json")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        raise SystemExit("--rounds must be >= 1 and --warmup >= 0")
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        info = machine_info()
        print("=" * 100)
        print_machine(info)
        res = {"machine": info, "args": vars(args)}
        if "spread" in args.cases:
            res["spread_forward"] = spread_forward(args)
        if "train" in args.cases:
            res["training_step"] = training_step(args)
        print_report(res, args)
        res["machine"]["load_average_at_end"] = list(__import__("os").getloadavg())
        results[f"threads_{threads}"] = res
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("packed_tiny.json" if args.tiny else "packed.json")
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return results


if __name__ == "__main__":
    main()
