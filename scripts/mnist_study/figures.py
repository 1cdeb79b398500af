"""The report's two pictures: quality against measured FLOPs (elastic inference, paper §4.3) and
quality against training steps (upcycling, §4.4). Each returns the file name it wrote, or None when
there is nothing to draw yet."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _errorbar(ax, x: list, rs: list[dict], key: str, ci: str, **kw) -> list[float]:
    """The scores ``key`` of ``rs`` at x with their 95% intervals ``ci``; returns the y values."""
    y = [r[key] for r in rs]
    err = [[r[key] - r[ci][0] for r in rs], [r[ci][1] - r[key] for r in rs]]
    ax.errorbar(x, y, yerr=err, capsize=3, **kw)
    return y


def elastic_plot(rows: dict, path: Path) -> str | None:
    """MNIST-FID and class accuracy against measured GFLOPs per image, one marker per model."""
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (model, pts), marker in zip(rows.items(), "osD"):
        x = [r["gflops_per_image"] for _, r in pts]
        for ax, key, ci in ((axes[0], "mnist_fid", "fid_ci"), (axes[1], "class_accuracy", "acc_ci")):
            y = _errorbar(ax, x, [r for _, r in pts], key, ci, marker=marker, label=model, linestyle="none")
            for (setting, _), xi, yi in zip(pts, x, y):
                ax.annotate(setting, (xi, yi), fontsize=7, textcoords="offset points", xytext=(4, 4))
    axes[0].set(xlabel="measured GFLOPs / image", ylabel="MNIST-FID ↓ (95% CI)", title="quality vs compute")
    axes[1].set(xlabel="measured GFLOPs / image", ylabel="class accuracy ↑ (95% CI)")
    axes[0].legend(fontsize=8)
    return _save(plt, fig, path)


def upcycling_plot(curves: dict[str, dict[int, float]], points: dict[str, dict[int, dict]], final: dict | None,
                   path: Path) -> str | None:
    """Left: each run's logged training ε-MSE against its steps (same seed: same batches, timesteps
    and noise at every step). Right: MNIST-FID at the evaluated steps, and the from-scratch run's
    final interval as a band. ``curves`` / ``points``: label -> step -> value / score."""
    if not any(curves.values()):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, ((label, curve), marker) in enumerate(zip(curves.items(), "osD")):
        if curve:
            axes[0].plot(list(curve), list(curve.values()), color=f"C{i}", label=label)
        pts = points.get(label, {})
        if pts:
            _errorbar(axes[1], list(pts), list(pts.values()), "mnist_fid", "fid_ci", marker=marker, color=f"C{i}", label=label)
    if final is not None:
        lo, hi = final["fid_ci"]
        axes[1].axhspan(lo, hi, color="0.85", label=f"from scratch, step {final['step']}")
    axes[0].set(xlabel="training step", ylabel="training ε-MSE ↓ (logged rows)", yscale="log", title="quality vs training steps")
    axes[1].set(xlabel="training step", ylabel="MNIST-FID ↓ (95% CI)", yscale="log",
                xlim=(0, 1.1 * max((s for pts in points.values() for s in pts), default=1)))
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    return _save(plt, fig, path)
