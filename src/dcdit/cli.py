"""The ``dcdit`` command: train, sample, sample-ddp, extract-features, demo, presets.

Every subcommand's ``--help`` stands on its own. Config overrides are ``section.key=value`` words
after the config, e.g. ``dcdit train mnist train.steps=2000 model.depth=4``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from . import DEMO_CHECKPOINT

__all__ = ["main", "build_parser", "DEMO_CHECKPOINT"]  # DEMO_CHECKPOINT: the shipped demo model's path


# ------------------------------------------------------------------------------------------ presets
def cmd_presets(args) -> int:
    from .config import presets_table

    print(presets_table())
    return 0


# ------------------------------------------------------------------------------------------ flops
def cmd_flops(args) -> int:
    from .config import load_run_config
    from .flops import flops_report, flops_table

    cfg = load_run_config(args.config, args.overrides).model
    if args.kept_tokens is not None:
        print(flops_table(cfg, args.kept_tokens))
    else:
        print(flops_report(cfg, tuple(args.tail_fractions)))
    return 0


# ------------------------------------------------------------------------------------------ baselines
def cmd_baselines(args) -> int:
    from .baselines import build_baselines, write_baseline_configs
    from .config import load_run_config

    model = None
    if args.ckpt:
        from .checkpoint import load_model

        model, cfg, _ = load_model(args.ckpt, device=args.device or "cpu")
    elif args.config:
        cfg = load_run_config(args.config, args.overrides)
    else:
        raise ValueError("give a DC-DiT CONFIG (nominal budget L/N) or --ckpt RUN (measured budget)")
    base = build_baselines(cfg, model, num_samples=args.num_samples, sampling_steps=args.sampling_steps)
    paths = write_baseline_configs(cfg, base, args.out)
    print(f"{'model':<10} {'depth':>5} {'patch/N':>8} {'params (M)':>11} {'GMACs/pass':>11}")
    for name, b in base.items():
        c = b["config"]
        tokens = f"N={c.target_ratio:g}" if name == "dcdit" else f"P={c.patch_size}"
        print(f"{name:<10} {c.depth:>5} {tokens:>8} {b['params'] / 1e6:>11.2f} {b['macs'] / 1e9:>11.3f}")
    print(f"DC-DiT MACs: {base['dcdit']['macs_source']}; wrote {paths['isoparam']} and {paths['isoflop']}")
    return 0


# ------------------------------------------------------------------------------------------ upcycle
def cmd_upcycle(args) -> int:
    """Build the upcycled DC-DiT, report what was mapped, write it as a dcdit checkpoint file."""
    from .checkpoint import save_weights
    from .config import load_run_config
    from .upcycle import upcycle_run_config

    run = upcycle_run_config(load_run_config(args.config, args.overrides), args.dit, num_heads=args.num_heads)
    m = run.cfg.model
    print(run.report.summary())
    print(f"copied {run.copied_block_tensors} block tensors and {len(run.frozen)} embedder tensors (frozen while training); "
          f"condition adaptor on; positions: token (r, c) at ((r - {m.pos_offset:g}) * {m.pos_scale:g}, ...)")
    if args.out:
        save_weights(Path(args.out), run.model.state_dict(), run.cfg, step=0)
        print(f"wrote {args.out}")
    print(f"train it with: dcdit train {args.config} train.upcycle.from_dit={args.dit} train.upcycle.distill_steps=5000")
    return 0


# ------------------------------------------------------------------------------------------ convert-release
def cmd_convert_release(args) -> int:
    from .release import convert_release_checkpoint
    from .release.checkpoint import RELEASE_VAE

    report = convert_release_checkpoint(args.ckpt, args.out, weights=args.weights)
    print(report.summary())
    print(f"wrote {report.out} (step {report.step}, {report.weights} weights as ema.safetensors, the release's "
          f"'model' weights as model.safetensors); sample it with: dcdit sample --ckpt {report.out} --vae {RELEASE_VAE} "
          "(the release's default decoder; a local copy or sd-vae-ft-mse work too)")
    return 0


# ------------------------------------------------------------------------------------------ train
def cmd_train(args) -> int:
    from .config import load_run_config
    from .preemption import TrainingInterrupted
    from .train import train

    cfg = load_run_config(args.config, args.overrides)
    out = args.out or os.path.join("runs", Path(args.config).stem)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = train(cfg, out, resume=args.resume, device=args.device, progress=not args.no_progress,
                        allow_changed=args.allow_changed)
    except TrainingInterrupted as e:  # pre-empted: the checkpoint is written, say how to go on
        if main_rank:
            words = " ".join(["dcdit train", args.config, *args.overrides, "--out", str(out), "--resume"])
            launcher = " (under the same torchrun / accelerate launch)" if "WORLD_SIZE" in os.environ else ""
            print(f"dcdit train: stopped by {e.signal_name} after step {e.step}, checkpoint {e.checkpoint} written; "
                  f"resume with: {words}{launcher}", file=sys.stderr)
        return 128 + e.signum
    if main_rank:
        print(json.dumps(summary, indent=2))
    return 0


# ------------------------------------------------------------------------------------------ sample
def _sampling_overrides(args) -> dict:
    """The sampling flags as ``SampleConfig`` fields; a flag not given (None) keeps the config's value."""
    uncond = None
    if args.lite_cfg:
        uncond = 0.9 if args.uncond_tail_dropping_fraction is None else args.uncond_tail_dropping_fraction
    return dict(sampler=args.sampler, num_sampling_steps=args.steps, eta=args.eta, cfg_scale=args.cfg_scale,
                guidance_channels=args.guidance_channels, tail_dropping_fraction=args.tail_dropping_fraction,
                uncond_tail_dropping_fraction=uncond, seed=args.seed, use_ema=False if args.raw_weights else None)


def cmd_sample(args) -> int:
    from .pipelines import sample_to_folder

    settings = sample_to_folder(args.ckpt, args.out, classes=args.classes, per_class=args.per_class, vae=args.vae,
                                device=args.device, progress=not args.no_progress, **_sampling_overrides(args))
    print(json.dumps(settings["files"], indent=2))
    print(f"wrote {args.out} in {settings['seconds']:.1f} s")
    return 0


def cmd_sample_ddp(args) -> int:
    from .pipelines import sample_sharded

    settings = sample_sharded(args.ckpt, args.out, num_samples=args.num_samples, batch_size=args.batch_size, vae=args.vae,
                              device=args.device, progress=not args.no_progress, **_sampling_overrides(args))
    if settings is not None:  # rank 0
        print(f"wrote {settings['num_samples']} samples to {Path(args.out) / 'images'} and {settings['npz']} "
              f"(uint8 {tuple(settings['shape'])})")
    return 0


# ------------------------------------------------------------------------------------------ features
def cmd_extract_features(args) -> int:
    from diffusers import AutoencoderKL

    from .data import extract_features

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    meta = extract_features(
        args.images, args.out, vae, image_size=args.image_size, batch_size=args.batch_size,
        shard_size=args.shard_size, vae_id=args.vae, latent_scale=args.latent_scale, device=device,
        progress=not args.no_progress, strict=args.strict, overwrite=args.overwrite,
    )
    print(json.dumps({k: meta.get(k) for k in ("num_images", "num_skipped", "num_classes", "latent_shape", "vae_id",
                                               "latent_scale")}, indent=2))
    if meta.get("num_skipped"):
        print(f"skipped {meta['num_skipped']} unreadable image(s), listed in {Path(args.out) / meta['skipped_report']}")
    return 0


# ------------------------------------------------------------------------------------------ demo
def cmd_demo(args) -> int:
    from .pipelines import demo

    settings = demo(args.out, train=args.train, train_steps=args.steps, per_class=args.per_class, sampler=args.sampler,
                    num_sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale, seed=args.seed, device=args.device,
                    progress=not args.no_progress)
    print(f"\nDC-DiT on MNIST: {len(settings['labels'])} samples of the digits 0-9 in {settings['seconds']:.0f} s")
    for k, v in settings["files"].items():
        print(f"  {k:<17} {v}")
    if "mean_compression_ratio" in settings:
        print(f"  tokens kept per step: {settings['mean_tokens_kept_per_step']:.0f} of 1024 "
              f"(mean compression {settings['mean_compression_ratio']:.2f}x)")
    return 0


# ------------------------------------------------------------------------------------------ parser
def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags; each one not given keeps the value of the run config's ``sample:`` section
    (saved in the checkpoint; a config without one gets DDPM 250 steps, CFG 1.5)."""
    p.add_argument("--ckpt", required=True, help="a run folder (latest checkpoint), a checkpoint folder, or a .safetensors file")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None,
                   help="DDPM (the paper's) or DDIM (see --eta); default: the run config's sample.sampler")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default: sample.num_sampling_steps)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM only: 0 = deterministic, 1 = fresh noise each step like DDPM (default: sample.eta); a cosine-"
                        "schedule pixel model needs eta > 0 to wash out its first steps' clipped x0 (docs/demo-checkpoint.md)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale; 1 = no guidance (default: sample.cfg_scale)")
    p.add_argument("--guidance-channels", type=int, default=None,
                   help="guide only the first k ε channels; 3 reproduces the DiT release (default: sample.guidance_channels, all)")
    p.add_argument("--tail-dropping-fraction", type=float, default=None,
                   help="drop this fraction of each sample's lowest-p boundary tokens (elastic inference; "
                        "default: sample.tail_dropping_fraction)")
    p.add_argument("--lite-cfg", action="store_true", help="Lite-CFG: give the unconditional half its own tail-drop fraction")
    p.add_argument("--uncond-tail-dropping-fraction", type=float, default=None,
                   help="with --lite-cfg: the uncond half's fraction (default 0.9)")
    p.add_argument("--seed", type=int, default=None, help="default: sample.seed")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--vae", default=None, help="for latent models: AutoencoderKL path or hub id (default: the one recorded at training)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_demo(sub) -> None:
    """`dcdit demo`."""
    p = sub.add_parser("demo", help="sample all ten MNIST digits with the shipped DC-DiT checkpoint (CPU, a few minutes)",
                       description="Sample the digits 0-9 with the small DC-DiT shipped in the package and write the sample grid, "
                                   "chunking_viz.png (x_t, boundary probabilities, share of tokens kept across timesteps), the "
                                   "compression-vs-timestep plot and settings.json into one folder. --train retrains it first.")
    p.add_argument("--out", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--train", action="store_true", help="retrain the MNIST DC-DiT from scratch with `dcdit train mnist` first")
    p.add_argument("--steps", type=int, default=None, help="with --train: training steps (default: the mnist config's)")
    p.add_argument("--per-class", type=int, default=4, help="samples per digit (default 4)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default=None,
                   help="default: the mnist config's sample.sampler (ddpm; ddim leaves grey backgrounds with this checkpoint)")
    p.add_argument("--sampling-steps", type=int, default=None, help="default: the mnist config's sample.num_sampling_steps (50)")
    p.add_argument("--cfg-scale", type=float, default=None, help="default: the mnist config's sample.cfg_scale (4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def _add_train(sub) -> None:
    """`dcdit train`."""
    p = sub.add_parser("train", help="train a model from a YAML config (single process, torchrun or accelerate launch)",
                       description="Train DC-DiT or DiT. CONFIG is a YAML file or a packaged config name "
                                   "(mnist, DC-DiT-B-N4, DiT-XL-2, ...). Overrides: section.key=value words, e.g. "
                                   "train.steps=1000 train.global_batch_size=64 model.depth=4. Multi-GPU: "
                                   "torchrun --nproc_per_node=8 -m dcdit.cli train CONFIG (or accelerate launch). "
                                   "SIGTERM / SIGINT (pre-emption, Ctrl-C) finish the step, write a checkpoint and exit "
                                   "with 128 + the signal number; the same command with --resume continues exactly. "
                                   "train.max_nonfinite_steps non-finite steps in a row stop a diverging run.")
    p.add_argument("config", help="YAML config path or packaged config name")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--out", default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--allow-changed", action="store_true",
                   help="with --resume: accept settings that differ from the run's (seed, batch sizes, lr, data, ...) "
                        "and say which; without it they are refused, since the run would no longer continue exactly")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def _add_sample(sub) -> None:
    """`dcdit sample`."""
    p = sub.add_parser("sample", help="generate a sample grid, chunking_viz.png and a compression plot from a checkpoint",
                       description="Generate images of chosen classes from a dcdit checkpoint (EMA weights by default) and "
                                   "write samples.png, chunking_viz.png, compression_vs_timestep.png and settings.json.")
    _add_sampling_args(p)
    p.add_argument("--out", default="samples", help="output folder (default samples)")
    p.add_argument("--classes", type=int, nargs="*", default=None, help="class labels (default 0..9)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (default 4)")
    p.set_defaults(func=cmd_sample)


def _add_sample_ddp(sub) -> None:
    """`dcdit sample-ddp`."""
    p = sub.add_parser("sample-ddp", help="sharded generation for FID: PNG folder + ADM .npz (run under torchrun)",
                       description="Generate --num-samples images with random class labels across all processes "
                                   "(torchrun --nproc_per_node=N -m dcdit.cli sample-ddp ...): one PNG per image and "
                                   "samples.npz (uint8 NxHxWx3, key arr_0) for OpenAI's ADM evaluation suite.")
    _add_sampling_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=32, help="images per process and forward pass")
    p.set_defaults(func=cmd_sample_ddp)


def _add_extract_features(sub) -> None:
    """`dcdit extract-features`."""
    p = sub.add_parser("extract-features", help="encode an image folder into sharded VAE posteriors for training",
                       description="Encode an ImageFolder-layout folder (one sub-folder per class) with a diffusers "
                                   "AutoencoderKL (local path or hub id), ADM centre crop, storing the posterior mean and "
                                   "std of every image and its flip in a few safetensors shards plus meta.json.")
    p.add_argument("--images", required=True, help="image folder, one sub-folder per class")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--vae", required=True, help="AutoencoderKL path or hub id, e.g. stabilityai/sd-vae-ft-ema")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--latent-scale", type=float, default=0.18215)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=20_000, help="images per shard")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image, naming it (default: skip it and list it in "
                        "OUT/skipped_images.json); finished shards are kept either way")
    p.add_argument("--overwrite", action="store_true", help="replace an extraction with other settings already in --out")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_extract_features)


def _add_flops(sub) -> None:
    """`dcdit flops`."""
    p = sub.add_parser("flops", help="FLOP table of a model config (per component; DC-DiT at several token budgets)",
                       description="Multiply-accumulates of one forward pass per component (fvcore's convention, as the DiT "
                                   "paper's 'Gflops'), and TFLOPs per image for 250 sampling steps = 2 x MACs x steps "
                                   "(x 2 with CFG). DC-DiT costs depend on the tokens kept: the nominal budget is L/N, "
                                   "rows for tail-drop fractions show the elastic range; --kept-tokens sets M directly.")
    p.add_argument("config", help="YAML config path or packaged config name (e.g. DC-DiT-B-N4, DiT-XL-2, mnist)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.depth=16")
    p.add_argument("--kept-tokens", type=float, default=None, help="DC-DiT: inner tokens M per sample")
    p.add_argument("--tail-fractions", type=float, nargs="*", default=[0.0, 0.25, 0.5])
    p.set_defaults(func=cmd_flops)


def _add_upcycle(sub) -> None:
    """`dcdit upcycle`."""
    p = sub.add_parser("upcycle", help="turn a pretrained DiT (official .pt or diffusers) into a DC-DiT and report the mapping",
                       description="Load a pretrained DiT from a local path (official release .pt, read with weights_only=True, "
                                   "or a diffusers DiTTransformer2DModel folder), build a DC-DiT from CONFIG whose inner blocks "
                                   "and embedders are the DiT's (embedders frozen, a LayerNorm adaptor on the condition in the "
                                   "encoder and decoder), print mapped / missing / unexpected keys and optionally write it. "
                                   "Training with train.upcycle.from_dit=... does the same inside `dcdit train`, with "
                                   "train.upcycle.distill_steps of activation distillation first.")
    p.add_argument("config", help="DC-DiT YAML config or packaged name with the DiT's width, depth and heads (e.g. DC-DiT-XL-N4)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--dit", required=True, help="pretrained DiT: official .pt file or diffusers folder / .safetensors")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of the DiT (default: from its width)")
    p.add_argument("--out", default=None, help="write the upcycled model here (.safetensors with its config)")
    p.set_defaults(func=cmd_upcycle)


def _add_baselines(sub) -> None:
    """`dcdit baselines`."""
    p = sub.add_parser("baselines", help="derive isoparam and isoflop DiT configs from a DC-DiT config or checkpoint",
                       description="Write isoparam.yaml (DiT with patch sqrt(N) and the depth closest in parameters) and "
                                   "isoflop.yaml (the smallest depth whose MACs per forward reach the DC-DiT's) next to each "
                                   "other. With --ckpt the DC-DiT's MACs are measured over a DDIM sampling run of the "
                                   "checkpoint (the tokens it really keeps); with a CONFIG the nominal budget L/N is used.")
    p.add_argument("config", nargs="?", help="DC-DiT YAML config or packaged name (omit with --ckpt)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--ckpt", default=None, help="a trained DC-DiT (run folder, checkpoint folder or .safetensors)")
    p.add_argument("--num-samples", type=int, default=8, help="with --ckpt: samples in the measuring run")
    p.add_argument("--sampling-steps", type=int, default=50, help="with --ckpt: DDIM steps of the measuring run")
    p.add_argument("--out", default="configs/baselines", help="folder for isoparam.yaml and isoflop.yaml")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_baselines)


def _add_evaluation(sub) -> None:
    """`dcdit evaluate`, `train-classifier` and `analyze-router` (their flags: cli_evaluation)."""
    from .cli_evaluation import (add_evaluate_args, add_router_analysis_args, add_train_classifier_args,
                                 evaluate_main, router_analysis_main, train_classifier_main)

    p = sub.add_parser("evaluate", help="FID / IS / precision-recall (local TorchScript Inception) and MNIST metrics of samples",
                       description="Score a PNG folder or an ADM .npz: FID, Inception Score and precision/recall with a "
                                   "feature network read from a local file (nothing downloads), and for 32x32 digits the "
                                   "MNIST metrics (MNIST-FID, class accuracy, IS-style score) of the shipped classifier.")
    add_evaluate_args(p)
    p.set_defaults(func=evaluate_main)
    p = sub.add_parser("train-classifier", help="retrain the MNIST classifier behind the MNIST metrics")
    add_train_classifier_args(p)
    p.set_defaults(func=train_classifier_main)
    p = sub.add_parser("analyze-router", help="foreground vs background token retention across timesteps; compression vs timestep")
    add_router_analysis_args(p)
    p.set_defaults(func=router_analysis_main)


def _add_convert_release(sub) -> None:
    """`dcdit convert-release`."""
    p = sub.add_parser("convert-release", help="convert a checkpoint of the authors' release into a dcdit run folder",
                       description="Read a checkpoint written by the train.py of AMD-AGI/DynamicChunkingDiT (top-level "
                                   "model / ema / opt / config; loaded with torch.load(weights_only=True) and stand-ins for "
                                   "its config classes, never fully unpickled; CUDA-tagged tensors load on a CPU) and write a "
                                   "dcdit run folder whose model computes what the release computes (docs/release.md). "
                                   "Prints the key mapping; unknown or missing keys are errors.")
    p.add_argument("ckpt", help="the release checkpoint, e.g. results/000-DC-DiT/checkpoints/0400000.pt")
    p.add_argument("--out", required=True, help="the run folder to write (must not hold checkpoints yet)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights `dcdit sample` uses (ema.safetensors): ema, as the release's sampler (default), or model")
    p.set_defaults(func=cmd_convert_release)


def _add_presets(sub) -> None:
    """`dcdit presets`."""
    p = sub.add_parser("presets", help="print the model presets and their parameter counts",
                       description="Print every model preset (DiT-S/B/L/XL with patch 2/4/8, DC-DiT-B/XL at N=4/16) with "
                                   "its width, depth, heads and parameter count next to the paper's figure.")
    p.set_defaults(func=cmd_presets)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's flags, one function per command in the order of ``dcdit --help``."""
    parser = argparse.ArgumentParser(prog="dcdit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_sample, _add_sample_ddp, _add_extract_features, _add_flops, _add_upcycle,
                _add_baselines, _add_evaluation, _add_convert_release, _add_presets):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run the command; a failure the user can cause ends in one line on stderr naming the file
    or key and the fix (dcdit.errors), a traceback only with --debug or DCDIT_DEBUG=1."""
    from .errors import DEBUG_ENV, debug_requested, run_command
    from .malloc import reuse_freed_memory

    reuse_freed_memory()  # CPU sampling: a third less CPU time (dcdit.malloc); DCDIT_MALLOC=default opts out
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1); "
                                                             "accepted anywhere on the command line")
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    if extra:  # section.key=value overrides may also follow the options
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args.func, args, args.command, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
