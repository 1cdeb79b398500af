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
  convention); ``dcdit.models.interface.predict_guided`` guides, and the first half is returned.
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
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .models.dydit import dydit_usage
from .models.guidance import cfg_labels
from .models.interface import predict, predict_guided, routes_tokens
from .utils import jsonable, unwrap

__all__ = [
    "SampleResult",
    "generate",
    "check_labels",
    "check_sampling_args",
    "sampling_diffusion",
    "model_function",
    "sampler_step",
    "trace_entry",
    "snapshot",
    "snapshot_steps",
    "fixed_token_count",
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


def check_labels(labels, num_classes: int) -> torch.Tensor:
    """Class labels -> (B,) long on the CPU; refuses anything but a non-empty 1-D integer sequence in [0, num_classes)."""
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


def check_sampling_args(model: nn.Module, sampler: str, num_sampling_steps: int, cfg_scale: float, eta: float,
                        tail_dropping_fraction: float, uncond_tail_dropping_fraction: float | None) -> None:
    """Every knob of :func:`generate` that can be wrong, refused with a ValueError that says why."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if int(num_sampling_steps) < 1:
        raise ValueError(f"num_sampling_steps must be at least 1, got {num_sampling_steps}")
    if float(eta) < 0 or (float(eta) != 0 and sampler != "ddim"):
        raise ValueError(f"eta = {eta}: eta is DDIM's noise scale, >= 0 and only with sampler 'ddim' (--sampler ddim)")
    for name, f in (("tail_dropping_fraction", tail_dropping_fraction),
                    ("uncond_tail_dropping_fraction", uncond_tail_dropping_fraction)):
        if f is not None and not (0.0 <= float(f) < 1.0):
            raise ValueError(f"{name} must lie in [0, 1), got {f}")
    if not routes_tokens(model) and (float(tail_dropping_fraction) > 0 or uncond_tail_dropping_fraction not in (None, 0, 0.0)):
        raise ValueError("tail-dropping applies to DC-DiT only; this DiT has fixed patches (use fractions 0 / None)")
    if float(cfg_scale) != 1.0 and float(getattr(unwrap(model), "class_dropout_prob", 0.1)) <= 0:
        raise ValueError(
            "classifier-free guidance needs the null class, but the model was built with class_dropout_prob=0 "
            "(no null embedding); use cfg_scale=1.0"
        )


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


def respacing(sampler: str, num_sampling_steps: int) -> str:
    """The ``timestep_respacing`` of a sampler: ``"250"`` (DDPM, evenly spaced) or ``"ddim50"``."""
    return str(int(num_sampling_steps)) if sampler == "ddpm" else f"ddim{int(num_sampling_steps)}"


def sampling_diffusion(model: nn.Module, sampler: str, num_sampling_steps: int):
    """The respaced diffusion of the schedule the model was trained with (older checkpoints: DiT's linear one)."""
    from .diffusion import create_diffusion

    inner = unwrap(model)
    return create_diffusion(respacing(sampler, num_sampling_steps), noise_schedule=getattr(inner, "noise_schedule", "linear"),
                            learn_sigma=bool(inner.learn_sigma))


def model_function(model: nn.Module, labels: torch.Tensor, *, cfg_scale: float = 1.0, guidance_channels: int | None = None,
                   tail_dropping_fraction: float = 0.0, uncond_tail_dropping_fraction: float | None = None,
                   device: torch.device | None = None):
    """``(x, t) -> (fp32 prediction, RoutingRecord or None)``: the model call of one sampling step.

    Without guidance (``cfg_scale == 1``) the batch is ``labels``; with it, [labels; null] and the
    guided prediction (:func:`~dcdit.models.interface.predict_guided`). CUDA runs under bf16 autocast."""
    device = torch.device(device) if device is not None else labels.device
    f, f_u = float(tail_dropping_fraction), None if uncond_tail_dropping_fraction is None else float(uncond_tail_dropping_fraction)
    if float(cfg_scale) != 1.0:
        y = cfg_labels(labels, int(unwrap(model).num_classes)).to(device)

        def call(x, t):
            return predict_guided(model, x, t, y, cfg_scale, tail_dropping_fraction=f, uncond_tail_dropping_fraction=f_u,
                                  guidance_channels=guidance_channels)
    else:
        y = labels.to(device)

        def call(x, t):
            return predict(model, x, t, y, tail_dropping_fraction=f)

    def model_fn(x, t):
        with _autocast(device):
            out, record = call(x, t)
        return out.float(), record

    return model_fn


def sampler_step(diffusion, sampler: str, *, clip_denoised: bool = False, eta: float = 0.0):
    """``(model_fn, x_t, t, noise) -> {"sample", "pred_xstart", "aux"}``: one DDPM or DDIM step."""
    if sampler == "ddpm":
        return lambda model_fn, x, t, noise: diffusion.p_sample(model_fn, x, t, noise=noise, clip_denoised=clip_denoised)
    return lambda model_fn, x, t, noise: diffusion.ddim_sample(model_fn, x, t, noise=noise, clip_denoised=clip_denoised, eta=eta)


def fixed_token_count(model: nn.Module) -> int:
    """Tokens a model without routing processes per sample: a DiT's (H/P)·(W/P) patches (H·W without a patch size)."""
    inner = unwrap(model)
    grid = getattr(inner, "token_grid", None)
    if grid is None:
        P = int(getattr(inner, "patch_size", 1))
        grid = (inner.grid[0] // P, inner.grid[1] // P)
    return int(grid[0]) * int(grid[1])


def _halves(record, guided: bool) -> tuple:
    """(conditional, unconditional) records of a step; (record, None) without guidance."""
    if record is None:
        return None, None
    return tuple(record.split(2)) if guided else (record, None)


def _token_counts(record, batch: int, fixed_tokens: int) -> dict:
    if record is None:  # fixed patches: every sample keeps them all
        full = torch.full((batch,), fixed_tokens, dtype=torch.long)
        return {"kept": full, "natural": full.clone()}
    counts = {"kept": record.kept_count.detach().cpu().long(), "natural": record.natural_mask.sum(1).detach().cpu().long()}
    if record.dydit is not None:  # DyDiT gates: what each inner block really executed
        counts["dydit"] = dydit_usage(record)
    if record.dechunk_pairs is not None:  # the packed de-chunk ran the window-pairs form (dcdit.flops)
        counts["dechunk_pairs"] = record.dechunk_pairs.detach().cpu().long()
    return counts


def trace_entry(step: int, t: int, record, *, batch: int, tokens: int, guided: bool, fixed_tokens: int) -> dict:
    """One :attr:`SampleResult.trace` entry: the step, its original timestep and the tokens each half kept."""
    cond, uncond = _halves(record, guided)
    entry: dict[str, Any] = {"t": t, "step": step, "tokens": tokens, **_token_counts(cond, batch, fixed_tokens)}
    if guided:
        entry.update({f"uncond_{k}": v for k, v in _token_counts(uncond, batch, fixed_tokens).items()})
    return entry


def snapshot(step: int, t: int, x_t: torch.Tensor, pred_xstart: torch.Tensor, record, *, guided: bool) -> dict:
    """One :attr:`SampleResult.snapshots` entry (CPU copies): x_t, x̂0 and the routing maps of the conditional half."""
    cond, uncond = _halves(record, guided)
    B, (H, W) = cond.p.shape[0], cond.grid

    def grid_map(v, dtype=None):
        v = v.detach().cpu()
        return (v.float() if dtype is torch.float32 else v).reshape(B, H, W).clone()

    snap = {"t": t, "step": step, "x_t": x_t[:B].detach().float().cpu().clone(),
            "pred_xstart": pred_xstart[:B].detach().float().cpu().clone(),
            "p": grid_map(cond.p, torch.float32), "kept_mask": grid_map(cond.kept_mask), "natural_mask": grid_map(cond.natural_mask)}
    if guided:
        snap["uncond_p"], snap["uncond_kept_mask"] = grid_map(uncond.p, torch.float32), grid_map(uncond.kept_mask)
    return snap


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        device = torch.device(device)
        model.to(device)
        return device
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


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

    The loop is: model call (with guidance) → sampler step → trace (and a snapshot at some steps),
    each a function of this module that can be used and tested on its own.

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
    check_sampling_args(model, sampler, num_sampling_steps, cfg_scale, eta, tail_dropping_fraction, uncond_tail_dropping_fraction)
    inner = unwrap(model)
    y = check_labels(labels, int(inner.num_classes))
    guided, routed, B = float(cfg_scale) != 1.0, routes_tokens(model), len(y)
    device = _device_of(model, device)
    diffusion = sampling_diffusion(model, sampler, num_sampling_steps)
    model_fn = model_function(model, y, cfg_scale=cfg_scale, guidance_channels=guidance_channels, device=device,
                              tail_dropping_fraction=tail_dropping_fraction,
                              uncond_tail_dropping_fraction=uncond_tail_dropping_fraction)
    step_fn = sampler_step(diffusion, sampler, clip_denoised=clip_denoised, eta=eta)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    shape = (B, int(inner.in_channels), *(int(s) for s in inner.grid))
    z = _initial_noise(shape, gen, noise)
    img = (torch.cat([z, z]) if guided else z).to(device)
    K, timestep_map = diffusion.num_timesteps, list(getattr(diffusion, "timestep_map", range(diffusion.num_timesteps)))
    snap_at = set(snapshot_steps(K, num_snapshots)) if routed else set()
    counts = dict(batch=B, tokens=shape[2] * shape[3], guided=guided, fixed_tokens=None if routed else fixed_token_count(model))
    trace, snapshots = [], []
    with _eval_mode(model), torch.no_grad():
        for step, i in enumerate(_progress(list(range(K))[::-1], progress, f"{sampler} {K} steps")):
            t = torch.full((len(img),), i, device=device, dtype=torch.long)
            step_noise = torch.randn(shape, generator=gen)
            out = step_fn(model_fn, img, t, (torch.cat([step_noise, step_noise]) if guided else step_noise).to(device))
            record = out.get("aux")
            trace.append(trace_entry(step, int(timestep_map[i]), record, **counts))
            if step in snap_at and record is not None:
                snapshots.append(snapshot(step, int(timestep_map[i]), img, out["pred_xstart"], record, guided=guided))
            img = out["sample"]
    settings = _settings(inner, routed, device, sampler=sampler, num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
                         guidance_channels=guidance_channels, tail_dropping_fraction=tail_dropping_fraction,
                         uncond_tail_dropping_fraction=uncond_tail_dropping_fraction, seed=seed,
                         clip_denoised=clip_denoised, eta=eta, custom_noise=noise is not None)
    return SampleResult(samples=img[:B].clone(), trace=trace, snapshots=snapshots, labels=y, settings=settings)


def _initial_noise(shape: tuple, gen: torch.Generator, noise: torch.Tensor | None) -> torch.Tensor:
    if noise is None:
        return torch.randn(shape, generator=gen)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    return noise.detach().float().cpu()


def _progress(steps: list, enabled: bool, desc: str):
    if not enabled:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc)


def _settings(inner: nn.Module, routed: bool, device: torch.device, *, sampler, num_sampling_steps, cfg_scale, guidance_channels,
              tail_dropping_fraction, uncond_tail_dropping_fraction, seed, clip_denoised, eta, custom_noise) -> dict:
    """:attr:`SampleResult.settings`: the arguments of a :func:`generate` call, JSON-serialisable."""
    return dict(
        arch="dcdit" if routed else "dit",
        sampler=sampler,
        num_sampling_steps=int(num_sampling_steps),
        timestep_respacing=respacing(sampler, num_sampling_steps),
        cfg=float(cfg_scale) != 1.0,
        cfg_scale=float(cfg_scale),
        guidance_channels=guidance_channels,
        tail_dropping_fraction=float(tail_dropping_fraction),
        uncond_tail_dropping_fraction=None if uncond_tail_dropping_fraction is None else float(uncond_tail_dropping_fraction),
        seed=int(seed),
        device=str(device),
        precision="bf16-autocast" if device.type == "cuda" else "fp32",
        clip_denoised=bool(clip_denoised),
        eta=float(eta) if sampler == "ddim" else None,
        custom_noise=custom_noise,
        num_classes=int(inner.num_classes),
    )


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
