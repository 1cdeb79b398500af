#!/usr/bin/env python
"""Speed benchmark: DC-DiT's elastic inference against its DiT baselines, measured in one run.

What it measures, all at the SAME batch size on the same inputs, in eval mode under
``torch.inference_mode``:

1. **Forward pass** (batch B, no guidance): the DiT/2 baseline, the isoparam and isoflop DiTs
   (patch sqrt(N)), and DC-DiT at every tail-drop fraction f. Median seconds of ``--repeats``
   calls after ``--warmup`` calls; tokens kept (mean real inner tokens per sample, and the padded M
   that actually ran); GMACs per sample (``dcdit.flops``: the mean over the samples of their own
   count, the paper's convention, and the count at the padded M the batch really computed); time
   and FLOP ratios to DiT/2.
2. **Dynamic-machinery breakdown** of a DC-DiT forward: forward hooks time the phases
   encode | router | plan+chunk | inner blocks | de-chunk | residual (+STE) | decode, and their
   time share is put next to their FLOP share.
3. **Guided forward** (batch 2B = [cond; uncond], as classifier-free guidance runs it): DiT/2,
   DC-DiT with the same f for both halves, and Lite-CFG (cond f_c, uncond f_u) run (a) as ONE
   padded batch, which is what ``DCDiT.forward_with_cfg`` does, and (b) as TWO forward calls, one
   per half (a prototype of the fix, implemented here without touching ``src/``).
4. **Full sampling runs** (DDIM, ``--sampling-steps`` steps, CFG) for every model / setting, with
   the per-step routing trace turned into FLOPs by ``dcdit.flops.sampling_flops``.

Writes ``results.json`` (every number, raw times included) and ``elastic.png`` (seconds per
forward and GMACs vs tail-drop fraction, DiT baselines as horizontal lines) into ``--out``.

Run ``python benchmarks/bench_elastic.py --help``; ``--tiny`` is a < 1 minute smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import dcdit
from dcdit.config import DCDiTConfig, DiTConfig, build_model, count_parameters, get_preset, model_config_to_dict
from dcdit.flops import dcdit_macs, dit_depth_for_flops, dit_macs, sampling_flops
from dcdit.models.guidance import guide
from dcdit.sampling import generate

DEMO_CKPT = Path(dcdit.__file__).parent / "assets" / "mnist_dcdit.safetensors"

#: DC-DiT forward phases, in execution order, and the dcdit.flops components each one contains.
PHASES = {
    "encode": ("x_embedder", "t_embedder", "y_embedder", "encoder"),
    "router": ("router",),
    "plan+chunk": ("chunk",),
    "blocks": ("blocks",),
    "dechunk": ("dechunk",),
    "residual": ("residual_proj",),
    "decode": ("decoder", "final_layer"),
}
DYNAMIC = ("router", "plan+chunk", "dechunk", "residual")


# ------------------------------------------------------------------------------------------ utils


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "dcdit": getattr(dcdit, "__version__", "?"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    return info


def make_sync(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def no_gc():
    """Collect garbage, then keep Python's cyclic GC off while timing (as ``timeit`` does): a gen-2
    collection landing inside one timed call otherwise adds ~0.1 s to it."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def timed(fn, repeats: int, warmup: int, sync) -> tuple[list[float], list]:
    """Run ``fn`` ``warmup`` times, then ``repeats`` timed times; return (seconds, outputs of the timed calls)."""
    for _ in range(warmup):
        fn()
    secs, outs = [], []
    with no_gc():
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            secs.append(time.perf_counter() - t0)
            outs.append(out)
    return secs, outs


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def dit_config_like(dc: DCDiTConfig, patch: int, depth: int) -> DiTConfig:
    """A DiT with the DC-DiT's width, heads, input, classes and output (only patch and depth differ)."""
    return DiTConfig(
        input_size=dc.input_size, patch_size=patch, in_channels=dc.in_channels, hidden_size=dc.hidden_size,
        depth=depth, num_heads=dc.num_heads, mlp_ratio=dc.mlp_ratio, class_dropout_prob=dc.class_dropout_prob,
        num_classes=dc.num_classes, learn_sigma=dc.learn_sigma, timestep_freq_shift=dc.timestep_freq_shift,
    )


def isoparam_depth(dit_cfg: DiTConfig, target_params: int) -> int:
    """Depth whose DiT parameter count is closest to ``target_params`` (ties: the smaller depth)."""
    p0 = count_parameters(build_model(dataclasses.replace(dit_cfg, depth=0)))
    p1 = count_parameters(build_model(dataclasses.replace(dit_cfg, depth=1)))
    per_block = p1 - p0
    guess = max(1, round((target_params - p0) / per_block))
    cands = [d for d in (guess - 1, guess, guess + 1) if d >= 1]
    return min(cands, key=lambda d: (abs(p0 + d * per_block - target_params), d))


def mean_breakdown(cfg: DCDiTConfig, counts: list[int]) -> dict[str, float]:
    """Per-sample MACs per dcdit.flops component, averaged over samples with the given kept counts."""
    cache: dict[int, dict] = {}
    out: dict[str, float] = {}
    for m in counts:
        if m not in cache:
            cache[m] = dcdit_macs(cfg, m).components
        for k, v in cache[m].items():
            out[k] = out.get(k, 0.0) + v / len(counts)
    return out


def phase_flops(components: dict[str, float]) -> dict[str, float]:
    out = {name: 0.0 for name in PHASES}
    for comp, macs in components.items():
        top = comp.split(".")[0]
        for name, members in PHASES.items():
            if top in members:
                out[name] += macs
                break
        else:
            raise KeyError(f"dcdit.flops component {comp!r} has no benchmark phase")
    return out


def padded_cfg_forward(model, x, t, y, cfg_scale, f_c, f_u, guidance_channels=None):
    """Lite-CFG as ONE padded batch: both halves padded to the longer one (``budget_groups=1``), the
    path ``DCDiT.forward_with_cfg`` took before it ran each half at its own length."""
    n = len(x) // 2
    half = x[:n]
    fractions = torch.tensor([f_c] * n + [f_u] * n, dtype=torch.float64, device=x.device)
    out, rec = model(torch.cat([half, half]), t, y, fractions, budget_groups=1)
    return guide(out, cfg_scale, model.in_channels, guidance_channels), rec


def split_equivalence(model, x2, t2, y2, cfg_scale, f_c, f_u, seed, perturb: bool) -> dict:
    """Max |difference| between Lite-CFG as one padded batch and per half (the model's path), on the same inputs.

    An untrained DC-DiT has zero-initialised adaLN gates and output layer, so its output is 0 whatever
    the routing; with ``perturb`` the check runs on a copy whose parameters get N(0, 0.02) noise added
    (timing is unaffected: it never uses this copy)."""
    import copy

    m = model
    if perturb:
        m = copy.deepcopy(model)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for prm in m.parameters():
                prm.add_(0.02 * torch.randn(prm.shape, generator=g).to(prm.device, prm.dtype))
    with torch.inference_mode():
        torch.manual_seed(seed)
        a, ra = m.forward_with_cfg(x2, t2, y2, cfg_scale, f_c, f_u)
        torch.manual_seed(seed)
        b, rb = padded_cfg_forward(m, x2, t2, y2, cfg_scale, f_c, f_u)
    return dict(perturbed_copy=perturb, max_abs_diff=float((a - b).abs().max()), max_abs_output=float(a.abs().max()),
                same_kept_counts=bool(torch.equal(ra.kept_count, rb.kept_count)))


class PaddedCFG(nn.Module):
    """Wraps a DCDiT so ``generate`` runs Lite-CFG as one padded batch (the old path, for comparison).

    ``dcdit.sampling`` unwraps ``.module`` for attributes and type checks and calls the wrapper's
    ``forward_with_cfg``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def forward_with_cfg(self, x, t, y, cfg_scale, tail_dropping_fraction=0.0, uncond_tail_dropping_fraction=None,
                         guidance_channels=None):
        f_u = tail_dropping_fraction if uncond_tail_dropping_fraction is None else uncond_tail_dropping_fraction
        return padded_cfg_forward(self.module, x, t, y, cfg_scale, tail_dropping_fraction, f_u, guidance_channels)


class PhaseTimer:
    """Forward (pre-)hooks that timestamp the phase boundaries of a DCDiT forward (``model(...)`` calls only)."""

    def __init__(self, model, sync):
        self.sync = sync
        self.marks: list[tuple[str, float]] = []
        self.runs: list[dict[str, float]] = []
        self.handles = []

        def mark(name):
            def hook(*_args, **_kwargs):
                self.sync()
                self.marks.append((name, time.perf_counter()))
            return hook

        def end(*_args, **_kwargs):
            self.sync()
            self.marks.append(("end", time.perf_counter()))
            names = [n for n, _ in self.marks]
            times = [t for _, t in self.marks]
            self.runs.append({names[i]: times[i + 1] - times[i] for i in range(len(names) - 1)})
            self.marks = []

        pre = [(model, "encode"), (model.router, "router"), (model.dechunk, "dechunk"), (model.decoder, "decode")]
        if len(model.blocks):
            pre.append((model.blocks[0], "blocks"))
        for module, name in pre:
            self.handles.append(module.register_forward_pre_hook(mark(name)))
        self.handles.append(model.router.register_forward_hook(mark("plan+chunk")))
        self.handles.append(model.dechunk.register_forward_hook(mark("residual")))
        self.handles.append(model.register_forward_hook(end))

    def remove(self):
        for h in self.handles:
            h.remove()

    def median_seconds(self) -> dict[str, float]:
        return {name: median([r.get(name, 0.0) for r in self.runs]) for name in PHASES}


# ------------------------------------------------------------------------------------------ main


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
    ap.add_argument("--batch-size", type=int, default=8, help="images per forward (guided: 2x this)")
    ap.add_argument("--repeats", type=int, default=5, help="timed forward calls per row (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forward calls before timing")
    ap.add_argument("--sampling-steps", type=int, default=10, help="DDIM steps per sampling run (0 skips sampling)")
    ap.add_argument("--cfg-scale", type=float, default=1.5, help="guidance scale of the guided forward and sampling")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5], help="DC-DiT tail-drop fractions")
    ap.add_argument("--lite-cfg", type=float, nargs=2, default=[0.0, 0.9], metavar=("F_COND", "F_UNCOND"),
                    help="Lite-CFG tail-drop fractions of the conditional and unconditional halves")
    ap.add_argument("--baseline-patch", type=int, default=None,
                    help="patch of the isoparam/isoflop DiTs (default: round(sqrt(N)))")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results", help="folder for results.json and elastic.png")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


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
        d = dict(arch="dcdit", input_size=16, in_channels=4, hidden_size=64, depth=2, num_heads=2,
                 num_classes=10, encoder_width=16, conv_norm_groups=8)
    else:
        base = get_preset(f"DiT-{args.size}/2")
        d = dict(arch="dcdit", input_size=args.input_size, in_channels=args.in_channels, hidden_size=base.hidden_size,
                 depth=base.depth, num_heads=base.num_heads, num_classes=args.num_classes)
        if (base.hidden_size // 4) % 32:
            d["conv_norm_groups"] = math.gcd(base.hidden_size // 4, 32)
    d.update(router="random", target_ratio=args.ratio)
    model = build_model(d).to(device).eval()
    cfg = DCDiTConfig(**{k: v for k, v in d.items() if k != "arch"})
    note = (f"config (untrained weights), router='random': boundaries drawn uniformly at rate 1/N = 1/{args.ratio:g} "
            f"(an untrained cosine router keeps almost nothing); chunk / slot planning / de-chunk / residual are "
            f"exactly the trained model's machinery")
    return model, cfg, note


def main(argv=None):
    args = parse_args(argv)
    if args.tiny:
        args.size = "tiny"
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = make_sync(device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.sampling_steps < 0:
        raise SystemExit("--repeats and --batch-size must be >= 1, --warmup and --sampling-steps >= 0")
    for f in [*args.fractions, *args.lite_cfg]:
        if not 0.0 <= f < 1.0:
            raise SystemExit(f"tail-drop fractions must lie in [0, 1), got {f}")

    info = machine_info(device)
    print("=" * 100)
    print(f"machine: {info['cpu']} | {info['logical_cores']} logical cores ({info['usable_cores']} usable) | "
          f"torch {info['torch']} | {info['torch_threads']} threads (interop {info['torch_interop_threads']}) | "
          f"device {device}")
    if info["load_average_at_start"]:
        la = info["load_average_at_start"]
        busy = " (!) other processes are using the CPU: times are inflated" if la[0] > 0.5 else ""
        print(f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}{busy}")
    print(f"date {info['date']}, python {info['python']}, dcdit {info['dcdit']}")

    torch.manual_seed(args.seed)
    dc_model, dc_cfg, dc_note = load_dcdit(args, device)
    N = float(dc_cfg.target_ratio)
    H, W = (dc_cfg.input_size, dc_cfg.input_size) if isinstance(dc_cfg.input_size, int) else tuple(dc_cfg.input_size)
    L = H * W
    dc_params = count_parameters(dc_model)
    patch = args.baseline_patch or max(1, round(math.sqrt(N)))
    if H % patch or W % patch:
        raise SystemExit(f"baseline patch {patch} does not divide the grid {H}x{W}; pass --baseline-patch")
    B = args.batch_size
    guided = float(dc_cfg.class_dropout_prob) > 0 and args.cfg_scale != 1.0
    print(f"DC-DiT: {dc_note}")
    print(f"        D={dc_cfg.hidden_size} depth={dc_cfg.depth} heads={dc_cfg.num_heads} grid {H}x{W} (L={L}) "
          f"C={dc_cfg.in_channels} N={N:g} ({dc_params / 1e6:.2f}M params); batch {B}")
    print("=" * 100)

    # Inputs shared by every model: noise latents, timesteps spread evenly over [0, 999], random labels.
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(B, dc_cfg.in_channels, H, W, generator=gen).to(device)
    t = torch.linspace(0, 999, B).round().long().to(device)
    y = torch.randint(0, dc_cfg.num_classes, (B,), generator=gen).to(device)
    null = torch.full_like(y, dc_cfg.num_classes)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])

    dit2_cfg = dit_config_like(dc_cfg, 2, dc_cfg.depth)
    n_fwd = 1 + len(args.fractions) + 2 + (4 if guided else 0)
    n_smp = (3 + len(args.fractions) + 2) if (guided and args.sampling_steps > 0) else 0
    bar = tqdm(total=n_fwd + len(args.fractions) + n_smp, desc="bench", file=sys.stderr, dynamic_ncols=True)

    def step(desc):
        bar.set_postfix_str(desc)

    results: dict = {"machine": info, "args": vars(args), "dcdit": {"source": dc_note, "config": model_config_to_dict(dc_cfg),
                                                                   "params": dc_params}}

    # ------------------------------------------------------------------ 1. forward passes, batch B
    fwd_rows: list[dict] = []

    def bench_dit(label, cfg, role):
        step(f"forward {label}")
        torch.manual_seed(args.seed)
        model = build_model(cfg).to(device).eval()
        with torch.inference_mode():
            secs, _ = timed(lambda: model(x, t, y), args.repeats, args.warmup, sync)
        macs = dit_macs(cfg).total
        tokens = (H // cfg.patch_size) * (W // cfg.patch_size)
        row = dict(model=label, role=role, arch="dit", patch=cfg.patch_size, depth=cfg.depth,
                   params=count_parameters(model), fraction=None, kept_mean=tokens, M_padded=tokens, M_padded_max=tokens,
                   gmacs=macs / 1e9, gmacs_padded=macs / 1e9, sec=median(secs), sec_all=secs, config=model_config_to_dict(cfg))
        bar.update()
        return row, model

    def bench_dc(f):
        step(f"forward DC-DiT f={f:g}")
        torch.manual_seed(args.seed)
        with torch.inference_mode():
            secs, recs = timed(lambda: dc_model(x, t, y, f)[1], args.repeats, args.warmup, sync)
        counts = [int(c) for r in recs for c in r.kept_count.tolist()]
        Ms = [int(r.kept_idx.shape[1]) for r in recs]
        comps = mean_breakdown(dc_cfg, counts)
        padded = sum(dcdit_macs(dc_cfg, m).total for m in Ms) / len(Ms)
        row = dict(model=f"DC-DiT f={f:g}", role="dcdit", arch="dcdit", patch=1, depth=dc_cfg.depth, params=dc_params,
                   fraction=f, kept_mean=sum(counts) / len(counts), kept_min=min(counts), kept_max=max(counts),
                   M_padded=sum(Ms) / len(Ms), M_padded_max=max(Ms), gmacs=sum(comps.values()) / 1e9,
                   gmacs_padded=padded / 1e9, sec=median(secs), sec_all=secs, components=comps)
        bar.update()
        return row

    dit2_row, dit2_model = bench_dit(f"DiT/2 d{dit2_cfg.depth}", dit2_cfg, "dit2")
    fwd_rows.append(dit2_row)
    dc_rows = [bench_dc(f) for f in args.fractions]
    # Baselines sized against the DC-DiT: isoparam by parameters, isoflop by the measured mean MACs at the
    # smallest fraction (f = 0 by default).
    ref = min(dc_rows, key=lambda r: r["fraction"])
    iso_p_cfg = dit_config_like(dc_cfg, patch, isoparam_depth(dit_config_like(dc_cfg, patch, 1), dc_params))
    iso_f_cfg = dit_config_like(dc_cfg, patch, dit_depth_for_flops(dit_config_like(dc_cfg, patch, 1), ref["gmacs"] * 1e9))
    baselines = {"dit2": (dit2_row, dit2_model)}
    for role, name, cfg in (("isoparam", "isoparam", iso_p_cfg), ("isoflop", "isoflop", iso_f_cfg)):
        label = f"{name} DiT/{cfg.patch_size} d{cfg.depth}"
        same = next((v for v in baselines.values() if v[0]["config"] == model_config_to_dict(cfg)), None)
        if same is not None:  # identical to a baseline already timed: reuse it
            row = dict(same[0], model=label, role=role, note=f"same model as {same[0]['model']}")
            baselines[role] = (row, same[1])
            bar.update()
        else:
            baselines[role] = bench_dit(label, cfg, role)
        fwd_rows.append(baselines[role][0])
    fwd_rows.extend(dc_rows)
    for r in fwd_rows:
        r["time_ratio"] = r["sec"] / dit2_row["sec"]
        r["flop_ratio"] = r["gmacs"] / dit2_row["gmacs"]
        r["padded_flop_ratio"] = r["gmacs_padded"] / dit2_row["gmacs"]
    results["forward"] = fwd_rows

    # ------------------------------------------------------------------ 2. dynamic-machinery breakdown
    breakdowns = []
    for f in args.fractions:
        step(f"breakdown f={f:g}")
        timer = PhaseTimer(dc_model, sync)
        torch.manual_seed(args.seed)
        try:
            with torch.inference_mode():
                _, recs = timed(lambda: dc_model(x, t, y, f)[1], args.repeats, 0, sync)
        finally:
            timer.remove()
        timer.runs = timer.runs[-args.repeats:]
        secs = timer.median_seconds()
        counts = [int(c) for r in recs for c in r.kept_count.tolist()]
        pf = phase_flops(mean_breakdown(dc_cfg, counts))
        tot_s, tot_f = sum(secs.values()), sum(pf.values())
        breakdowns.append(dict(
            fraction=f, seconds=secs, macs=pf,
            time_share={k: v / tot_s for k, v in secs.items()}, flop_share={k: v / tot_f for k, v in pf.items()},
            dynamic_time_share=sum(secs[k] for k in DYNAMIC) / tot_s,
            dynamic_flop_share=sum(pf[k] for k in DYNAMIC) / tot_f,
        ))
        bar.update()
    results["breakdown"] = breakdowns

    # ------------------------------------------------------------------ 3. guided forward, batch 2B
    cfg_rows: list[dict] = []
    f_c, f_u = args.lite_cfg
    if guided:
        s = args.cfg_scale
        step("guided forward DiT/2")
        with torch.inference_mode():
            secs, _ = timed(lambda: dit2_model.forward_with_cfg(x2, t2, y2, s), args.repeats, args.warmup, sync)
        dit2_g = 2 * dit_macs(dit2_cfg).total
        cfg_rows.append(dict(model=dit2_row["model"], setting="CFG", kept_cond=dit2_row["kept_mean"],
                             kept_uncond=dit2_row["kept_mean"], M_padded_cond=dit2_row["M_padded"],
                             M_padded_uncond=dit2_row["M_padded"], gmacs=dit2_g / 1e9,
                             gmacs_padded=dit2_g / 1e9, sec=median(secs), sec_all=secs))
        bar.update()

        def guided_dc(label, fc, fu, split):
            step(f"guided forward {label}")
            torch.manual_seed(args.seed)
            if split:  # the model's path: each half padded to its own length (budget_groups=2)
                fn = lambda: dc_model.forward_with_cfg(x2, t2, y2, s, fc, fu)  # noqa: E731
            else:  # one padded batch
                fn = lambda: padded_cfg_forward(dc_model, x2, t2, y2, s, fc, fu)  # noqa: E731
            with torch.inference_mode():
                secs, outs = timed(fn, args.repeats, args.warmup, sync)
            recs = [o[1] for o in outs]
            kc = [int(c) for r in recs for c in r.kept_count[:B].tolist()]
            ku = [int(c) for r in recs for c in r.kept_count[B:].tolist()]
            if split:
                Ms = [(int(r.kept_count[:B].max()), int(r.kept_count[B:].max())) for r in recs]
            else:
                Ms = [(int(r.kept_idx.shape[1]),) * 2 for r in recs]
            mean = sum(dcdit_macs(dc_cfg, m).total for m in kc + ku) / (B * args.repeats)  # cond + uncond per image
            padded = sum(dcdit_macs(dc_cfg, a).total + dcdit_macs(dc_cfg, b).total for a, b in Ms) / len(Ms)
            row = dict(model=f"DC-DiT {label}", setting="Lite-CFG" if fc != fu else "CFG", fraction_cond=fc,
                       fraction_uncond=fu, calls=2 if split else 1, kept_cond=sum(kc) / len(kc),
                       kept_uncond=sum(ku) / len(ku), M_padded_cond=sum(m[0] for m in Ms) / len(Ms),
                       M_padded_uncond=sum(m[1] for m in Ms) / len(Ms), gmacs=mean / 1e9, gmacs_padded=padded / 1e9,
                       sec=median(secs), sec_all=secs)
            bar.update()
            return row, outs[-1][0]

        row, _ = guided_dc(f"f={ref['fraction']:g}/{ref['fraction']:g}", ref["fraction"], ref["fraction"], False)
        cfg_rows.append(row)
        row_joint, out_joint = guided_dc(f"Lite {f_c:g}/{f_u:g} one batch", f_c, f_u, False)
        row_split, out_split = guided_dc(f"Lite {f_c:g}/{f_u:g} per half", f_c, f_u, True)
        row_split["max_abs_diff_vs_one_batch"] = float((out_joint - out_split).abs().max())
        row_split["equivalence_check"] = split_equivalence(dc_model, x2, t2, y2, s, f_c, f_u, args.seed,
                                                           perturb=not args.ckpt)
        cfg_rows += [row_joint, row_split]
        for r in cfg_rows:
            r["time_ratio"] = r["sec"] / cfg_rows[0]["sec"]
            r["flop_ratio"] = r["gmacs"] / cfg_rows[0]["gmacs"]
            r["padded_flop_ratio"] = r["gmacs_padded"] / cfg_rows[0]["gmacs"]
    results["guided_forward"] = cfg_rows

    # ------------------------------------------------------------------ 4. sampling runs
    smp_rows: list[dict] = []
    if n_smp:
        labels = y.cpu()

        def run_sampling(label, model, arch_cfg, fc=0.0, fu=None, calls=1, role=None):
            step(f"sampling {label}")
            torch.manual_seed(args.seed)
            kw = dict(sampler="ddim", num_sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale,
                      seed=args.seed, device=device)
            if arch_cfg.arch == "dcdit":
                kw.update(tail_dropping_fraction=fc, uncond_tail_dropping_fraction=fu)
            with torch.inference_mode():  # warm-up: a 1-step run (allocator, diffusion tables, first calls)
                generate(model, labels, **dict(kw, num_sampling_steps=1))
            torch.manual_seed(args.seed)
            with no_gc(), torch.inference_mode():
                sync()
                t0 = time.perf_counter()
                res = generate(model, labels, **kw)
                sync()
                sec = time.perf_counter() - t0
            fl = sampling_flops(arch_cfg, res.trace)
            row = dict(model=label, role=role, steps=args.sampling_steps, sec=sec, sec_per_step=sec / args.sampling_steps,
                       gmacs_per_forward=fl["mean_macs_per_forward"] / 1e9, tflops_per_image=fl["tflops_per_image"])
            if arch_cfg.arch == "dcdit":
                joint = calls == 1
                pad = []
                for e in res.trace:
                    kc, ku = e["kept"].tolist(), e["uncond_kept"].tolist()
                    ms = (max(kc + ku),) * 2 if joint else (max(kc), max(ku))
                    pad.append(ms)
                row.update(fraction_cond=fc, fraction_uncond=fc if fu is None else fu, calls=calls,
                           kept_cond=fl["mean_kept"], kept_uncond=fl["mean_uncond_kept"],
                           M_padded_cond=sum(p[0] for p in pad) / len(pad), M_padded_uncond=sum(p[1] for p in pad) / len(pad),
                           gmacs_padded_per_forward=sum(dcdit_macs(arch_cfg, a).total + dcdit_macs(arch_cfg, b).total
                                                        for a, b in pad) / len(pad) / 2 / 1e9)
            else:
                n = (H // arch_cfg.patch_size) * (W // arch_cfg.patch_size)
                row.update(kept_cond=n, kept_uncond=n, M_padded_cond=n, M_padded_uncond=n,
                           gmacs_padded_per_forward=row["gmacs_per_forward"])
            bar.update()
            return row

        for role in ("dit2", "isoparam", "isoflop"):
            brow, bmodel = baselines[role]
            cfg = dataclasses.replace(dit2_cfg, **{k: v for k, v in brow["config"].items() if k != "arch"})
            if "note" in brow:  # the same model as an earlier baseline: reuse its run
                prev = next(r for r in smp_rows if r["model"] == brow["note"].removeprefix("same model as "))
                smp_rows.append(dict(prev, model=brow["model"], role=role, note=brow["note"]))
                bar.update()
                continue
            smp_rows.append(run_sampling(brow["model"], bmodel, cfg, role=role))
        for f in args.fractions:
            smp_rows.append(run_sampling(f"DC-DiT f={f:g}", dc_model, dc_cfg, f, None, role="dcdit"))
        smp_rows.append(run_sampling(f"DC-DiT Lite {f_c:g}/{f_u:g} one batch", PaddedCFG(dc_model), dc_cfg, f_c, f_u,
                                     role="lite"))
        smp_rows.append(run_sampling(f"DC-DiT Lite {f_c:g}/{f_u:g} per half", dc_model, dc_cfg, f_c, f_u,
                                     calls=2, role="lite-split"))
        for r in smp_rows:
            r["time_ratio"] = r["sec"] / smp_rows[0]["sec"]
            r["flop_ratio"] = r["gmacs_per_forward"] / smp_rows[0]["gmacs_per_forward"]
    results["sampling"] = smp_rows
    bar.close()

    # ------------------------------------------------------------------ report
    print_report(results, args, B, dc_cfg, guided)
    results["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    json_path = out_dir / "results.json"
    with open(json_path, "w") as fh:
        json.dump(results, fh, indent=2, default=str)
        fh.write("\n")
    print(f"\nwrote {json_path}")
    if not args.no_plot:
        png = plot(results, out_dir / "elastic.png", args)
        print(f"wrote {png}")
    return results


def _fmt_ratio(a, b):
    return f"{a:5.2f}x / {b:5.2f}x"


def print_report(res, args, B, dc_cfg, guided):
    print(f"\n[1] forward pass, batch {B}, no guidance; median of {args.repeats} after {args.warmup} warm-up; "
          f"GMACs per sample (dcdit.flops)")
    print("    kept = mean real inner tokens per sample; M = padded length that ran (mean over calls, max);")
    print("    GMACs = mean of each sample's own count (paper convention); GMACs@M = what the padded batch computed")
    hdr = f"{'model':<24}{'f':>6}{'kept':>8}{'M (max)':>12}{'GMACs':>9}{'GMACs@M':>9}{'s/fwd':>10}   {'time / FLOP vs DiT/2':>21}{'FLOP@M':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in res["forward"]:
        f = "-" if r["fraction"] is None else f"{r['fraction']:.2f}"
        m = f"{r['M_padded']:.1f} ({r['M_padded_max']})"
        print(f"{r['model']:<24}{f:>6}{r['kept_mean']:>8.1f}{m:>12}{r['gmacs']:>9.3f}{r['gmacs_padded']:>9.3f}"
              f"{r['sec']:>10.4f}   {_fmt_ratio(r['time_ratio'], r['flop_ratio']):>21}{r['padded_flop_ratio']:>7.2f}x")

    print("\n[2] where a DC-DiT forward spends its time vs its FLOPs (forward hooks; median per phase)")
    for b in res["breakdown"]:
        print(f"    f={b['fraction']:.2f}: dynamic machinery (router + plan/chunk + de-chunk + residual) = "
              f"{b['dynamic_time_share']:.1%} of time, {b['dynamic_flop_share']:.1%} of FLOPs")
    b0 = res["breakdown"][0]
    print(f"    per phase at f={b0['fraction']:.2f}:")
    print(f"    {'phase':<12}{'ms':>9}{'time':>8}{'FLOPs':>8}")
    for k in PHASES:
        print(f"    {k:<12}{b0['seconds'][k] * 1e3:>9.2f}{b0['time_share'][k]:>8.1%}{b0['flop_share'][k]:>8.1%}")

    if not guided:
        print("\n[3]/[4] skipped: guidance needs cfg_scale != 1 and a model trained with label dropout "
              "(class_dropout_prob > 0)")
    if guided:
        print(f"\n[3] guided forward (batch {2 * B} = {B} cond + {B} uncond, cfg {args.cfg_scale:g}); GMACs per image per "
              f"guided step (cond + uncond)")
        hdr = (f"{'model':<36}{'kept c/u':>13}{'M c/u':>13}{'GMACs':>8}{'GMACs@M':>9}{'s/fwd':>9}   "
               f"{'time / FLOP vs DiT/2':>21}{'FLOP@M':>8}")
        print(hdr)
        print("-" * len(hdr))
        for r in res["guided_forward"]:
            kept = f"{r['kept_cond']:.0f}/{r['kept_uncond']:.0f}"
            M = f"{r['M_padded_cond']:.0f}/{r['M_padded_uncond']:.0f}"
            print(f"{r['model']:<36}{kept:>13}{M:>13}{r['gmacs']:>8.3f}{r['gmacs_padded']:>9.3f}{r['sec']:>9.4f}   "
                  f"{_fmt_ratio(r['time_ratio'], r['flop_ratio']):>21}{r['padded_flop_ratio']:>7.2f}x")
        split = res["guided_forward"][-1]
        joint = res["guided_forward"][-2]
        eq = split["equivalence_check"]
        print(f"    Lite-CFG per half vs one padded batch: {split['sec'] / joint['sec']:.2f}x the time; same output: "
              f"max |Δ| = {eq['max_abs_diff']:.1e} (outputs up to {eq['max_abs_output']:.1e}"
              f"{', on a copy with perturbed weights' if eq['perturbed_copy'] else ''}), "
              f"same kept counts: {eq['same_kept_counts']}")

    if res["sampling"]:
        print(f"\n[4] sampling: DDIM {args.sampling_steps} steps, cfg {args.cfg_scale:g}, {B} images (batch {2 * B} per "
              f"step); GMACs per image per forward (mean of cond and uncond); TFLOPs per image for this run")
        hdr = (f"{'model':<36}{'kept c/u':>13}{'M c/u':>13}{'GMACs':>8}{'@M':>8}{'TFLOP/img':>10}{'s/run':>9}"
               f"   {'time / FLOP vs DiT/2':>21}")
        print(hdr)
        print("-" * len(hdr))
        for r in res["sampling"]:
            kept = f"{r['kept_cond']:.0f}/{r['kept_uncond']:.0f}"
            M = f"{r['M_padded_cond']:.0f}/{r['M_padded_uncond']:.0f}"
            print(f"{r['model']:<36}{kept:>13}{M:>13}{r['gmacs_per_forward']:>8.3f}{r['gmacs_padded_per_forward']:>8.3f}"
                  f"{r['tflops_per_image']:>10.4f}{r['sec']:>9.2f}   {_fmt_ratio(r['time_ratio'], r['flop_ratio']):>21}")


def plot(res, path: Path, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dc = [r for r in res["forward"] if r["arch"] == "dcdit"]
    base = [r for r in res["forward"] if r["arch"] == "dit"]
    fs = [r["fraction"] for r in dc]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"dit2": "tab:gray", "isoparam": "tab:green", "isoflop": "tab:red"}
    ax1.plot(fs, [r["sec"] for r in dc], "o-", color="tab:blue", label="DC-DiT (measured)")
    ax2.plot(fs, [r["gmacs"] for r in dc], "o-", color="tab:blue", label="DC-DiT, mean kept (paper convention)")
    ax2.plot(fs, [r["gmacs_padded"] for r in dc], "s--", color="tab:blue", alpha=0.6, label="DC-DiT at padded M (what ran)")
    for r in base:
        if "note" in r:
            continue
        same = [o["model"] for o in base if o.get("note") == f"same model as {r['model']}"]
        label = r["model"] + "".join(f" = {m}" for m in same)
        style = dict(color=colors.get(r["role"], "k"), ls=":", lw=1.5)
        ax1.axhline(r["sec"], label=label, **style)
        ax2.axhline(r["gmacs"], label=label, **style)
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
