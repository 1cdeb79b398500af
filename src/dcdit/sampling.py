"""Generation: class-conditional sampling from a DiT or DC-DiT, with a per-step routing trace.

One entry point, :func:`generate`, for both architectures and both samplers::

    from dcdit.sampling import generate, to_uint8_images, write_npz

    res = generate(model, labels, sampler="ddpm", num_sampling_steps=250, cfg_scale=1.5)
    res.samples          # (B, C, H, W) in model space (pixels in [-1, 1], or VAE latents)
    res.trace[k]["kept"] # tokens the inner blocks saw at step k (conditional half)
    write_npz(to_uint8_images(decoded), "samples.npz")  # the ADM evaluation-suite format

Conventions:

* Classifier-free guidance is used exactly when ``cfg_scale != 1.0``: the batch is [cond; uncond]
  with the null label ``model.num_classes`` and both halves start from the same noise (DiT's
  convention); the model's ``forward_with_cfg`` guides, and the first half is returned.
* Lite-CFG: ``uncond_tail_dropping_fraction`` gives the unconditional half of a DC-DiT its own
  tail-drop fraction (e.g. 0.0 for cond, 0.9 for uncond).
* Randomness: the initial noise and every step's noise come from one ``torch.Generator`` seeded
  with ``seed`` on the CPU and are then moved to the device, so the samples for a seed do not
  depend on the device (up to floating-point differences of the network itself) nor on the
  global RNG state.
* ``clip_denoised`` defaults to False as in DiT's ``sample.py`` (latents are not bounded); set it
  to True for pixel-space models whose data lies in [-1, 1].
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import inspect
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .models.dydit import dydit_usage
from .utils import jsonable, unwrap

__all__ = [
    "SampleResult",
    "generate",
    "snapshot_steps",
    "to_uint8_images",
    "write_npz",
    "save_settings_json",
]


@dataclass
class SampleResult:
    """What :func:`generate` returns.

    samples:   (B, C, H, W) final samples in model space (pixels in [-1, 1] or latents), on the device.
    trace:     one dict per sampling step, in sampling order (t decreasing):
               ``t`` (int, original 0..T-1 timestep index the model saw), ``step`` (int, 0-based),
               ``kept`` (B,) long tokens the inner blocks processed for the conditional half,
               ``natural`` (B,) long router boundaries before tail-dropping,
               ``tokens`` (int, L = H·W grid positions), and with CFG ``uncond_kept`` /
               ``uncond_natural`` (B,) for the unconditional half. For a DiT (fixed patches)
               ``kept`` = ``natural`` = the number of patches, (H/P)·(W/P).
    snapshots: DC-DiT only (empty for DiT): about ``num_snapshots`` evenly spaced steps, each a
               dict with ``t``, ``step``, ``x_t`` (B, C, H, W) the input of that step, ``pred_xstart``
               (B, C, H, W), ``p`` (B, H, W) boundary probabilities, ``kept_mask`` and
               ``natural_mask`` (B, H, W) bool, all on the CPU, for the conditional half; with CFG
               also ``uncond_p`` and ``uncond_kept_mask``.
    labels:    (B,) long class labels (CPU).
    settings:  the arguments used (sampler, steps, cfg_scale, ...), JSON-serialisable.
    """

    samples: torch.Tensor
    trace: list[dict] = field(default_factory=list)
    snapshots: list[dict] = field(default_factory=list)
    labels: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)

    @property
    def lite_cfg(self) -> bool:
        """True when the unconditional half was tail-dropped differently from the conditional half."""
        s = self.settings
        return bool(s.get("cfg")) and s.get("uncond_tail_dropping_fraction") is not None and (
            s["uncond_tail_dropping_fraction"] != s.get("tail_dropping_fraction", 0.0)
        )


def _is_dcdit(model: nn.Module) -> bool:
    from .models.dcdit import DCDiT

    inner = unwrap(model)
    if isinstance(inner, DCDiT):
        return True
    try:
        return "tail_dropping_fraction" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def _check_labels(labels, num_classes: int) -> torch.Tensor:
    y = torch.as_tensor(labels)
    if y.dim() != 1:
        raise ValueError(f"labels must be a 1-D sequence of class indices (B,), got shape {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("labels is empty: pass at least one class label")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    y = y.long().cpu()
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}] (the model has num_classes={num_classes}; "
            f"{num_classes} is the null label reserved for guidance), got min {lo}, max {hi}"
        )
    return y


def _check_fraction(name: str, f) -> None:
    if f is None:
        return
    if not (0.0 <= float(f) < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {f}")


def snapshot_steps(num_steps: int, num_snapshots: int) -> list[int]:
    """Evenly spaced step indices in [0, num_steps - 1] (both ends included when ≥ 2), unique, sorted."""
    if num_snapshots <= 0 or num_steps <= 0:
        return []
    if num_snapshots == 1:
        return [0]
    idx = np.round(np.linspace(0, num_steps - 1, min(num_snapshots, num_steps))).astype(int)
    return sorted(set(int(i) for i in idx))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def generate(
    model: nn.Module,
    labels,
    *,
    sampler: str = "ddpm",
    num_sampling_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_channels: int | None = None,
    tail_dropping_fraction: float = 0.0,
    uncond_tail_dropping_fraction: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    num_snapshots: int = 8,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = False,
    eta: float = 0.0,
) -> SampleResult:
    """Sample one image per label from ``model`` (a DiT or a DC-DiT).

    Args:
        model: a DiT (forward returns a tensor) or DC-DiT (returns ``(tensor, RoutingRecord)``).
            It needs ``num_classes``, ``learn_sigma``, ``in_channels`` and ``grid``. It is switched to
            eval mode for sampling (and back to its previous mode afterwards), and moved to
            ``device`` when one is given.
        labels: (B,) integer class labels in [0, num_classes).
        sampler: ``"ddpm"`` (ancestral; respacing ``str(num_sampling_steps)``) or ``"ddim"``
            (respacing ``f"ddim{num_sampling_steps}"``, ``eta`` 0 = deterministic).
        cfg_scale: guidance scale; classifier-free guidance is used iff ``cfg_scale != 1.0``.
        guidance_channels: guide only the first k ε channels (3 reproduces the DiT release on
            4-channel latents); None guides all.
        tail_dropping_fraction: DC-DiT elastic inference fraction f (the conditional half with CFG).
        uncond_tail_dropping_fraction: Lite-CFG fraction of the unconditional half (None = same f).
        seed: seeds the CPU generator of all noise.
        device: where to run (default: the model's device).
        progress: show a tqdm bar.
        num_snapshots: how many evenly spaced steps keep x_t and the routing maps (DC-DiT).
        noise: optional initial noise (B, C, H, W) replacing the seeded draw.
        clip_denoised: clamp the x_0 prediction to [-1, 1] at every step (DiT: False).
        eta: DDIM stochasticity, >= 0 (0 = deterministic, 1 = DDPM-like noise); DDPM refuses eta != 0.

    Returns:
        :class:`SampleResult`.
    """
    from .diffusion import create_diffusion

    inner = unwrap(model)
    num_classes = int(inner.num_classes)
    in_channels = int(inner.in_channels)
    H, W = (int(s) for s in inner.grid)
    is_dcdit = _is_dcdit(model)

    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if int(num_sampling_steps) < 1:
        raise ValueError(f"num_sampling_steps must be at least 1, got {num_sampling_steps}")
    if float(eta) < 0 or (float(eta) != 0 and sampler != "ddim"):
        raise ValueError(f"eta = {eta}: eta is DDIM's noise scale, >= 0 and only with sampler 'ddim' (--sampler ddim)")
    _check_fraction("tail_dropping_fraction", tail_dropping_fraction)
    _check_fraction("uncond_tail_dropping_fraction", uncond_tail_dropping_fraction)
    if not is_dcdit and (float(tail_dropping_fraction) > 0 or uncond_tail_dropping_fraction not in (None, 0, 0.0)):
        raise ValueError("tail-dropping applies to DC-DiT only; this DiT has fixed patches (use fractions 0 / None)")
    y = _check_labels(labels, num_classes)
    B = len(y)
    use_cfg = float(cfg_scale) != 1.0
    if use_cfg and float(getattr(inner, "class_dropout_prob", 0.1)) <= 0:
        raise ValueError(
            "classifier-free guidance needs the null class, but the model was built with class_dropout_prob=0 "
            "(no null embedding); use cfg_scale=1.0"
        )

    if device is not None:
        device = torch.device(device)
        model.to(device)
    else:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")

    respacing = str(int(num_sampling_steps)) if sampler == "ddpm" else f"ddim{int(num_sampling_steps)}"
    # the schedule the model was trained with (older checkpoints: DiT's linear one)
    diffusion = create_diffusion(respacing, noise_schedule=getattr(inner, "noise_schedule", "linear"),
                                 learn_sigma=bool(inner.learn_sigma))
    timestep_map = list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))
    K = diffusion.num_timesteps

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (B, in_channels, H, W)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        z = noise.detach().float().cpu()
    else:
        z = torch.randn(shape, generator=gen)

    # ---- the model function handed to the diffusion (always returns an fp32 prediction)
    if use_cfg:
        y_in = torch.cat([y, torch.full_like(y, num_classes)]).to(device)
        if is_dcdit:
            def call(x, t):
                return model.forward_with_cfg(
                    x, t, y_in, cfg_scale,
                    tail_dropping_fraction=float(tail_dropping_fraction),
                    uncond_tail_dropping_fraction=(
                        None if uncond_tail_dropping_fraction is None else float(uncond_tail_dropping_fraction)
                    ),
                    guidance_channels=guidance_channels,
                )
        else:
            def call(x, t):
                return model.forward_with_cfg(x, t, y_in, cfg_scale, guidance_channels=guidance_channels)
    else:
        y_in = y.to(device)
        if is_dcdit:
            def call(x, t):
                return model(x, t, y_in, tail_dropping_fraction=float(tail_dropping_fraction))
        else:
            def call(x, t):
                return model(x, t, y_in)

    def model_fn(x, t):
        with _autocast(device):
            out = call(x, t)
        if isinstance(out, (tuple, list)):
            return (out[0].float(), *out[1:])
        return out.float()

    nb = 2 * B if use_cfg else B
    img = (torch.cat([z, z]) if use_cfg else z).to(device)
    step_fn = diffusion.p_sample if sampler == "ddpm" else diffusion.ddim_sample
    step_kwargs = dict(clip_denoised=clip_denoised) if sampler == "ddpm" else dict(clip_denoised=clip_denoised, eta=eta)
    snap_at = set(snapshot_steps(K, num_snapshots)) if is_dcdit else set()
    n_patches = None
    if not is_dcdit:
        tg = getattr(inner, "token_grid", None)
        if tg is None:
            P = int(getattr(inner, "patch_size", 1))
            tg = (H // P, W // P)
        n_patches = int(tg[0]) * int(tg[1])

    indices = list(range(K))[::-1]
    iterator = indices
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(indices, desc=f"{sampler} {K} steps")

    trace: list[dict] = []
    snapshots: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for step, i in enumerate(iterator):
                t = torch.full((nb,), i, device=device, dtype=torch.long)
                step_noise = torch.randn(shape, generator=gen)
                step_noise = (torch.cat([step_noise, step_noise]) if use_cfg else step_noise).to(device)
                out = step_fn(model_fn, img, t, noise=step_noise, **step_kwargs)
                rec = out.get("aux")
                entry: dict[str, Any] = {"t": int(timestep_map[i]), "step": step, "tokens": H * W}
                if rec is not None:
                    cond = rec.split(2)[0] if use_cfg else rec
                    entry["kept"] = cond.kept_count.detach().cpu().long()
                    entry["natural"] = cond.natural_mask.sum(1).detach().cpu().long()
                    if cond.dydit is not None:  # DyDiT gates: what each inner block really executed
                        entry["dydit"] = dydit_usage(cond)
                    if use_cfg:
                        unc = rec.split(2)[1]
                        entry["uncond_kept"] = unc.kept_count.detach().cpu().long()
                        entry["uncond_natural"] = unc.natural_mask.sum(1).detach().cpu().long()
                        if unc.dydit is not None:
                            entry["uncond_dydit"] = dydit_usage(unc)
                else:
                    full = torch.full((B,), n_patches if n_patches is not None else H * W, dtype=torch.long)
                    entry["kept"] = full
                    entry["natural"] = full.clone()
                    if use_cfg:
                        entry["uncond_kept"] = full.clone()
                        entry["uncond_natural"] = full.clone()
                trace.append(entry)
                if step in snap_at and rec is not None:
                    snap = {
                        "t": int(timestep_map[i]),
                        "step": step,
                        "x_t": img[:B].detach().float().cpu().clone(),
                        "pred_xstart": out["pred_xstart"][:B].detach().float().cpu().clone(),
                        "p": cond.p.detach().float().cpu().reshape(B, H, W).clone(),
                        "kept_mask": cond.kept_mask.detach().cpu().reshape(B, H, W).clone(),
                        "natural_mask": cond.natural_mask.detach().cpu().reshape(B, H, W).clone(),
                    }
                    if use_cfg:
                        snap["uncond_p"] = unc.p.detach().float().cpu().reshape(B, H, W).clone()
                        snap["uncond_kept_mask"] = unc.kept_mask.detach().cpu().reshape(B, H, W).clone()
                    snapshots.append(snap)
                img = out["sample"]
    finally:
        model.train(was_training)

    samples = img[:B].clone()
    settings = dict(
        arch="dcdit" if is_dcdit else "dit",
        sampler=sampler,
        num_sampling_steps=int(num_sampling_steps),
        timestep_respacing=str(int(num_sampling_steps)) if sampler == "ddpm" else f"ddim{int(num_sampling_steps)}",
        cfg=use_cfg,
        cfg_scale=float(cfg_scale),
        guidance_channels=guidance_channels,
        tail_dropping_fraction=float(tail_dropping_fraction),
        uncond_tail_dropping_fraction=(
            None if uncond_tail_dropping_fraction is None else float(uncond_tail_dropping_fraction)
        ),
        seed=int(seed),
        device=str(device),
        precision="bf16-autocast" if device.type == "cuda" else "fp32",
        clip_denoised=bool(clip_denoised),
        eta=float(eta) if sampler == "ddim" else None,
        custom_noise=noise is not None,
        num_classes=num_classes,
    )
    return SampleResult(samples=samples, trace=trace, snapshots=snapshots, labels=y, settings=settings)


# ------------------------------------------------------------------------------- images and files


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> uint8 (B, H, W, 3), as DiT's ``sample_ddp.py`` does it.

    DiT computes ``clamp(127.5·x + 128, 0, 255)`` and casts to uint8 (truncation), i.e. it rounds
    ``(x + 1)·127.5`` half up. 1-channel images are replicated to 3 channels; 3-channel images pass
    through; anything else (e.g. 4-channel latents: decode them first) is refused.
    Raises ValueError when the input has NaN or inf values (saying how many).
    """
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    C = x.shape[1]
    if C not in (1, 3):
        raise ValueError(f"expected 1 or 3 channels (decode latents to pixels first), got {C}")
    x = x.detach().float().cpu()
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"images contain {bad} NaN/inf values (of {x.numel()}); refusing to convert")
    if C == 1:
        x = x.expand(-1, 3, -1, -1)
    u8 = torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().numpy()


def write_npz(images_uint8: np.ndarray, path, labels: np.ndarray | None = None) -> str:
    """Write uint8 (N, H, W, 3) images under key ``arr_0``: the input format of OpenAI's ADM
    evaluation suite (``evaluator.py``); class labels, if given, go under ``arr_1`` (guided-diffusion's
    convention). Creates parent directories; returns the written path (".npz" is appended when
    missing, as ``np.savez`` does)."""
    arr = np.asarray(images_uint8)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (use to_uint8_images), got dtype {arr.dtype}")
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {arr.shape}")
    path = str(path)
    if not path.endswith(".npz"):
        path += ".npz"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if labels is None:
        np.savez(path, arr_0=arr)
    else:
        labels = np.asarray(labels)
        if labels.shape != (arr.shape[0],):
            raise ValueError(f"labels must have shape ({arr.shape[0]},), got {labels.shape}")
        np.savez(path, arr_0=arr, arr_1=labels)
    return path


def save_settings_json(path, settings: dict) -> str:
    """Write ``settings`` (every knob the caller used) plus the provenance: dcdit and torch
    versions, python version, device (``settings["device"]`` or the best available), and the date
    (ISO 8601, local time with offset). Creates parent directories; returns the path."""
    from . import __version__

    device = settings.get("device")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    meta = {
        "dcdit_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        meta["cuda_device_name"] = torch.cuda.get_device_name(torch.device(str(device)))
    data = {**jsonable(settings), **meta}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    return str(path)
