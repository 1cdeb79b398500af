"""One evaluation protocol for every model (issue 20, item 2): DDPM, the recipe's sampling steps, one
guidance scale chosen on the demo checkpoint (:func:`select_guidance`), 50 samples per class, EMA
weights; scored with the packaged MNIST classifier (docs/evaluation.md) — MNIST-FID against the 500
held-out digits, class accuracy, IS-style score — each with a bootstrap 95% interval over the samples.

Samples are drawn and saved in chunks of 10 per class, chunk k with sampling seed ``seed_base + k``,
so an interrupted evaluation loses at most one chunk and the samples do not depend on where it stopped.
The result (``result.json``) is written last; a folder without it is an evaluation still to finish.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcdit.checkpoint import load_model
from dcdit.config import count_parameters
from dcdit.data.mnist import load_mnist_tensors
from dcdit.evaluation.metrics import (
    bootstrap_interval,
    class_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
)
from dcdit.evaluation.mnist_classifier import (
    classifier_features,
    load_classifier,
    mnist_metrics,
    uint8_to_mnist,
)
from dcdit.flops import sampling_flops
from dcdit.run_lock import pid_alive
from dcdit.sampling import generate, to_uint8_images
from dcdit.utils import atomic_write_bytes, atomic_write_text
from dcdit.viz import save_image_grid

from .plan import Recipe
from .rules import choose_guidance_scale

EVAL_SEED = 0  # chunk k of an evaluation samples with seed EVAL_SEED + k
SELECTION_SEED = 10_000  # the guidance selection's own samples: none of them is an evaluation sample


@dataclass(frozen=True)
class Protocol:
    sampler: str
    sampling_steps: int
    cfg_scale: float
    per_class: int
    chunk_per_class: int
    seed_base: int
    bootstrap: int

    def chunks(self) -> list[int]:
        """Samples per class of each chunk."""
        full, rest = divmod(self.per_class, self.chunk_per_class)
        return [self.chunk_per_class] * full + ([rest] if rest else [])


def protocol(recipe: Recipe, cfg_scale: float, selection: bool = False) -> Protocol:
    per_class = recipe.selection_per_class if selection else recipe.samples_per_class
    return Protocol("ddpm", recipe.sampling_steps, float(cfg_scale), per_class, min(per_class, recipe.chunk_per_class),
                    SELECTION_SEED if selection else EVAL_SEED, recipe.bootstrap)


def _save_chunk(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def sample_chunk(model, cfg, per_class: int, seed: int, p: Protocol, tail: float, uncond_tail: float | None) -> dict:
    """``per_class`` samples of each class (labels 0..9 repeating), their per-image MACs and the time."""
    labels = torch.arange(per_class * cfg.model.num_classes) % cfg.model.num_classes
    t0 = time.perf_counter()
    res = generate(model, labels, sampler=p.sampler, num_sampling_steps=p.sampling_steps, cfg_scale=p.cfg_scale,
                   tail_dropping_fraction=tail, uncond_tail_dropping_fraction=uncond_tail, seed=seed,
                   num_snapshots=0, clip_denoised=True)  # pixel space: x̂0 clipped (dcdit.pipelines.generate_with)
    seconds = time.perf_counter() - t0
    flops = sampling_flops(cfg.model, res.trace)
    kept = flops.get("mean_kept")
    settings = {**dataclasses.asdict(p), "tail": tail, "uncond_tail": uncond_tail, "seed": seed}
    return {"images": to_uint8_images(res.samples), "labels": labels.numpy(), "macs": np.asarray(flops["macs_per_image_each"]),
            "mean_kept": np.float64(np.nan if kept is None else kept), "tokens": np.int64(res.trace[0]["tokens"]),
            "seconds": np.float64(seconds), "settings": np.array(json.dumps(settings))}


STALE_CLAIM_S = 3600  # a chunk takes minutes: an hour-old claim is a leftover (e.g. a pid reused on another machine)


def claim(path: Path) -> bool:
    """Claim the chunk ``path`` for this process: ``<chunk>.claim`` created exclusively, holding the pid.
    A claim of a process that is gone, or older than :data:`STALE_CLAIM_S`, is taken over. This lets
    two processes share one evaluation's chunks (each samples the chunks it claims)."""
    mark = path.with_suffix(".claim")
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid, age = int(mark.read_text()), time.time() - mark.stat().st_mtime
        except (OSError, ValueError):  # being written, or just removed: its owner is alive
            return False
        if pid_alive(pid) and age < STALE_CLAIM_S:
            return False
        mark.unlink(missing_ok=True)
        return claim(path)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def sample_all(ckpt: Path, folder: Path, p: Protocol, tail: float, uncond_tail: float | None, label: str) -> tuple[list[dict], dict]:
    """Every chunk of the evaluation (sampling the missing ones this process can claim, waiting for
    those another process is sampling); (chunks, model info)."""
    model, cfg, step = load_model(ckpt)
    info = {"ckpt": str(ckpt), "step": step, "arch": cfg.model.arch, "params": count_parameters(model)}
    paths = [folder / f"chunk_{k:03d}.npz" for k in range(len(p.chunks()))]
    while missing := [k for k, path in enumerate(paths) if not path.exists()]:
        for k in missing:
            if not paths[k].exists() and claim(paths[k]):
                c = sample_chunk(model, cfg, p.chunks()[k], p.seed_base + k, p, tail, uncond_tail)
                _save_chunk(paths[k], **c)
                paths[k].with_suffix(".claim").unlink(missing_ok=True)
                print(f"[eval] {label}: chunk {k + 1}/{len(paths)} in {float(c['seconds']):.0f} s", flush=True)
        if any(not path.exists() for path in paths):
            time.sleep(5)  # another process is sampling them
    chunks = []
    for k, path in enumerate(paths):
        with np.load(path) as z:
            chunk = {key: z[key] for key in z.files}
        want = {**dataclasses.asdict(p), "tail": tail, "uncond_tail": uncond_tail, "seed": p.seed_base + k}
        if json.loads(str(chunk["settings"])) != want:
            raise ValueError(f"{path} was sampled with other settings than {want}: delete {folder} to evaluate it again")
        chunks.append(chunk)
    return chunks, info


@functools.lru_cache(maxsize=1)
def _reference() -> tuple[np.ndarray, np.ndarray]:
    """μ, Σ of the packaged classifier's features on the 500 held-out digits (MNIST-FID's reference)."""
    model, _ = load_classifier()
    x, _ = load_mnist_tensors("test")
    return feature_statistics(classifier_features(model, x)[0])


def score(images_u8: np.ndarray, labels: np.ndarray, num_resamples: int, seed: int = 0) -> dict:
    """``mnist_metrics`` of the samples and the bootstrap 95% interval of each of its three numbers."""
    x = uint8_to_mnist(images_u8)
    m = mnist_metrics(x, labels)
    model, _ = load_classifier()
    feats, probs = classifier_features(model, x)
    mu_r, sig_r = _reference()
    pred = probs.argmax(1)

    def ci(statistic, *arrays):
        return list(bootstrap_interval(statistic, *arrays, num_resamples=num_resamples, seed=seed))

    return {
        "mnist_fid": m["mnist_fid"], "class_accuracy": m["class_accuracy"], "mnist_is": m["mnist_is"],
        "fid_ci": ci(lambda f: frechet_distance(*feature_statistics(f), mu_r, sig_r), feats),
        "acc_ci": ci(lambda p, y: class_accuracy(p, y, 10)[0], pred, labels),
        "is_ci": ci(lambda q: inception_score(q, split_size=None)[0], probs),
        "per_class_accuracy": m["per_class_accuracy"], "background_level": m["background_level"],
        "num_samples": m["num_samples"], "bootstrap_resamples": num_resamples,
    }


def evaluate(ckpt: Path, folder: Path, p: Protocol, *, tail: float = 0.0, uncond_tail: float | None = None,
             label: str = "", threads: int = 1) -> dict:
    """Sample (resuming from saved chunks), score, write ``folder/result.json`` and ``grid.png``."""
    result_file = folder / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    chunks, info = sample_all(ckpt, folder, p, tail, uncond_tail, label or folder.name)
    images = np.concatenate([c["images"] for c in chunks])
    labels = np.concatenate([c["labels"] for c in chunks])
    macs = np.concatenate([c["macs"] for c in chunks])
    n = [len(c["labels"]) for c in chunks]
    kept = [float(c["mean_kept"]) for c in chunks]
    first = chunks[0]
    save_image_grid(uint8_to_mnist(first["images"]), folder / "grid.png", nrow=10)  # one column per class
    result = {
        **info, "tail_dropping_fraction": tail, "uncond_tail_dropping_fraction": uncond_tail, **dataclasses.asdict(p),
        "threads": threads, "gflops_per_image": 2 * float(macs.mean()) / 1e9,
        "mean_kept": None if np.isnan(kept).any() else float(np.average(kept, weights=n)), "tokens": int(first["tokens"]),
        # seconds per sampling step for one chunk (10 per class, with guidance 2× as many forward rows)
        "sampling_s_per_step": float(np.mean([float(c["seconds"]) / p.sampling_steps for c in chunks])),
        "chunk_images": int(n[0]), **score(images, labels, p.bootstrap),
    }
    atomic_write_text(result_file, json.dumps(result, indent=2))
    print(f"[eval] {label or folder.name}: MNIST-FID {result['mnist_fid']:.1f} {[round(v, 1) for v in result['fid_ci']]}, "
          f"accuracy {result['class_accuracy']:.3f}, {result['gflops_per_image']:.2f} GFLOPs/img", flush=True)
    return result


def select_guidance(out: Path, demo: Path, recipe: Recipe, threads: int = 1) -> dict:
    """The guidance scale of every evaluation, chosen on a model that is none of the compared runs (the
    shipped demo checkpoint) with samples none of the evaluations uses (seed :data:`SELECTION_SEED`):
    each scale of ``recipe.scales`` scored on 10 per class, then :func:`rules.choose_guidance_scale`.
    Cached in ``<out>/selection/selection.json``."""
    path = out / "selection" / "selection.json"
    if path.exists():
        return json.loads(path.read_text())
    rows = {}
    for s in recipe.scales:
        r = evaluate(demo, out / "selection" / f"cfg{s:g}", protocol(recipe, s, selection=True), label=f"guidance {s:g}",
                     threads=threads)
        rows[s] = {k: r[k] for k in ("mnist_fid", "fid_ci", "class_accuracy", "acc_ci", "mnist_is", "background_level")}
    scale, rule = choose_guidance_scale(rows)
    sel = {"cfg_scale": scale, "rule": rule, "model": str(demo), "seed": SELECTION_SEED, "sampler": "ddpm",
           "sampling_steps": recipe.sampling_steps, "samples": 10 * recipe.selection_per_class,
           "rows": {f"{s:g}": v for s, v in rows.items()}}
    atomic_write_text(path, json.dumps(sel, indent=2))
    print(f"[scale] guidance scale {scale:g}: {rule}", flush=True)
    return sel
