"""What ``dcdit sample``, ``dcdit sample-ddp`` and ``dcdit demo`` do, as library functions with plain arguments.

The CLI only parses flags into these arguments::

    from dcdit.pipelines import sample_to_folder, sample_sharded, demo

    settings = sample_to_folder("runs/mnist", "samples/mnist", classes=[3, 7], cfg_scale=4.0)
    sample_sharded("runs/dcdit-b-n4", "fid/dcdit-b-n4", num_samples=50_000, vae="stabilityai/sd-vae-ft-ema")
    demo("demo_output")

Sampling settings come from a :class:`~dcdit.config.SampleConfig`: by default the ``sample:`` section
of the checkpoint's own run config; keyword overrides (``sampler=``, ``num_sampling_steps=``,
``cfg_scale=``, ...; None = keep) replace single fields, which is how the CLI's flags act.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import DEMO_CHECKPOINT
from . import distributed as D
from .checkpoint import load_model
from .config import DataConfig, ModelConfig, RunConfig, SampleConfig, load_run_config
from .flops import sampling_flops
from .sampling import SampleResult, generate, save_settings_json, to_uint8_images, write_npz
from .viz import plot_chunking, plot_compression_vs_timestep, save_image_grid

__all__ = ["DEMO_CHECKPOINT", "sampling_options", "load_for_sampling", "load_vae", "image_decoder", "class_labels",
           "generate_with", "settings_record", "sampling_cost", "write_figures", "sample_to_folder", "sample_sharded", "demo"]

MNIST_DIGITS = list(range(10))
_SEED_STRIDE = 1_000_003  # sample-ddp: batch k of seed s is seeded s·stride + (index of its first image)


# ------------------------------------------------------------------------------ settings and loading


def sampling_options(base: SampleConfig, **overrides) -> SampleConfig:
    """``base`` with the given fields replaced; None leaves a field as it is (a flag not given)."""
    valid = {f.name for f in dataclasses.fields(SampleConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {unknown}; valid: {', '.join(sorted(valid))}")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def load_for_sampling(ckpt, device=None, sample: SampleConfig | None = None, **overrides):
    """(model, run config, step, sampling settings, device) of a checkpoint: a run folder, a checkpoint
    folder or a ``.safetensors`` file. ``sample`` (default: the checkpoint's ``sample:`` section) with
    ``overrides`` applied decides, through ``use_ema``, which weights of a folder are loaded."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_ema = overrides.get("use_ema")
    model, cfg, step = load_model(ckpt, use_ema=True if use_ema is None else use_ema, device=device)
    options = sampling_options(sample or cfg.sample, **overrides)
    if options.use_ema != (True if use_ema is None else use_ema) and Path(ckpt).is_dir():  # the config asks for the raw weights
        model, cfg, step = load_model(ckpt, use_ema=options.use_ema, device=device)
    return model, cfg, step, options, device


def load_vae(vae_id: str, device="cpu"):
    """A diffusers ``AutoencoderKL`` (local folder or hub id) in eval mode on ``device``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(vae_id).to(device).eval()


def image_decoder(cfg: RunConfig, vae: str | None = None, device="cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Model-space samples -> images in [-1, 1] on the CPU: the identity for pixel data, the VAE
    decoder for latents (its id and scale must be those the training latents were made with)."""
    if cfg.data.name != "latents":
        return lambda x: x
    vae_id = vae or cfg.data.vae
    if not vae_id:
        raise ValueError("this model was trained on latents: pass --vae (the AutoencoderKL path or hub id used by extract-features)")
    if cfg.data.vae and vae and vae != cfg.data.vae:
        raise ValueError(f"--vae {vae!r} differs from the VAE the training latents were made with ({cfg.data.vae!r})")
    model = load_vae(vae_id, device)
    scale = cfg.data.latent_scale or 0.18215

    @torch.no_grad()
    def decode(z: torch.Tensor) -> torch.Tensor:
        return model.decode(z.to(device) / scale).sample.clamp(-1, 1).cpu()

    return decode


def class_labels(classes: list[int] | None, per_class: int, num_classes: int) -> torch.Tensor:
    """Each class ``per_class`` times in a row; default classes 0..min(num_classes, 10) − 1."""
    classes = classes if classes else list(range(min(num_classes, 10)))
    return torch.tensor([c for c in classes for _ in range(per_class)], dtype=torch.long)


def generate_with(model, labels, sample: SampleConfig, data: DataConfig, device, **kwargs) -> SampleResult:
    """:func:`~dcdit.sampling.generate` with a ``SampleConfig``'s settings; pixel-space models clip
    x̂0 to [-1, 1], latent models do not (DiT's convention)."""
    return generate(
        model, labels, sampler=sample.sampler, num_sampling_steps=sample.num_sampling_steps, cfg_scale=sample.cfg_scale,
        eta=sample.eta, guidance_channels=sample.guidance_channels, tail_dropping_fraction=sample.tail_dropping_fraction,
        uncond_tail_dropping_fraction=sample.uncond_tail_dropping_fraction, device=device,
        clip_denoised=data.name != "latents", **kwargs,
    )


def settings_record(ckpt, cfg: RunConfig, step: int, sample: SampleConfig) -> dict:
    """The part of ``settings.json`` that says what was sampled and how."""
    return {
        "ckpt": str(ckpt), "ckpt_step": step, "weights": "ema" if sample.use_ema else "raw",
        "sampler": sample.sampler, "num_sampling_steps": sample.num_sampling_steps, "eta": sample.eta,
        "cfg_scale": sample.cfg_scale, "guidance_channels": sample.guidance_channels,
        "tail_dropping_fraction": sample.tail_dropping_fraction,
        "lite_cfg": sample.uncond_tail_dropping_fraction is not None,
        "uncond_tail_dropping_fraction": sample.uncond_tail_dropping_fraction, "seed": sample.seed,
        "clip_denoised": cfg.data.name != "latents", "model": cfg.model.__dict__, "data": cfg.data.__dict__,
    }


def sampling_cost(model_cfg: ModelConfig, result: SampleResult) -> dict:
    """FLOPs per image of a run (``flops.sampling_flops``) and, from the trace, the tokens kept per step."""
    flops = sampling_flops(model_cfg, result.trace)
    cost = {"flops": {k: flops[k] for k in ("mean_macs_per_forward", "macs_per_image", "tflops_per_image",
                                             "forward_passes_per_image")}}
    if result.trace and "kept" in result.trace[0]:
        kept = torch.stack([torch.as_tensor(e["kept"]).float() for e in result.trace])  # (steps, B)
        cost["mean_tokens_kept_per_step"] = float(kept.mean())
        cost["mean_compression_ratio"] = float((result.trace[0]["tokens"] / kept).mean())
    return cost


# ------------------------------------------------------------------------------ sample


def write_figures(result: SampleResult, images: torch.Tensor, out: Path, nrow: int, decode=None) -> dict:
    """``samples.png`` and, for a DC-DiT, ``chunking_viz.png`` and ``compression_vs_timestep.png``."""
    files = {"grid": str(save_image_grid(images, out / "samples.png", nrow=nrow))}
    if result.snapshots:
        files["chunking_viz"] = str(plot_chunking(result, out / "chunking_viz.png", decode=decode))
        files["compression_plot"] = str(plot_compression_vs_timestep(result, out / "compression_vs_timestep.png"))
    return files


def sample_to_folder(ckpt, out, *, classes: list[int] | None = None, per_class: int = 4, sample: SampleConfig | None = None,
                     vae: str | None = None, device=None, progress: bool = True, **overrides) -> dict:
    """Generate ``per_class`` images of each class, decode them and write into ``out``: the grid, the
    chunking visualisation and compression plot (DC-DiT) and ``settings.json``; returns the settings.

    ``sample``: the sampling settings (default: the checkpoint's ``sample:`` section); ``overrides``:
    single fields of it (None = keep). ``vae``: for latent models, the VAE (default: the one recorded
    at training)."""
    model, cfg, step, options, device = load_for_sampling(ckpt, device, sample, **overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = class_labels(classes, per_class, model.num_classes)
    t0 = time.time()
    result = generate_with(model, labels, options, cfg.data, device, seed=options.seed, progress=progress)
    seconds = time.time() - t0
    decode = image_decoder(cfg, vae, device)
    files = write_figures(result, decode(result.samples), out, nrow=per_class if per_class > 1 else 10,
                          decode=decode if cfg.data.name == "latents" else None)
    settings = {**settings_record(ckpt, cfg, step, options), "labels": labels.tolist(), "device": str(device),
                "seconds": seconds, "files": files, **sampling_cost(cfg.model, result)}
    save_settings_json(out / "settings.json", settings)
    return settings


# ------------------------------------------------------------------------------ sample-ddp


def _sample_shard(model, labels: torch.Tensor, options: SampleConfig, cfg: RunConfig, decode, images_dir: Path,
                  info: D.DistInfo, batch_size: int, device, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """This rank's batches (every world_size-th, round robin): PNGs written, (indices, uint8 images) returned."""
    from PIL import Image
    from tqdm.auto import tqdm

    n = len(labels)
    starts = range(info.rank * batch_size, n, batch_size * info.world_size)
    indices, arrays = [], []
    for s in tqdm(starts, disable=not (info.is_main and progress), desc="sample-ddp"):
        idx = list(range(s, min(s + batch_size, n)))
        result = generate_with(model, labels[idx], options, cfg.data, device, seed=options.seed * _SEED_STRIDE + s, num_snapshots=0)
        u8 = to_uint8_images(decode(result.samples))
        for i, img in zip(idx, u8):
            Image.fromarray(img).save(images_dir / f"{i:06d}.png")
        indices += idx
        arrays.append(u8)
    return np.asarray(indices, dtype=np.int64), np.concatenate(arrays) if arrays else np.zeros((0,), np.uint8)


def _collect_on_main(indices: np.ndarray, images: np.ndarray, out: Path, info: D.DistInfo, n: int) -> np.ndarray | None:
    """All N uint8 images in index order on rank 0 (None elsewhere): its own from memory, the other
    ranks' from the raw ``.npy`` parts they write (no PNG is decoded again)."""
    parts = out / ".parts"
    if not info.is_main:
        parts.mkdir(exist_ok=True)
        np.save(parts / f"rank{info.rank}-indices.npy", indices)
        np.save(parts / f"rank{info.rank}-images.npy", images)
    D.barrier()
    if not info.is_main:
        return None
    full = np.empty((n, *images.shape[1:]), dtype=np.uint8)
    full[indices] = images
    for r in range(1, info.world_size):
        idx = np.load(parts / f"rank{r}-indices.npy")
        if len(idx):
            full[idx] = np.load(parts / f"rank{r}-images.npy")
    shutil.rmtree(parts, ignore_errors=True)
    return full


def sample_sharded(ckpt, out, *, num_samples: int = 50_000, batch_size: int = 32, sample: SampleConfig | None = None,
                   vae: str | None = None, device=None, progress: bool = True, **overrides) -> dict | None:
    """Sharded generation for FID (run under ``torchrun``; one process works too): ``num_samples``
    images with class-balanced-in-expectation random labels, one PNG each in ``out/images`` and
    ``out/samples.npz`` (uint8 N×H×W×3 under ``arr_0``, labels under ``arr_1``: the ADM suite's
    format), plus ``settings.json``. Returns the settings on rank 0, None on the other ranks.
    ``sample`` / ``overrides`` as in :func:`sample_to_folder`."""
    info = D.setup(device)
    try:
        model, cfg, step, options, device = load_for_sampling(ckpt, info.device, sample, **overrides)
        decode = image_decoder(cfg, vae, device)
        out = Path(out)
        (out / "images").mkdir(parents=True, exist_ok=True)
        labels = torch.randint(0, model.num_classes, (num_samples,), generator=torch.Generator().manual_seed(options.seed))
        indices, images = _sample_shard(model, labels, options, cfg, decode, out / "images", info, batch_size, device, progress)
        images = _collect_on_main(indices, images, out, info, num_samples)
        if not info.is_main:
            return None
        npz = write_npz(images, out / "samples.npz", labels=labels.numpy())
        settings = {**settings_record(ckpt, cfg, step, options), "num_samples": num_samples, "world_size": info.world_size,
                    "npz": npz, "labels": labels.tolist(), "shape": list(images.shape)}
        save_settings_json(out / "settings.json", settings)
        return settings
    finally:
        D.teardown()


# ------------------------------------------------------------------------------ demo


def demo(out="demo_output", *, train: bool = False, train_steps: int | None = None, per_class: int = 4,
         sampler: str | None = None, num_sampling_steps: int | None = None, cfg_scale: float | None = None,
         seed: int = 0, device=None, progress: bool = True) -> dict:
    """Sample the digits 0-9 with the shipped MNIST DC-DiT into ``out`` (see :func:`sample_to_folder`).

    The sampling settings are the checkpoint's ``sample:`` section, for the shipped checkpoint and for
    a run of ``dcdit train mnist`` that of ``configs/mnist.yaml`` (measured in docs/demo-checkpoint.md);
    the arguments that are not None override them. ``train=True`` first
    trains ``dcdit train mnist`` (``train_steps`` steps; default the config's) into ``out/train``,
    continuing a run already there, and samples that run instead."""
    out = Path(out)
    ckpt = DEMO_CHECKPOINT
    if train:
        from .train import train as train_run

        overrides = [f"train.steps={train_steps}"] if train_steps else []
        ckpt = out / "train"
        resume = (ckpt / "checkpoints" / "latest").exists()
        if resume:
            print(f"continuing the training run in {ckpt}")
        train_run(load_run_config("mnist", overrides), ckpt, resume=resume, device=device, progress=progress)
    elif not ckpt.exists():
        raise FileNotFoundError(f"the shipped demo checkpoint {ckpt} is missing; run `dcdit demo --train` to train one")
    return sample_to_folder(ckpt, out, classes=MNIST_DIGITS, per_class=per_class, device=device, progress=progress, sampler=sampler, num_sampling_steps=num_sampling_steps,
                            cfg_scale=cfg_scale, seed=seed)
