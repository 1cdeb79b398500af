#!/usr/bin/env python
"""Speed benchmark: DC-DiT's elastic inference against its DiT baselines, measured in one run.

What it measures, all at the SAME batch size on the same inputs, in eval mode under
``torch.inference_mode``, with DC-DiT in each ``--executions`` layout (packed: the real tokens of all
samples in one sequence; padded: every sample padded to the batch maximum, the reference):

1. **Forward pass** (batch B, no guidance): the DiT/2 baseline, the isoparam and isoflop DiTs of
   ``dcdit.baselines`` (patch √N), and DC-DiT at every tail-drop fraction f. All rows are timed
   interleaved, round by round; medians of ``--repeats`` rounds after ``--warmup``. Tokens kept
   (mean real inner tokens per sample, and the padded M), GMACs per sample (``dcdit.flops``: the
   mean of each sample's own count, the paper's convention, and the count at the padded M), time
   and FLOP ratios to DiT/2.
2. **Dynamic-machinery breakdown** of a DC-DiT forward: forward hooks time the phases
   encode | router | plan+chunk | inner blocks | de-chunk | residual (+STE) | decode, and their
   time share is put next to their FLOP share.
3. **Guided forward** (batch 2B = [cond; uncond], as classifier-free guidance runs it): DiT/2,
   DC-DiT with the same f for both halves, and Lite-CFG (cond f_c, uncond f_u). The executions'
   outputs are compared (max |Δ|).
4. **Full sampling runs** (DDIM, ``--sampling-steps`` steps, CFG) for every model / setting, with
   the per-step routing trace turned into FLOPs by ``dcdit.flops.sampling_flops``.

Writes ``results.json`` (every number, raw times included) and ``elastic.png`` (seconds per
forward and GMACs vs tail-drop fraction, DiT baselines as horizontal lines) into ``--out``.

Run ``python benchmarks/bench_elastic.py --help``; ``--tiny`` is a < 1 minute smoke test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import dcdit
from common import (DYNAMIC, PHASES, PhaseTimer, in_execution, interleaved, machine_info, make_sync, record_components,
                    median, no_gc, phase_flops, print_machine, timed)
from dcdit.baselines import isoflop_dit, isoparam_dit
from dcdit.config import DCDiTConfig, DiTConfig, build_model, count_parameters, get_preset, model_config_to_dict
from dcdit.flops import dcdit_macs, dit_macs, sampling_flops
from dcdit.sampling import generate

DEMO_CKPT = Path(dcdit.__file__).parent / "assets" / "mnist_dcdit.safetensors"


@dataclass
class Bench:
    """Everything the sections share: arguments, the DC-DiT in each execution, the DiT baselines, inputs."""

    args: argparse.Namespace
    device: torch.device
    sync: object
    dc_cfg: DCDiTConfig
    dc_models: dict  # execution -> DCDiT (shared weights)
    dc_note: str
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    baselines: dict = field(default_factory=dict)  # role -> (label, DiTConfig, model or None when same as another)

    @property
    def B(self) -> int:
        return self.x.shape[0]

    @property
    def guided(self) -> bool:
        return float(self.dc_cfg.class_dropout_prob) > 0 and self.args.cfg_scale != 1.0

    def cfg_batch(self):
        null = torch.full_like(self.y, self.dc_cfg.num_classes)
        return torch.cat([self.x, self.x]), torch.cat([self.t, self.t]), torch.cat([self.y, null])


# ------------------------------------------------------------------------------------------ setup


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", default=None,
                    help="a dcdit DC-DiT checkpoint (file / checkpoint folder / run folder) with learned routing; "
                         "'demo' = the shipped MNIST model. Without it, a config with router='random' is used.")
    ap.add_argument("--size", default="S", choices=["S", "B", "L", "XL"],
                    help="config mode: width/depth/heads of the DiT-<size> preset")
    ap.add_argument("--ratio", type=float, default=4.0, help="config mode: target downsampling N (random router keeps L/N)")
    ap.add_argument("--input-size", type=int, default=32, help="config mode: latent grid side")
    ap.add_argument("--in-channels", type=int, default=4, help="config mode: latent channels")
    ap.add_argument("--num-classes", type=int, default=1000, help="config mode: classes")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (16x16, D=64, depth 2) for a < 1 min smoke test")
    ap.add_argument("--executions", nargs="+", default=["packed", "padded"], choices=["packed", "padded"],
                    help="DC-DiT inner-network layouts to time (model.execution)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward (guided: 2x this)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per row (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    ap.add_argument("--sampling-steps", type=int, default=10, help="DDIM steps per sampling run (0 skips sampling)")
    ap.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale of the guided forward and sampling")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="DC-DiT tail-drop fractions")
    ap.add_argument("--lite-cfg", type=float, nargs=2, default=[0.0, 0.9], metavar=("F_COND", "F_UNCOND"),
                    help="Lite-CFG tail-drop fractions of the conditional and unconditional halves")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results", help="folder for results.json and elastic.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.sampling_steps < 0:
        raise SystemExit("--repeats and --batch-size must be >= 1, --warmup and --sampling-steps >= 0")
    for f in [*args.fractions, *args.lite_cfg]:
        if not 0.0 <= f < 1.0:
            raise SystemExit(f"tail-drop fractions must lie in [0, 1), got {f}")
    return args


def load_dcdit(args, device) -> tuple[nn.Module, DCDiTConfig, str]:
    if args.ckpt:
        from dcdit.checkpoint import load_model

        path = DEMO_CKPT if args.ckpt == "demo" else Path(args.ckpt)
        if args.ckpt == "demo" and not path.exists():
            raise SystemExit(f"the shipped demo checkpoint {path} does not exist (yet); pass a checkpoint path")
        model, run_cfg, step = load_model(path, use_ema=True, device=device)
        cfg = run_cfg.model
        if cfg.arch != "dcdit":
            raise SystemExit(f"--ckpt {path} holds a {cfg.arch!r} model; this benchmark needs a DC-DiT checkpoint")
        return model, cfg, f"checkpoint {path} (step {step}), learned {cfg.router} router"
    if args.tiny:
        d = dict(input_size=16, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10, encoder_width=16,
                 conv_norm_groups=8)
    else:
        base = get_preset(f"DiT-{args.size}/2")
        d = dict(input_size=args.input_size, in_channels=args.in_channels, hidden_size=base.hidden_size,
                 depth=base.depth, num_heads=base.num_heads, num_classes=args.num_classes)
        if (base.hidden_size // 4) % 32:
            d["conv_norm_groups"] = math.gcd(base.hidden_size // 4, 32)
    cfg = DCDiTConfig(**d, router="random", target_ratio=args.ratio)
    model = build_model(cfg).to(device).eval()
    note = (f"config (untrained weights), router='random': boundaries drawn uniformly at rate 1/N = 1/{args.ratio:g} "
            f"(an untrained cosine router keeps almost nothing); chunk / de-chunk / residual are exactly the "
            f"trained model's machinery")
    return model, cfg, note


def dit2_config(dc: DCDiTConfig) -> DiTConfig:
    """DiT/2 with the DC-DiT's width, heads, depth, input and output (``dcdit.baselines``' DiT, patch 2)."""
    return dataclasses.replace(isoparam_dit(dc), patch_size=2, depth=dc.depth)


def setup(args) -> Bench:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, cfg, note = load_dcdit(args, device)
    models = {ex: in_execution(model, ex) for ex in args.executions}
    H, W = (cfg.input_size,) * 2 if isinstance(cfg.input_size, int) else tuple(cfg.input_size)
    gen = torch.Generator().manual_seed(args.seed)  # inputs shared by every model
    x = torch.randn(args.batch_size, cfg.in_channels, H, W, generator=gen).to(device)
    t = torch.linspace(0, 999, args.batch_size).round().long().to(device)  # timesteps spread over [0, 999]
    y = torch.randint(0, cfg.num_classes, (args.batch_size,), generator=gen).to(device)
    return Bench(args, device, make_sync(device), cfg, models, note, x, t, y)


def add_baselines(bench: Bench, dc_macs_at_smallest_f: float) -> None:
    """DiT/2, and dcdit.baselines' isoparam and isoflop DiTs (isoflop: the DC-DiT's measured mean MACs at
    the smallest fraction). A baseline equal to one already listed is marked and not built again."""
    dc = bench.dc_cfg
    cfgs = {"dit2": dit2_config(dc), "isoparam": isoparam_dit(dc), "isoflop": isoflop_dit(dc, dc_macs_at_smallest_f)}
    for role, cfg in cfgs.items():
        name = {"dit2": "DiT", "isoparam": "isoparam DiT", "isoflop": "isoflop DiT"}[role]
        label = f"{name}/{cfg.patch_size} d{cfg.depth}"
        same = next((r for r, (_, c, _) in bench.baselines.items() if c == cfg), None)
        torch.manual_seed(bench.args.seed)
        model = None if same else build_model(cfg).to(bench.device).eval()
        bench.baselines[role] = (label if same is None else f"{label} (= {bench.baselines[same][0]})", cfg, model or same)


def baseline_model(bench: Bench, role: str) -> nn.Module:
    model = bench.baselines[role][2]
    return bench.baselines[model][2] if isinstance(model, str) else model


# ------------------------------------------------------------------------------------------ 1. forward


def dc_row(bench: Bench, execution: str, f: float, secs: list[float], recs: list) -> dict:
    counts = [int(c) for r in recs for c in r.kept_count.tolist()]
    cfg = dataclasses.replace(bench.dc_cfg, execution=execution)
    comps = record_components(cfg, recs)
    Ms = [int(r.kept_count.max()) for r in recs]
    padded = sum(dcdit_macs(cfg, m).total for m in Ms) / len(Ms) if execution == "padded" else sum(comps.values())
    return dict(model=f"DC-DiT {execution} f={f:g}", role="dcdit", arch="dcdit", execution=execution, fraction=f,
                kept_mean=sum(counts) / len(counts), kept_min=min(counts), kept_max=max(counts),
                M_padded=sum(Ms) / len(Ms) if execution == "padded" else None, gmacs=sum(comps.values()) / 1e9,
                gmacs_padded=padded / 1e9, sec=median(secs), sec_all=secs, components=comps)


def dit_row(bench: Bench, role: str, secs: list[float] | None) -> dict:
    label, cfg, model = bench.baselines[role]
    H = bench.x.shape[-2] // cfg.patch_size
    W = bench.x.shape[-1] // cfg.patch_size
    macs = dit_macs(cfg).total / 1e9
    row = dict(model=label, role=role, arch="dit", patch=cfg.patch_size, depth=cfg.depth, kept_mean=H * W,
               gmacs=macs, gmacs_padded=macs, config=model_config_to_dict(cfg))
    if isinstance(model, str):  # the same model as another baseline: its times
        row["note"] = f"same model as {bench.baselines[model][0]}"
    else:
        row.update(sec=median(secs), sec_all=secs, params=count_parameters(model))
    return row


def bench_forward(bench: Bench) -> list[dict]:
    """Every DC-DiT (execution × fraction) and every distinct DiT baseline, interleaved round by round."""
    a = bench.args
    x, t, y = bench.x, bench.t, bench.y

    def dc_call(model, f):
        def call():
            torch.manual_seed(a.seed)  # the random router draws the same boundaries in every call
            return model(x, t, y, f)[1]
        return call

    f0 = min(a.fractions)
    with torch.inference_mode():  # a probe call: the isoflop DiT matches the measured MACs at the smallest f
        rec = dc_call(next(iter(bench.dc_models.values())), f0)()
    add_baselines(bench, sum(record_components(bench.dc_cfg, [rec]).values()))
    fns = {("dit", role): (lambda m=m: m(x, t, y)) for role, (_, _, m) in bench.baselines.items() if not isinstance(m, str)}
    fns.update({(ex, f): dc_call(m, f) for ex, m in bench.dc_models.items() for f in a.fractions})
    with torch.inference_mode():
        secs, outs = interleaved(fns, a.repeats, a.warmup, bench.sync)
    rows = [dit_row(bench, role, secs.get(("dit", role))) for role in bench.baselines]
    for row in rows:  # a repeated baseline takes the times of the model it equals
        if "note" in row:
            row.update({k: v for k, v in next(r for r in rows if r["model"] in row["note"]).items() if k.startswith("sec")})
    rows += [dc_row(bench, ex, f, secs[(ex, f)], outs[(ex, f)]) for ex in bench.dc_models for f in a.fractions]
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["sec"] / base["sec"]
        r["flop_ratio"] = r["gmacs"] / base["gmacs"]
        r["padded_flop_ratio"] = r["gmacs_padded"] / base["gmacs"]
    return rows


# ------------------------------------------------------------------------------------------ 2. breakdown


def bench_breakdown(bench: Bench) -> list[dict]:
    """Phase times of DC-DiT forwards (hooks) next to the phases' MAC shares, per execution and fraction."""
    out = []
    a = bench.args
    for ex, model in bench.dc_models.items():
        for f in a.fractions:
            timer = PhaseTimer(model, bench.sync)
            try:
                with torch.inference_mode():
                    _, recs = timed(lambda: (torch.manual_seed(a.seed), model(bench.x, bench.t, bench.y, f)[1])[1],
                                    a.repeats, 1, bench.sync)
            finally:
                timer.remove()
            timer.runs = timer.runs[-a.repeats:]
            secs = timer.median_seconds()
            pf = phase_flops(record_components(dataclasses.replace(bench.dc_cfg, execution=ex), recs))
            tot_s, tot_f = sum(secs.values()), sum(pf.values())
            out.append(dict(execution=ex, fraction=f, seconds=secs, macs=pf,
                            time_share={k: v / tot_s for k, v in secs.items()},
                            flop_share={k: v / tot_f for k, v in pf.items()},
                            dynamic_time_share=sum(secs[k] for k in DYNAMIC) / tot_s,
                            dynamic_flop_share=sum(pf[k] for k in DYNAMIC) / tot_f))
    return out


# ------------------------------------------------------------------------------------------ 3. guided forward


def equivalence(bench: Bench, f_c: float, f_u: float) -> dict:
    """Max |Δ| between the executions' guided outputs. An untrained DC-DiT has zero-initialised adaLN
    gates and output layer (its output is 0 whatever the routing), so the check then runs on a copy
    whose parameters get N(0, 0.02) noise (timing never uses it)."""
    perturb = not bench.args.ckpt
    outs = {}
    for ex, model in bench.dc_models.items():
        m = copy.deepcopy(model) if perturb else model
        if perturb:
            g = torch.Generator().manual_seed(bench.args.seed + 1)
            with torch.no_grad():
                for prm in m.parameters():
                    prm.add_(0.02 * torch.randn(prm.shape, generator=g).to(prm.device, prm.dtype))
        with torch.inference_mode():
            torch.manual_seed(bench.args.seed)
            outs[ex] = m.forward_with_cfg(*bench.cfg_batch(), bench.args.cfg_scale, f_c, f_u)
    (a, ra), (b, rb) = list(outs.values())[0], list(outs.values())[-1]
    return dict(perturbed_copy=perturb, max_abs_diff=float((a - b).abs().max()), max_abs_output=float(a.abs().max()),
                same_kept_counts=bool(torch.equal(ra.kept_count, rb.kept_count)))


def bench_guided(bench: Bench) -> list[dict]:
    a = bench.args
    B = bench.B
    x2, t2, y2 = bench.cfg_batch()
    f0, (f_c, f_u) = min(a.fractions), a.lite_cfg
    settings = [("CFG", f0, f0), ("Lite-CFG", f_c, f_u)]
    dit = baseline_model(bench, "dit2")
    fns = {"dit": lambda: dit.forward_with_cfg(x2, t2, y2, a.cfg_scale)}

    def dc_call(model, fc, fu):
        def call():
            torch.manual_seed(a.seed)
            return model.forward_with_cfg(x2, t2, y2, a.cfg_scale, fc, fu)[1]
        return call

    fns.update({(ex, s): dc_call(m, fc, fu) for ex, m in bench.dc_models.items() for s, fc, fu in settings})
    with torch.inference_mode():
        secs, outs = interleaved(fns, a.repeats, a.warmup, bench.sync)
    g = 2 * dit_macs(bench.baselines["dit2"][1]).total / 1e9
    rows = [dict(model=bench.baselines["dit2"][0], setting="CFG", gmacs=g, gmacs_padded=g, sec=median(secs["dit"]),
                 sec_all=secs["dit"])]
    for ex in bench.dc_models:
        cfg = dataclasses.replace(bench.dc_cfg, execution=ex)
        for s, fc, fu in settings:
            recs = outs[(ex, s)]
            kc = [int(c) for r in recs for c in r.kept_count[:B].tolist()]
            ku = [int(c) for r in recs for c in r.kept_count[B:].tolist()]
            mean = 2 * sum(record_components(cfg, recs).values())  # cond + uncond per image
            # the padded reference pads each half to its own maximum (when the fractions differ)
            halves = [(r.kept_count[:B].max(), r.kept_count[B:].max()) if fc != fu else (r.kept_count.max(),) * 2 for r in recs]
            padded = (sum(dcdit_macs(cfg, int(c)).total + dcdit_macs(cfg, int(u)).total for c, u in halves) / len(halves)
                      if ex == "padded" else mean)
            rows.append(dict(model=f"DC-DiT {ex} {s} {fc:g}/{fu:g}", setting=s, execution=ex, fraction_cond=fc,
                             fraction_uncond=fu, kept_cond=sum(kc) / len(kc), kept_uncond=sum(ku) / len(ku),
                             gmacs=mean / 1e9, gmacs_padded=padded / 1e9, sec=median(secs[(ex, s)]), sec_all=secs[(ex, s)]))
    for r in rows:
        r["time_ratio"] = r["sec"] / rows[0]["sec"]
        r["flop_ratio"] = r["gmacs"] / rows[0]["gmacs"]
    if len(bench.dc_models) > 1:
        rows[-1]["equivalence_check"] = equivalence(bench, f_c, f_u)
    return rows


# ------------------------------------------------------------------------------------------ 4. sampling


def sampling_run(bench: Bench, label: str, model, arch_cfg, role: str, fc: float = 0.0, fu: float | None = None) -> dict:
    a = bench.args
    kw = dict(sampler="ddim", num_sampling_steps=a.sampling_steps, cfg_scale=a.cfg_scale, seed=a.seed, device=bench.device)
    if arch_cfg.arch == "dcdit":
        kw.update(tail_dropping_fraction=fc, uncond_tail_dropping_fraction=fu)
    labels = bench.y.cpu()
    torch.manual_seed(a.seed)
    with torch.inference_mode():  # warm-up: a 1-step run (allocator, diffusion tables, first calls)
        generate(model, labels, **dict(kw, num_sampling_steps=1))
    torch.manual_seed(a.seed)
    with no_gc(), torch.inference_mode():
        bench.sync()
        t0 = time.perf_counter()
        res = generate(model, labels, **kw)
        bench.sync()
        sec = time.perf_counter() - t0
    fl = sampling_flops(arch_cfg, res.trace)
    row = dict(model=label, role=role, steps=a.sampling_steps, sec=sec, sec_per_step=sec / a.sampling_steps,
               gmacs_per_forward=fl["mean_macs_per_forward"] / 1e9, tflops_per_image=fl["tflops_per_image"])
    if arch_cfg.arch == "dcdit":
        row.update(execution=arch_cfg.execution, fraction_cond=fc, fraction_uncond=fc if fu is None else fu,
                   kept_cond=fl["mean_kept"], kept_uncond=fl["mean_uncond_kept"])
    return row


def bench_sampling(bench: Bench) -> list[dict]:
    a = bench.args
    f_c, f_u = a.lite_cfg
    rows = []
    for role, (label, cfg, model) in bench.baselines.items():
        if isinstance(model, str):  # the same model as an earlier baseline: reuse its run
            prev = next(r for r in rows if r["role"] == model)
            rows.append(dict(prev, model=label, role=role, note=f"same model as {prev['model']}"))
            continue
        rows.append(sampling_run(bench, label, model, cfg, role))
    # one run per setting (too long to repeat), the executions alternating so that a change in the
    # machine's load falls on both
    settings = [(f"f={f:g}", "dcdit", f, None) for f in a.fractions] + [(f"Lite {f_c:g}/{f_u:g}", "lite", f_c, f_u)]
    for name, role, fc, fu in settings:
        for ex, model in bench.dc_models.items():
            cfg = dataclasses.replace(bench.dc_cfg, execution=ex)
            rows.append(sampling_run(bench, f"DC-DiT {ex} {name}", model, cfg, role, fc, fu))
    for r in rows:
        r["time_ratio"] = r["sec"] / rows[0]["sec"]
        r["flop_ratio"] = r["gmacs_per_forward"] / rows[0]["gmacs_per_forward"]
    return rows


# ------------------------------------------------------------------------------------------ main


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        args.size = "tiny"
    bench = setup(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(bench.device)
    print("=" * 100)
    print_machine(info)
    dc = bench.dc_cfg
    print(f"DC-DiT: {bench.dc_note}")
    print(f"        D={dc.hidden_size} depth={dc.depth} heads={dc.num_heads} input {dc.input_size} C={dc.in_channels} "
          f"N={dc.target_ratio:g} ({count_parameters(next(iter(bench.dc_models.values()))) / 1e6:.2f}M params); "
          f"batch {bench.B}; executions {', '.join(args.executions)}")
    print("=" * 100)
    results: dict = {"machine": info, "args": vars(args),
                     "dcdit": {"source": bench.dc_note, "config": model_config_to_dict(dc)}}
    sections = [("forward", bench_forward), ("breakdown", bench_breakdown)]
    if bench.guided:
        sections.append(("guided_forward", bench_guided))
        if args.sampling_steps > 0:
            sections.append(("sampling", bench_sampling))
    for name, fn in tqdm(sections, desc="bench", file=sys.stderr, dynamic_ncols=True):
        results[name] = fn(bench)
    print_report(results, bench)
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        print(f"wrote {plot(results, out_dir / 'elastic.png', args)}")
    return results


# ------------------------------------------------------------------------------------------ report


def _fmt_ratio(a, b):
    return f"{a:5.2f}x / {b:5.2f}x"


def print_forward(res, bench) -> None:
    a = bench.args
    print(f"\n[1] forward pass, batch {bench.B}, no guidance; median of {a.repeats} interleaved rounds after {a.warmup} "
          f"warm-up; GMACs per sample (dcdit.flops)")
    print("    kept = mean real inner tokens per sample; M = padded length (padded execution);")
    print("    GMACs = mean of each sample's own count (paper convention, what packed computes); GMACs@M = what ran")
    hdr = f"{'model':<30}{'kept':>8}{'M':>8}{'GMACs':>9}{'GMACs@M':>9}{'s/fwd':>10}   {'time / FLOP vs DiT/2':>21}"
    print(hdr)
    print("-" * len(hdr))
    for r in res["forward"]:
        m = "-" if r.get("M_padded") is None else f"{r['M_padded']:.1f}"
        print(f"{r['model']:<30}{r['kept_mean']:>8.1f}{m:>8}{r['gmacs']:>9.3f}{r['gmacs_padded']:>9.3f}"
              f"{r['sec']:>10.4f}   {_fmt_ratio(r['time_ratio'], r['flop_ratio']):>21}")


def print_breakdown(res) -> None:
    print("\n[2] where a DC-DiT forward spends its time vs its FLOPs (forward hooks; median per phase)")
    for b in res["breakdown"]:
        print(f"    {b['execution']} f={b['fraction']:.2f}: dynamic machinery (router + plan/chunk + de-chunk + residual) = "
              f"{b['dynamic_time_share']:.1%} of time, {b['dynamic_flop_share']:.1%} of FLOPs")
    print(f"    {'phase':<12}" + "".join(f"{b['execution'] + ' ms':>13}{'time':>7}{'FLOPs':>7}" for b in res["breakdown"]
                                      if b["fraction"] == res["breakdown"][0]["fraction"]))
    first = [b for b in res["breakdown"] if b["fraction"] == res["breakdown"][0]["fraction"]]
    for k in PHASES:
        print(f"    {k:<12}" + "".join(f"{b['seconds'][k] * 1e3:>13.2f}{b['time_share'][k]:>7.1%}{b['flop_share'][k]:>7.1%}"
                                    for b in first))


def print_cfg_table(rows, columns) -> None:
    """Rows of a guided table: model, kept cond/uncond, then ``columns`` [(title, key, width, format)], seconds and ratios."""
    hdr = f"{'model':<36}{'kept c/u':>13}" + "".join(f"{t:>{w}}" for t, _, w, _ in columns) + f"   {'time / FLOP vs DiT/2':>21}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        kept = f"{r['kept_cond']:.0f}/{r['kept_uncond']:.0f}" if "kept_cond" in r else "-"
        print(f"{r['model']:<36}{kept:>13}" + "".join(f"{r[k]:>{w}{f}}" for _, k, w, f in columns)
              + f"   {_fmt_ratio(r['time_ratio'], r['flop_ratio']):>21}")


def print_guided(res, bench) -> None:
    B = bench.B
    print(f"\n[3] guided forward (batch {2 * B} = {B} cond + {B} uncond, cfg {bench.args.cfg_scale:g}); GMACs per image per "
          f"guided step (cond + uncond)")
    print_cfg_table(res["guided_forward"], [("GMACs", "gmacs", 8, ".3f"), ("GMACs@M", "gmacs_padded", 9, ".3f"),
                                            ("s/fwd", "sec", 9, ".4f")])
    eq = res["guided_forward"][-1].get("equivalence_check")
    if eq:
        print(f"    Lite-CFG, packed vs padded: max |Δ| = {eq['max_abs_diff']:.1e} (outputs up to {eq['max_abs_output']:.1e}"
              f"{', on a copy with perturbed weights' if eq['perturbed_copy'] else ''}), same kept counts: "
              f"{eq['same_kept_counts']}")


def print_sampling(res, bench) -> None:
    a = bench.args
    print(f"\n[4] sampling: DDIM {a.sampling_steps} steps, cfg {a.cfg_scale:g}, {bench.B} images (batch {2 * bench.B} per "
          f"step); GMACs per image per forward (mean of cond and uncond); TFLOPs per image for this run")
    print_cfg_table(res["sampling"], [("GMACs", "gmacs_per_forward", 8, ".3f"), ("TFLOP/img", "tflops_per_image", 10, ".4f"),
                                      ("s/run", "sec", 9, ".2f")])


def print_report(res, bench) -> None:
    print_forward(res, bench)
    print_breakdown(res)
    if "guided_forward" in res:
        print_guided(res, bench)
    else:
        print("\n[3]/[4] skipped: guidance needs cfg_scale != 1 and a model trained with label dropout "
              "(class_dropout_prob > 0)")
    if res.get("sampling"):
        print_sampling(res, bench)


def plot(res, path: Path, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"packed": dict(color="tab:blue", marker="o"), "padded": dict(color="tab:orange", marker="s")}
    for ex in args.executions:
        dc = [r for r in res["forward"] if r.get("execution") == ex]
        fs = [r["fraction"] for r in dc]
        ax1.plot(fs, [r["sec"] for r in dc], "-", label=f"DC-DiT {ex}", **styles[ex])
        ax2.plot(fs, [r["gmacs_padded"] for r in dc], "--", alpha=0.7, label=f"DC-DiT {ex} (what ran)", **styles[ex])
    dc = [r for r in res["forward"] if r.get("execution") == args.executions[0]]
    ax2.plot([r["fraction"] for r in dc], [r["gmacs"] for r in dc], "k-", lw=1, label="DC-DiT, mean kept (paper convention)")
    colors = {"dit2": "tab:gray", "isoparam": "tab:green", "isoflop": "tab:red"}
    for r in res["forward"]:
        if r["arch"] != "dit" or "note" in r:
            continue
        style = dict(color=colors.get(r["role"], "k"), ls=":", lw=1.5)
        ax1.axhline(r["sec"], label=r["model"], **style)
        ax2.axhline(r["gmacs"], label=r["model"], **style)
    ax1.set_xlabel("tail-drop fraction f")
    ax1.set_ylabel(f"seconds per forward (batch {args.batch_size})")
    ax1.set_title("measured time")
    ax2.set_xlabel("tail-drop fraction f")
    ax2.set_ylabel("GMACs per sample per forward")
    ax2.set_title("FLOPs (dcdit.flops)")
    for ax in (ax1, ax2):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    m = res["machine"]
    fig.suptitle(f"DC-DiT elastic inference — {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
