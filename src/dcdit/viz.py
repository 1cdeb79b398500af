"""Figures users expect from a DC-DiT run: a sample grid, ``chunking_viz.png`` (x_t, the
boundary-probability map and the kept tokens across timesteps) and the compression ratio against
timestep (paper Fig. 4). Matplotlib with the Agg backend (no display needed) and PIL.

Every function creates the parent directories of ``path`` and returns the written path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # noqa: E402  (no display on servers; set before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .sampling import SampleResult, to_uint8_images  # noqa: E402

__all__ = ["make_grid", "save_image_grid", "plot_chunking", "plot_compression_vs_timestep"]


def _prepare(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 images (B, H, W, 3) into one (rows·(H+pad)+pad, nrow·(W+pad)+pad, 3) array.

    Image k goes to grid row ``k // nrow``, column ``k % nrow``; its top-left pixel is at
    ``(pad + row·(H + pad), pad + col·(W + pad))``. Unused tiles keep ``pad_value``.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, H, W, C), got {images.shape}")
    B, H, W, C = images.shape
    if B == 0:
        raise ValueError("no images to tile")
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    ncol = min(nrow, B)
    nrows = -(-B // ncol)
    grid = np.full((nrows * (H + padding) + padding, ncol * (W + padding) + padding, C), pad_value, dtype=images.dtype)
    for k in range(B):
        r, c = divmod(k, ncol)
        y0, x0 = padding + r * (H + padding), padding + c * (W + padding)
        grid[y0 : y0 + H, x0 : x0 + W] = images[k]
    return grid


def save_image_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> str:
    """Write images (B, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid, ``nrow`` images per row.
    One-channel images give a grayscale PNG (a 10×10 grid of MNIST samples: 54 KB instead of 100 KB
    as RGB, which matters for the grids the MNIST study keeps in the repository)."""
    u8 = to_uint8_images(images)
    grid = make_grid(u8, nrow=nrow, padding=padding, pad_value=pad_value)
    path = _prepare(path)
    Image.fromarray(grid[..., 0] if images.shape[1] == 1 else grid).save(path, optimize=True)
    return str(path)


def _show_image(ax, img: np.ndarray, extent) -> None:
    """img: (h, w) float (robustly rescaled to its own range, noisy x_t has no fixed range) or (h, w, 3) uint8."""
    if img.ndim == 2:
        lo, hi = np.percentile(img, [1, 99]) if img.size > 1 else (img.min(), img.max())
        if hi <= lo:
            lo, hi = lo - 1, hi + 1
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
    else:
        ax.imshow(img, extent=extent, interpolation="nearest")


def plot_chunking(
    result: SampleResult,
    path,
    max_samples: int = 4,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    image_key: str = "x_t",
    dpi: int = 100,
) -> str:
    """``chunking_viz.png``: how DC-DiT routes tokens along the sampling trajectory.

    For each of the first ``max_samples`` samples a block of three rows, one column per snapshot
    timestep (sampling order, t = 999 on the left):

    1. the image: ``x_t`` (first channel) or, with ``decode`` (a callable mapping (B, C, H, W)
       latents to (B, 1|3, H', W') pixels in [-1, 1], e.g. a VAE decoder), the decoded image.
       ``image_key="pred_xstart"`` shows the model's x_0 prediction instead of x_t;
    2. the boundary probability p on the token grid (colormap fixed to 0..1, one colorbar);
    3. the kept tokens (after tail-dropping) in red over the image.

    The top panel of each column is titled ``t=<t> kept <share>%`` (the sample's kept tokens / L).
    """
    snaps = result.snapshots
    if not snaps:
        raise ValueError("the result has no routing snapshots (a DiT model, or num_snapshots=0): nothing to plot")
    B = snaps[0]["p"].shape[0]
    n = max(1, min(int(max_samples), B))
    S = len(snaps)
    H, W = snaps[0]["p"].shape[1:]
    extent = (0, W, H, 0)  # image and token maps share the token-grid coordinates

    images = []
    for s in snaps:
        x = s[image_key][:n]
        if decode is not None:
            with torch.no_grad():
                dec = decode(x)
            images.append(to_uint8_images(dec))  # (n, h, w, 3)
        else:
            images.append(x[:, 0].float().numpy())  # (n, H, W)

    fig, axes = plt.subplots(3 * n, S, figsize=(1.6 * S + 1.2, 1.6 * 3 * n), squeeze=False, constrained_layout=True)
    red = np.zeros((H, W, 4), dtype=np.float32)
    p_im = None
    for j, s in enumerate(snaps):
        for i in range(n):
            a_img, a_p, a_k = axes[3 * i, j], axes[3 * i + 1, j], axes[3 * i + 2, j]
            img = images[j][i]
            kept = s["kept_mask"][i].numpy().astype(bool)
            share = 100.0 * kept.sum() / kept.size
            _show_image(a_img, img, extent)
            a_img.set_title(f"t={s['t']} kept {share:.0f}%", fontsize=8)
            p_im = a_p.imshow(s["p"][i].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, extent=extent, interpolation="nearest")
            _show_image(a_k, img, extent)
            overlay = red.copy()
            overlay[kept] = (1.0, 0.1, 0.1, 0.55)
            a_k.imshow(overlay, extent=extent, interpolation="nearest")
            if j == 0:
                label = f"#{i}" + (f" y={int(result.labels[i])}" if result.labels is not None else "")
                a_img.set_ylabel(f"{label}\n{image_key if decode is None else 'decoded ' + image_key}", fontsize=8)
                a_p.set_ylabel("p (boundary)", fontsize=8)
                a_k.set_ylabel("kept tokens", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(p_im, ax=axes[1::3, :].ravel().tolist(), shrink=0.8, label="boundary probability p")
    fig.suptitle("DC-DiT routing along the sampling trajectory", fontsize=10)
    path = _prepare(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)


def plot_compression_vs_timestep(result: SampleResult, path, dpi: int = 100) -> str:
    """Compression ratio L / kept tokens against the timestep t, in the sampling direction (x axis
    from 999 down to 0, as paper Fig. 4): the mean over samples with a min..max band, and the
    natural ratio (before tail-dropping) dashed when it differs. With CFG, the unconditional half
    is drawn too when it differs from the conditional one (Lite-CFG)."""
    trace = result.trace
    if not trace:
        raise ValueError("the result has an empty trace: nothing to plot")
    t = np.array([e["t"] for e in trace], dtype=float)
    L = np.array([e["tokens"] for e in trace], dtype=float)[:, None]

    def ratios(key):
        kept = np.stack([np.asarray(e[key], dtype=float) for e in trace])  # (steps, B)
        return L / np.maximum(kept, 1.0)

    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    curves = [("kept", "cond" if "uncond_kept" in trace[0] else "samples", "C0")]
    if "uncond_kept" in trace[0]:
        same = all(np.array_equal(np.asarray(e["kept"]), np.asarray(e["uncond_kept"])) for e in trace)
        if not same or result.lite_cfg:
            curves.append(("uncond_kept", "uncond", "C3"))
    for key, name, color in curves:
        r = ratios(key)
        ax.plot(t, r.mean(1), color=color, label=f"{name}: L / kept (mean)")
        ax.fill_between(t, r.min(1), r.max(1), color=color, alpha=0.2, linewidth=0, label=f"{name}: min..max")
        nat_key = key.replace("kept", "natural")
        if nat_key in trace[0]:
            rn = ratios(nat_key)
            if not np.allclose(rn, r):
                ax.plot(t, rn.mean(1), color=color, linestyle="--", label=f"{name}: natural (before tail-drop)")
    ax.set_xlim(max(999.0, t.max()), min(0.0, t.min()))  # sampling direction: 999 -> 0
    ax.set_xlabel("timestep t (sampling direction →)")
    ax.set_ylabel("compression ratio L / kept tokens")
    settings = result.settings or {}
    bits = [settings.get("sampler", ""), f"{len(trace)} steps"]
    if settings.get("cfg"):
        bits.append(f"cfg {settings.get('cfg_scale')}")
    if settings.get("tail_dropping_fraction"):
        bits.append(f"tail-drop {settings['tail_dropping_fraction']}")
    if settings.get("uncond_tail_dropping_fraction") is not None and settings.get("cfg"):
        bits.append(f"uncond tail-drop {settings['uncond_tail_dropping_fraction']}")
    ax.set_title("Compression vs timestep (" + ", ".join(b for b in bits if b) + ")", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = _prepare(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return str(path)
