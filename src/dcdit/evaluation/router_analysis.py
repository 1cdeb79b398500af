"""Where does the DC-DiT router spend its tokens?

* :func:`foreground_retention` – noise real images to a timestep t with ``q_sample`` (fixed seed),
  run the DC-DiT forward, and compare the share of foreground tokens kept with the share of
  background tokens kept. Foreground = clean-image pixels above ``threshold`` (MNIST in [-1, 1]:
  ink > 0), or a user mask (N, H, W) on the token grid — required for latent models, whose grid is
  the latent grid (e.g. a segmentation mask downsampled 8×).
* :func:`foreground_retention_curve` – the same over several timesteps.
* :func:`compression_vs_timestep` – from a sampling trace (``generate(...).trace``): t and the mean /
  min / max compression ratio L / kept tokens per step.
* :func:`plot_router_analysis` – PNG figures and a JSON of all the numbers.
* :func:`analyze_router` – all of it for a checkpoint (``dcdit analyze-router``).

The figures and the JSON layout: docs/evaluation.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..models.interface import predict, routes_tokens
from ..utils import atomic_write_text, jsonable, unwrap

__all__ = [
    "foreground_masks",
    "foreground_retention",
    "foreground_retention_curve",
    "compression_vs_timestep",
    "plot_router_analysis",
    "load_analysis_images",
    "analyze_router",
    "retention_summary",
]


def foreground_masks(images: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """(N, C, H, W) clean images -> (N, H, W) bool: channel mean > threshold."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    return images.float().mean(1) > threshold


def _nanmean(a: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


def _foreground(images: torch.Tensor, threshold: float, masks) -> tuple[torch.Tensor, str]:
    """(N, H, W) bool foreground on the token grid and where it came from (clean pixels or user masks)."""
    N, C, H, W = images.shape
    if masks is None:
        if C != 1 and C != 3:
            raise ValueError(f"{C}-channel inputs (latents?) need explicit foreground masks of shape (N, H, W)")
        return foreground_masks(images, threshold), f"clean image channel mean > {threshold}"
    fg = torch.as_tensor(masks)
    if tuple(fg.shape) != (N, H, W):
        raise ValueError(f"masks must have shape (N, H, W) = {(N, H, W)} (the token grid), got {tuple(fg.shape)}")
    return fg.bool(), "user masks"


def _check_images(inner: nn.Module, images: torch.Tensor, t: int, diffusion_steps: int) -> None:
    """Images (N, C, H, W) on the model's token grid and t in [0, diffusion_steps), or ValueError."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    H, W = images.shape[-2:]
    grid = tuple(int(g) for g in getattr(inner, "grid", (H, W)))
    if (H, W) != grid:
        raise ValueError(f"images are {H}x{W} but the model's token grid is {grid[0]}x{grid[1]}"
                         f" (for latent models pass latents, and masks at the latent resolution)")
    if not 0 <= int(t) < diffusion_steps:
        raise ValueError(f"t must lie in [0, {diffusion_steps}), got {t}")


def _check_labels(labels, n: int) -> torch.Tensor:
    y = torch.as_tensor(labels).long().reshape(-1)
    if len(y) != n:
        raise ValueError(f"labels must have shape ({n},), got {tuple(y.shape)}")
    return y


def _noised(images: torch.Tensor, t: int, seed: int, schedule: str, diffusion_steps: int):
    """(x_t = q_sample(x_0, t, ε) with ε from a CPU generator seeded with ``seed``, t as (N,) long)."""
    from ..diffusion import create_diffusion

    diffusion = create_diffusion("", noise_schedule=schedule, diffusion_steps=diffusion_steps)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(int(seed)))
    tt = torch.full((images.shape[0],), int(t), dtype=torch.long)
    return diffusion.q_sample(images.float().cpu(), tt, noise=noise), tt


def _routing_maps(model: nn.Module, x_t, tt, y, tail_dropping_fraction: float, batch_size: int | None, grid):
    """Forward passes in eval mode -> (kept, natural, p), each (N, H, W) on the CPU, from the RoutingRecord."""
    if not routes_tokens(model):
        raise TypeError("foreground_retention needs a DC-DiT (a model that routes tokens and returns a RoutingRecord)")
    H, W = grid
    device = next(iter(model.parameters())).device if any(True for _ in model.parameters()) else torch.device("cpu")
    was_training = model.training
    model.eval()
    kept, natural, p = [], [], []
    bs = batch_size or len(x_t)
    try:
        for i in range(0, len(x_t), bs):
            _, rec = predict(model, x_t[i: i + bs].to(device), tt[i: i + bs].to(device), y[i: i + bs].to(device),
                             tail_dropping_fraction=float(tail_dropping_fraction))
            kept.append(rec.kept_mask.detach().cpu().reshape(-1, H, W))
            natural.append(rec.natural_mask.detach().cpu().reshape(-1, H, W))
            p.append(rec.p.detach().float().cpu().reshape(-1, H, W))
    finally:
        model.train(was_training)
    return torch.cat(kept), torch.cat(natural), torch.cat(p)


def _retention_stats(fg: torch.Tensor, kept_m: torch.Tensor, nat_m: torch.Tensor, p_m: torch.Tensor) -> dict:
    """Per-sample and averaged shares of foreground / background tokens kept (see :func:`foreground_retention`)."""
    bg = ~fg
    n_fg, n_bg = fg.flatten(1).sum(1).double(), bg.flatten(1).sum(1).double()
    k_fg, k_bg = (kept_m & fg).flatten(1).sum(1).double(), (kept_m & bg).flatten(1).sum(1).double()
    n_kept = kept_m.flatten(1).sum(1).double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp_min(1), nan).numpy()

    p_fg = torch.where(n_fg > 0, (p_m.double() * fg).flatten(1).sum(1) / n_fg.clamp_min(1), nan).numpy()
    p_bg = torch.where(n_bg > 0, (p_m.double() * bg).flatten(1).sum(1) / n_bg.clamp_min(1), nan).numpy()
    fg_ret, bg_ret, share = ratio(k_fg, n_fg), ratio(k_bg, n_bg), ratio(k_fg, n_kept)
    L = fg.shape[-2] * fg.shape[-1]
    tot_fg, tot_bg = float(n_fg.sum()), float(n_bg.sum())
    return {
        "fg_retention": fg_ret.tolist(),
        "bg_retention": bg_ret.tolist(),
        "fg_share_of_kept": share.tolist(),
        "fg_fraction": (n_fg / L).numpy().tolist(),
        "kept": n_kept.long().tolist(),
        "natural_kept": nat_m.flatten(1).sum(1).tolist(),
        "mean_p_fg": p_fg.tolist(),
        "mean_p_bg": p_bg.tolist(),
        "mean_fg_retention": _nanmean(fg_ret),
        "mean_bg_retention": _nanmean(bg_ret),
        "mean_fg_share_of_kept": _nanmean(share),
        "mean_fg_fraction": float((n_fg / L).mean()),
        "mean_compression_ratio": float((L / n_kept.clamp_min(1)).mean()),
        "mean_p_fg_avg": _nanmean(p_fg),
        "mean_p_bg_avg": _nanmean(p_bg),
        "pooled_fg_retention": float(k_fg.sum()) / tot_fg if tot_fg else None,
        "pooled_bg_retention": float(k_bg.sum()) / tot_bg if tot_bg else None,
    }


@torch.no_grad()
def foreground_retention(
    model: nn.Module,
    images: torch.Tensor,
    labels,
    t: int,
    threshold: float = 0.0,
    masks: torch.Tensor | None = None,
    *,
    seed: int = 0,
    tail_dropping_fraction: float = 0.0,
    batch_size: int | None = None,
    diffusion_steps: int = 1000,
    noise_schedule: str | None = None,
) -> dict:
    """Share of foreground vs background tokens the router keeps at timestep ``t``.

    Args:
        model: a DC-DiT (forward returns ``(out, RoutingRecord)``), put in eval mode for the call.
        images: (N, C, H, W) clean inputs in model space (pixels in [-1, 1] or latents), H×W = the
            model's token grid.
        labels: (N,) class labels (use ``model.num_classes`` for the null label).
        t: timestep in [0, diffusion_steps); x_t = q_sample(x_0, t, noise) with noise drawn from a
            CPU generator seeded with ``seed`` (the same noise for every t and call).
        threshold: foreground = channel mean of the clean image > threshold (when ``masks`` is None).
        masks: optional (N, H, W) bool foreground masks on the token grid (needed for latents).
        tail_dropping_fraction: elastic-inference fraction passed to the forward.
        batch_size: forward batch size (default: all at once).
        noise_schedule: the schedule of q_sample (default: the model's ``noise_schedule``).

    Returns:
        dict: ``t``; per sample (lists of N) ``fg_retention`` = kept fg / fg tokens,
        ``bg_retention`` = kept bg / bg tokens (NaN when a sample has no fg / bg tokens),
        ``fg_share_of_kept`` = fg among kept, ``fg_fraction`` = fg / L, ``kept``, ``natural_kept``
        and ``mean_p_fg`` / ``mean_p_bg`` (boundary probabilities); and the averages over samples
        (NaN-ignoring) ``mean_fg_retention``, ``mean_bg_retention``, ``mean_fg_share_of_kept``,
        ``mean_fg_fraction``, ``mean_compression_ratio``, ``pooled_fg_retention`` (all fg tokens of all
        samples together), ``pooled_bg_retention``; plus ``num_samples``, ``tokens``, ``seed``,
        ``tail_dropping_fraction``, ``mask_source``.
    """
    inner = unwrap(model)
    _check_images(inner, images, t, diffusion_steps)
    N, _, H, W = images.shape
    fg, mask_source = _foreground(images, threshold, masks)
    y = _check_labels(labels, N)
    schedule = noise_schedule or getattr(inner, "noise_schedule", "linear")  # default: the model's own
    x_t, tt = _noised(images, t, seed, schedule, diffusion_steps)
    kept_m, nat_m, p_m = _routing_maps(model, x_t, tt, y, tail_dropping_fraction, batch_size, (H, W))
    return {
        "t": int(t),
        "num_samples": int(N),
        "tokens": int(H * W),
        "seed": int(seed),
        "tail_dropping_fraction": float(tail_dropping_fraction),
        "mask_source": mask_source,
        **_retention_stats(fg, kept_m, nat_m, p_m),
        "_masks": {"foreground": fg, "kept": kept_m, "p": p_m, "x_t": x_t},  # for plots; dropped from JSON
    }


def foreground_retention_curve(model, images, labels, timesteps: Sequence[int], threshold: float = 0.0,
                               masks=None, **kwargs) -> list[dict]:
    """:func:`foreground_retention` at every t in ``timesteps`` (same noise for all)."""
    return [foreground_retention(model, images, labels, int(t), threshold, masks, **kwargs) for t in timesteps]


def compression_vs_timestep(trace) -> dict:
    """A sampling trace (``SampleResult`` or its ``.trace`` list) -> numpy arrays per step.

    ``t`` (the original timestep of each step, sampling order), ``step``, ``mean`` / ``min`` /
    ``max`` of the compression ratio L / kept over samples, ``natural_mean`` / ``natural_min`` /
    ``natural_max`` (before tail-dropping) when recorded, and ``uncond_*`` for the unconditional
    half of a CFG batch.
    """
    trace = getattr(trace, "trace", trace)
    if not trace:
        raise ValueError("empty trace")
    t = np.array([e["t"] for e in trace], dtype=np.int64)
    L = np.array([e["tokens"] for e in trace], dtype=np.float64)[:, None]
    out = {"t": t, "step": np.array([e.get("step", i) for i, e in enumerate(trace)], dtype=np.int64)}
    for key, prefix in (("kept", ""), ("natural", "natural_"), ("uncond_kept", "uncond_"), ("uncond_natural", "uncond_natural_")):
        if key not in trace[0]:
            continue
        kept = np.stack([np.asarray(torch.as_tensor(e[key]).cpu(), dtype=np.float64).reshape(-1) for e in trace])
        r = L / np.maximum(kept, 1.0)  # (steps, B)
        out[prefix + "mean"], out[prefix + "min"], out[prefix + "max"] = r.mean(1), r.min(1), r.max(1)
    return out


def _public(d):
    """``d`` without the entries whose key starts with ``_`` (the tensors kept for the plots), at any depth."""
    if isinstance(d, dict):
        return {k: _public(v) for k, v in d.items() if not str(k).startswith("_")}
    if isinstance(d, (list, tuple)):
        return [_public(v) for v in d]
    return d


def _save(fig, path: Path, dpi: int) -> str:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def _plot_retention_curve(rets: list[dict], path: Path, dpi: int) -> str:
    """Mean fg / bg retention and fg share of kept tokens against t (high t on the left)."""
    import matplotlib.pyplot as plt

    ts = np.array([r["t"] for r in rets], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    for key, label, c in (("mean_fg_retention", "foreground tokens kept", "C0"),
                          ("mean_bg_retention", "background tokens kept", "C3"),
                          ("mean_fg_share_of_kept", "foreground share of kept tokens", "C2")):
        vals = np.array([np.nan if r[key] is None else r[key] for r in rets], dtype=float)
        ax.plot(ts, vals, "o-", color=c, label=label)
    ff = np.array([r["mean_fg_fraction"] for r in rets], dtype=float)
    ax.plot(ts, ff, ":", color="gray", label="foreground fraction of the image")
    ax.set_xlim(max(999.0, ts.max()), min(0.0, ts.min()))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("timestep t of the noised input (sampling direction →)")
    ax.set_ylabel("share")
    ax.set_title(f"Router retention of foreground vs background ({rets[0]['num_samples']} images)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def _plot_retention_examples(withm: list[dict], num_examples: int, path: Path, dpi: int) -> str:
    """Per example: the foreground, then x_t and the kept tokens (cyan fg, red bg) at every t."""
    import matplotlib.pyplot as plt

    k = min(num_examples, withm[0]["num_samples"])
    cols = len(withm)
    fig, axes = plt.subplots(k, 1 + 2 * cols, figsize=(1.3 * (1 + 2 * cols), 1.3 * k), squeeze=False)
    for i in range(k):
        fg = withm[0]["_masks"]["foreground"][i].numpy()
        axes[i, 0].imshow(fg, cmap="gray", vmin=0, vmax=1)
        for j, r in enumerate(withm):
            xt = r["_masks"]["x_t"][i].float().mean(0).numpy()
            axes[i, 1 + 2 * j].imshow(xt, cmap="gray")
            kept = r["_masks"]["kept"][i].numpy().astype(float)
            rgb = np.stack([kept * (~fg), kept * fg, kept * fg], -1)  # cyan: kept fg, red: kept bg
            axes[i, 2 + 2 * j].imshow(rgb)
            if i == 0:
                axes[0, 1 + 2 * j].set_title(f"x_t, t={r['t']}", fontsize=7)
                axes[0, 2 + 2 * j].set_title("kept (cyan fg, red bg)", fontsize=6)
    axes[0, 0].set_title("foreground", fontsize=7)
    for a in axes.ravel():
        a.set_axis_off()
    fig.tight_layout()
    return _save(fig, path, dpi)


def _plot_compression(compression: dict, path: Path, dpi: int) -> str:
    """Mean compression ratio L / kept against t with the min..max band (and the unconditional half)."""
    import matplotlib.pyplot as plt

    t = np.asarray(compression["t"], dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    ax.plot(t, compression["mean"], color="C0", label="L / kept (mean)")
    ax.fill_between(t, compression["min"], compression["max"], color="C0", alpha=0.2, linewidth=0, label="min..max")
    if "uncond_mean" in compression:
        ax.plot(t, compression["uncond_mean"], color="C3", label="uncond: L / kept (mean)")
    ax.set_xlim(max(999.0, t.max()), min(0.0, t.min()))
    ax.set_xlabel("timestep t (sampling direction →)")
    ax.set_ylabel("compression ratio L / kept tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, dpi)


def plot_router_analysis(out_dir, retention: dict | list[dict] | None = None, compression: dict | None = None,
                         num_examples: int = 6, extra: dict | None = None, dpi: int = 100) -> dict:
    """Write the figures and ``router_analysis.json`` into ``out_dir``; returns {name: path}.

    * ``retention_vs_timestep.png`` – mean fg / bg retention (and fg share of kept tokens) against t;
    * ``retention_examples.png`` – for the first results' t: clean image, foreground, kept tokens;
    * ``compression_vs_timestep.png`` – mean compression ratio with the min..max band;
    * ``router_analysis.json`` – every number (per-sample lists included), plus ``extra``.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    rets = [retention] if isinstance(retention, dict) else list(retention or [])
    rets = sorted(rets, key=lambda r: -r["t"])
    if rets:
        files["retention_vs_timestep"] = _plot_retention_curve(rets, out / "retention_vs_timestep.png", dpi)
        withm = [r for r in rets if "_masks" in r]
        if withm and num_examples > 0:
            files["retention_examples"] = _plot_retention_examples(withm, num_examples, out / "retention_examples.png", dpi)
    if compression is not None:
        files["compression_vs_timestep"] = _plot_compression(compression, out / "compression_vs_timestep.png", dpi)
    files["json"] = str(out / "router_analysis.json")
    data = {"retention": jsonable(_public(rets)), "compression_vs_timestep": jsonable(_public(compression)),
            "extra": jsonable(_public(extra or {})), "files": dict(files)}
    atomic_write_text(files["json"], json.dumps(data, indent=2) + "\n")
    return files


def load_analysis_images(images=None, num_images: int = 100, *, data_name: str = "mnist", seed: int = 0):
    """The clean inputs of an analysis: ``(images, labels, masks or None, source)``.

    ``images``: an .npz with ``images`` (N, C, H, W) in model space, ``labels`` (N,) and optionally
    ``masks`` (N, H, W) — the first ``num_images`` are used. Without it, for MNIST models
    (``data_name == "mnist"``): ``num_images`` random digits of the held-out test split (seeded).
    """
    if images:
        masks = None
        with np.load(images, allow_pickle=False) as z:
            x = torch.from_numpy(z["images"][:num_images]).float()
            y = torch.from_numpy(z["labels"][:num_images]).long()
            if "masks" in z.files:
                masks = torch.from_numpy(z["masks"][:num_images]).bool()
        return x, y, masks, str(images)
    if data_name == "mnist":
        from ..data.mnist import load_mnist_tensors

        x, y = load_mnist_tensors("test")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:num_images]
        return x[idx], y[idx], None, "dcdit.data.mnist test split"
    raise ValueError("pass --images (an .npz with images, labels and masks at the latent grid) for latent models")


def analyze_router(
    ckpt,
    out="router_analysis",
    *,
    timesteps: Sequence[int] = (999, 750, 500, 250, 100, 20),
    images=None,
    num_images: int = 100,
    threshold: float = 0.0,
    tail_dropping_fraction: float = 0.0,
    sampling_steps: int = 0,
    seed: int = 0,
    raw_weights: bool = False,
    device: str = "cpu",
) -> tuple[list[dict], dict]:
    """``dcdit analyze-router``: the retention curve of a checkpoint (and, with ``sampling_steps`` > 0,
    compression vs timestep over a DDIM run of one sample per label, at most 10) -> figures + JSON in
    ``out``. Returns (the retention results, {name: path} of the files written)."""
    from ..checkpoint import load_model

    model, cfg, step = load_model(ckpt, use_ema=not raw_weights, device=device)
    x, y, masks, source = load_analysis_images(images, num_images, data_name=cfg.data.name, seed=seed)
    rets = foreground_retention_curve(model, x, y, timesteps, threshold, masks,
                                      seed=seed, tail_dropping_fraction=tail_dropping_fraction)
    comp = None
    if sampling_steps > 0:
        from ..sampling import generate

        res = generate(model, y[: min(len(y), 10)], sampler="ddim", num_sampling_steps=sampling_steps,
                       seed=seed, tail_dropping_fraction=tail_dropping_fraction, num_snapshots=0,
                       clip_denoised=cfg.data.name != "latents")
        comp = compression_vs_timestep(res.trace)
    extra = {"ckpt": str(ckpt), "ckpt_step": step, "weights": "raw" if raw_weights else "ema",
             "images": source, "num_images": int(len(x)), "threshold": threshold}
    return rets, plot_router_analysis(out, rets, comp, extra=extra)


def retention_summary(rets: list[dict]) -> list[str]:
    """One line per timestep: mean fg / bg retention, fg share of kept tokens, fg fraction."""
    return [f"t={r['t']:>4}: fg kept {r['mean_fg_retention']:.3f}  bg kept {r['mean_bg_retention']:.3f}  "
            f"fg share of kept {r['mean_fg_share_of_kept']:.3f}  (fg fraction {r['mean_fg_fraction']:.3f})"
            for r in rets]
