"""The MNIST-scale reproduction of DC-DiT's claims (docs/results.md), one resumable script.

Every run uses `dcdit train` on the embedded default (configs/mnist.yaml) at the same batch (32) and
number of steps; every evaluation samples the same labels with the same seed and sampler and scores
them with the packaged MNIST classifier (MNIST-FID against the 500 held-out digits, class accuracy,
IS-style score). What is already done is skipped, an interrupted run resumes from its checkpoint.

    python scripts/reproduce_mnist.py --out runs/repro                  # everything
    python scripts/reproduce_mnist.py --out runs/repro --only train     # or eval / router / report
    python scripts/reproduce_mnist.py --out runs/repro --seeds 0 1      # a second seed of the main pair

Runs (paper arXiv 2603.06351 §4):
  dcdit        DC-DiT, N=4, learned (cosine) router                     claims (a)–(c)
  isoparam     DiT/2, same width/heads/depth (params closest)          claim (a)
  isoflop      DiT/2 with the depth whose MACs reach the DC-DiT's      claim (a)
  (dcdit, isoparam and isoflop run for every seed; the rest for seed 0)
  random       DC-DiT with the random router                           claim (d)
  multibudget  DC-DiT, tail-drop fractions {0,.25,.5,.75} from mid-run  claim (e)
  upcycle / upcycle_distill: DC-DiT upcycled from `isoparam_s0` (§4.4) for a quarter of the steps,
               without / with 100 steps of activation distillation, against `dcdit_s0` at that step
  dydit_demo   the shipped demo checkpoint fine-tuned 400 steps with DyDiT gates to λ = 0.7 (§4.5)
  demo_finetune  the same 400 fine-tuning steps without DyDiT (the quality control for dydit_demo)

Writes ``<out>/results.json``, ``<out>/results.md`` (the tables of docs/results.md) and
``<out>/figures/*.png``. On 2 CPU cores a 1,000-step DC-DiT run takes 35–70 min (1 thread each, two
runs side by side).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from dcdit.checkpoint import load_model, read_weights
from dcdit.evaluation.mnist_classifier import mnist_metrics, uint8_to_mnist
from dcdit.flops import sampling_flops
from dcdit.sampling import generate, write_npz, to_uint8_images
from dcdit.viz import save_image_grid

DEMO = resources.files("dcdit") / "assets" / "mnist_dcdit.safetensors"
MULTI_BUDGET = [0.0, 0.25, 0.5, 0.75]
EVAL_TAILS = [0.0, 0.25, 0.5, 0.75]  # tail-drop fractions evaluated (each DC-DiT evaluation costs minutes on a CPU)
DCDIT = [sys.executable, "-m", "dcdit"]  # this interpreter's dcdit, PATH or not
COMMON = ["train.ckpt_every=250", "train.keep_last=10", "train.log_every=50"]
# The from-scratch runs keep the paper's diffusion and DiT's label-embedding init, whatever the MNIST
# config's defaults for the demo (cosine schedule, label_embed_std 1.0): these are the runs of docs/results.md.
PAPER = ["model.noise_schedule=linear", "model.label_embed_std=0.02"]


def runs(out: Path, steps: int, seeds: list[int]) -> dict[str, tuple[str, list[str], int]]:
    """name -> (config, overrides, steps). Baseline configs come from `dcdit baselines mnist`."""
    cfgs = out / "configs"
    r = {}
    for s in seeds:
        r[f"dcdit_s{s}"] = ("mnist", PAPER + [f"train.seed={s}"], steps)
        r[f"isoparam_s{s}"] = (str(cfgs / "isoparam.yaml"), PAPER + [f"train.seed={s}"], steps)
        r[f"isoflop_s{s}"] = (str(cfgs / "isoflop.yaml"), PAPER + [f"train.seed={s}"], steps)
    r["random_s0"] = ("mnist", PAPER + ["train.seed=0", "model.router=random"], steps)
    # multi-budget from the middle of the run (the release starts at 50K of 400K): until then it is the
    # `dcdit_s0` run bit for bit (same seed, per-step randomness), so it resumes from that checkpoint
    r["multibudget_s0"] = ("mnist", PAPER + ["train.seed=0", f"train.multi_budget.fractions={MULTI_BUDGET}".replace(" ", ""),
                                     f"train.multi_budget.start_step={steps // 2}"], steps)
    up = PAPER + ["train.seed=0", f"train.upcycle.from_dit={(out / 'isoparam_s0').resolve()}"]
    # a quarter of the from-scratch budget (the paper: 12.5%), compared with `dcdit_s0` at that step
    r["upcycle_s0"] = ("mnist", up + ["train.log_every=25"], steps // 4)
    r["upcycle_distill_s0"] = ("mnist", up + ["train.log_every=25", f"train.upcycle.distill_steps={steps // 10}"], steps // 4)
    # DyDiT fine-tunes the best-trained DC-DiT we have, the shipped demo checkpoint. Its routers start
    # with every gate on (biases +15/+35) and get their own lr, 100x the rest, so 400 steps can move them.
    # Both are trained with the diffusion the demo checkpoint was trained with.
    demo = [f"model.noise_schedule={read_weights(DEMO)[1].model.noise_schedule}", f"train.init_from={DEMO}"]
    r["dydit_demo"] = ("mnist", demo + ["train.seed=0", "model.dydit=true", "train.lr=1e-4",
                                 "train.dydit_router_lr=1e-2", "train.dydit_target=0.7", "train.dydit_warmup_steps=150",
                                 "train.log_every=10", "train.ckpt_every=50"], 400)
    # its quality control: the same 400 fine-tuning steps without DyDiT
    r["demo_finetune"] = ("mnist", demo + ["train.seed=0", "train.lr=1e-4",
                                    "train.log_every=10", "train.ckpt_every=50"], 400)
    return r


def run_done(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "train_summary.json"
    return summary.exists() and json.loads(summary.read_text())["step"] >= steps


def train(out: Path, name: str, config: str, overrides: list[str], steps: int) -> None:
    run_dir = out / name
    if run_done(run_dir, steps):
        return
    cmd = [*DCDIT, "train", config, *COMMON, f"train.steps={steps}", *overrides, "--out", str(run_dir)]
    if name.startswith("multibudget") and not run_dir.exists():  # branch off the plain run at start_step
        start = f"{steps // 2:07d}"
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(out / "dcdit_s0" / "checkpoints" / start, run_dir / "checkpoints" / start)
        (run_dir / "checkpoints" / "latest").write_text(start)
        shutil.copy(out / "dcdit_s0" / "log.csv", run_dir / "log.csv")
    if (run_dir / "checkpoints" / "latest").exists():
        cmd.append("--resume")
    print("$", " ".join(cmd), flush=True)
    with open(out / f"{name}.log", "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def evaluations(out: Path, seeds: list[int], steps: int) -> dict[str, tuple[Path, float]]:
    """eval name -> (checkpoint, tail-dropping fraction)."""
    ev = {}
    for s in seeds:
        ev[f"dcdit_s{s}"] = (out / f"dcdit_s{s}", 0.0)
        ev[f"isoparam_s{s}"] = (out / f"isoparam_s{s}", 0.0)
        ev[f"isoflop_s{s}"] = (out / f"isoflop_s{s}", 0.0)
    ev["random_s0"] = (out / "random_s0", 0.0)
    for f in EVAL_TAILS:
        ev[f"multibudget_s0@tail{f}"] = (out / "multibudget_s0", f)
        if f > 0:  # fraction 0 is the `dcdit_s0` row
            ev[f"dcdit_s0@tail{f}"] = (out / "dcdit_s0", f)
    ev[f"dcdit_s0@step{steps // 2}"] = (out / "dcdit_s0" / "checkpoints" / f"{steps // 2:07d}", 0.0)
    ev[f"dcdit_s0@step{steps // 4}"] = (out / "dcdit_s0" / "checkpoints" / f"{steps // 4:07d}", 0.0)
    ev["upcycle_s0"] = (out / "upcycle_s0", 0.0)
    ev["upcycle_distill_s0"] = (out / "upcycle_distill_s0", 0.0)
    ev["demo"] = (Path(str(DEMO)), 0.0)
    ev["dydit_demo"] = (out / "dydit_demo", 0.0)
    ev["demo_finetune"] = (out / "demo_finetune", 0.0)
    return ev


def evaluate(out: Path, name: str, ckpt: Path, tail: float, args) -> dict | None:
    """Sample args.num_samples digits (equal classes), score them; cached in eval/<name>/result.json."""
    folder = out / "eval" / name
    result_file = folder / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    run_dir = ckpt if ckpt.is_dir() and (ckpt / "checkpoints").exists() else None
    if not ckpt.exists() or (run_dir is not None and not (run_dir / "train_summary.json").exists()):
        print(f"skip {name}: {ckpt} not trained (to the end) yet", flush=True)
        return None
    model, cfg, step = load_model(ckpt)
    labels = torch.arange(args.num_samples) % cfg.model.num_classes
    t0 = time.perf_counter()
    res = generate(model, labels, sampler="ddim", num_sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale,
                   tail_dropping_fraction=tail, seed=0, num_snapshots=0, clip_denoised=True, progress=True)
    seconds = time.perf_counter() - t0
    flops = sampling_flops(cfg.model, res.trace)
    folder.mkdir(parents=True, exist_ok=True)
    images = to_uint8_images(res.samples)  # scored as `dcdit evaluate` scores the .npz
    write_npz(images, folder / "samples.npz", labels=labels.numpy())
    metrics = mnist_metrics(uint8_to_mnist(images), labels)
    per_class = torch.stack([torch.nonzero(labels == c)[:8, 0] for c in range(10)])  # (10, 8)
    order = per_class.T.reshape(-1)  # 8 rows, one column per class
    save_image_grid(res.samples[order].clamp(-1, 1), folder / "grid.png", nrow=10)
    result = {
        "ckpt": str(ckpt), "step": step, "arch": cfg.model.arch, "tail_dropping_fraction": tail,
        "num_samples": args.num_samples, "sampler": "ddim", "sampling_steps": args.sampling_steps,
        "cfg_scale": args.cfg_scale, "seed": 0, "threads": torch.get_num_threads(),
        "sampling_seconds": seconds, "gflops_per_image": 2 * flops["macs_per_image"] / 1e9,
        "mean_kept": flops.get("mean_kept"), "tokens": res.trace[0]["tokens"],
        "mnist_fid": metrics["mnist_fid"], "class_accuracy": metrics["class_accuracy"], "mnist_is": metrics["mnist_is"],
    }
    result_file.write_text(json.dumps(result, indent=2))
    print(f"{name}: {json.dumps({k: result[k] for k in ('mnist_fid', 'class_accuracy', 'mean_kept', 'gflops_per_image')})}", flush=True)
    return result


def router_analysis(out: Path, name: str, ckpt: Path) -> dict | None:
    """`dcdit analyze-router`: fg / bg retention on 200 held-out digits, compression over a sampling run."""
    folder = out / "router" / name
    if not (folder / "router_analysis.json").exists():
        if not ckpt.exists():
            return None
        subprocess.run([*DCDIT, "analyze-router", "--ckpt", str(ckpt), "--out", str(folder),
                        "--num-images", "200", "--sampling-steps", "50"], check=True)
    return json.loads((folder / "router_analysis.json").read_text())


def router_verdicts(retention: list[dict]) -> str:
    """Claims (b) and (c) on one analysed checkpoint: (b) at t <= 250 the router keeps a larger share of
    the foreground than of the background tokens; (c) it compresses more at t >= 750 than at t <= 250."""
    low = [r for r in retention if r["t"] <= 250]
    high = [r for r in retention if r["t"] >= 750]
    if not low or not high:
        return "(b), (c): need timesteps at or below 250 and at or above 750"
    fg = sum(r["mean_fg_retention"] for r in low) / len(low)
    bg = sum(r["mean_bg_retention"] for r in low) / len(low)
    c_low = sum(r["mean_compression_ratio"] for r in low) / len(low)
    c_high = sum(r["mean_compression_ratio"] for r in high) / len(high)
    b = "holds" if fg > bg else "does not hold"
    c = "holds" if c_high > c_low else "does not hold"
    return (f"(b) {b}: at t <= 250 it keeps {fg:.2f} of the foreground and {bg:.2f} of the background tokens. "
            f"(c) {c}: compression {c_high:.2f} at t >= 750 against {c_low:.2f} at t <= 250.")


def paired_run(name: str) -> str:
    """The run whose training saw the same batches, timesteps and noise: the DC-DiT of the same seed,
    or for the DyDiT fine-tune and its no-DyDiT control each other."""
    pairs = {"dydit_demo": "demo_finetune", "demo_finetune": "dydit_demo"}
    if name in pairs:
        return pairs[name]
    return "dcdit_s" + name.rsplit("_s", 1)[1] if "_s" in name else "dcdit_s0"


def report(out: Path, results: dict, train_runs: dict, routers: dict) -> None:
    walls = {}
    for name in train_runs:
        s = out / name / "train_summary.json"
        if s.exists():
            walls[name] = json.loads(s.read_text())
    lines = ["| run | step | MNIST-FID ↓ | class acc ↑ | IS ↑ | tokens kept / L | GFLOPs / image | sampling s | train wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if r is None:
            continue
        base = name.split("@")[0]
        kept = f"{r['mean_kept']:.1f} / {r['tokens']}" if r["mean_kept"] is not None else f"{256} patches"
        wall = walls.get(base, {}).get("wall_time_s")
        lines.append(f"| {name} | {r['step']} | {r['mnist_fid']:.1f} | {r['class_accuracy']:.3f} | {r['mnist_is']:.2f} | "
                     f"{kept} | {r['gflops_per_image']:.2f} | {r['sampling_seconds']:.0f} | "
                     f"{'' if wall is None or '@' in name else f'{wall:.0f}'} |")
    def window_mean(name: str, end: int, column: str) -> float | None:
        """Mean of a logged column over steps (end - 200, end] of run ``name`` (None: nothing logged)."""
        log = out / name / "log.csv"
        if not log.exists():
            return None
        with open(log) as f:
            vals = [float(r[column]) for r in csv.DictReader(f) if end - 200 < int(r["step"]) <= end and r.get(column)]
        return sum(vals) / len(vals) if vals else None

    lines += ["", "Training (same seed → same images, timesteps and noise at every step for every run):", "",
              "| run | steps | ε-MSE, mean of the last 200 steps | paired run | its ε-MSE over the same steps | compression (natural) | wall s |",
              "|---|---|---|---|---|---|---|"]
    for name in train_runs:
        if name not in walls:
            continue
        end, ref_name = walls[name]["step"], paired_run(name)
        mse, ref = window_mean(name, end, "mse"), window_mean(ref_name, end, "mse")
        comp = window_mean(name, end, "compression_mean")
        walls[name].update(mse_last200=mse, paired_run=ref_name, paired_mse_same_steps=ref, compression_last200=comp)
        lines.append(f"| {name} | {end} | {mse:.4f} | {ref_name} | {'' if ref is None else f'{ref:.4f}'} | "
                     f"{'n/a' if comp is None else f'{comp:.2f}'} | {walls[name]['wall_time_s']:.0f} |")
    for name, ra in routers.items():
        if ra is None:
            continue
        extra = ra.get("extra", {})
        lines += ["", f"Router {name} ({extra.get('ckpt', '?')}, step {extra.get('ckpt_step', '?')}): foreground / background "
                  "retention on held-out digits noised to t", "",
                  "| t | fg tokens kept | bg tokens kept | fg share of kept (image fg share) | compression |", "|---|---|---|---|---|"]
        for row in ra["retention"]:
            lines.append(f"| {row['t']} | {row['mean_fg_retention']:.3f} | {row['mean_bg_retention']:.3f} | "
                         f"{row['mean_fg_share_of_kept']:.3f} ({row['mean_fg_fraction']:.3f}) | {row['mean_compression_ratio']:.2f} |")
        lines += ["", router_verdicts(ra["retention"])]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"evaluations": results, "training": walls}, indent=2))
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/repro")
    ap.add_argument("--steps", type=int, default=1000, help="training steps of every from-scratch run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", choices=["train", "eval", "router", "report"], nargs="+")
    ap.add_argument("--runs", nargs="+", help="only these run / evaluation names")
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--sampling-steps", type=int, default=10)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    stages = set(args.only or ["train", "eval", "router", "report"])
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not (out / "configs" / "isoflop.yaml").exists():
        subprocess.run([*DCDIT, "baselines", "mnist", "--out", str(out / "configs")], check=True)
    train_runs = runs(out, args.steps, args.seeds)
    if "train" in stages:
        for name, (config, overrides, steps) in train_runs.items():
            if not args.runs or name in args.runs:
                train(out, name, config, overrides, steps)
    results = {}
    if stages & {"eval", "report"}:
        for name, (ckpt, tail) in evaluations(out, args.seeds, args.steps).items():
            if "eval" in stages and (not args.runs or name in args.runs):
                results[name] = evaluate(out, name, ckpt, tail, args)
            elif (out / "eval" / name / "result.json").exists():
                results[name] = json.loads((out / "eval" / name / "result.json").read_text())
    routers = {}
    if stages & {"router", "report"}:
        analysed = [("demo", Path(str(DEMO))), *((f"dcdit_s{k}", out / f"dcdit_s{k}") for k in args.seeds),
                    ("random_s0", out / "random_s0")]
        for name, ckpt in analysed:
            if "router" in stages or (out / "router" / name / "router_analysis.json").exists():
                routers[name] = router_analysis(out, name, ckpt)
    if "report" in stages:
        report(out, results, train_runs, routers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
