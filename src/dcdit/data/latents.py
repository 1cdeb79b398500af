"""Pre-extracted VAE latents for ImageNet-scale training (the DiT / fast-DiT workflow).

Workflow
--------
1. ``extract_features(image_root, out_dir, vae, vae_id=...)`` (CLI: ``dcdit extract-features``)
   centre-crops every image of an ImageFolder tree (ADM crop), encodes it AND its horizontal flip
   with a ``diffusers.AutoencoderKL`` and stores the Gaussian posterior (mean, std) of both.
2. ``LatentDataset(out_dir)`` draws a FRESH latent ``latent_scale * (mean + std * eps)`` with a random
   flip on every access, i.e. exactly what encoding on the fly (``latent_dist.sample()``) would give,
   without re-running the VAE.

On-disk format (``FORMAT_VERSION = 1``)
---------------------------------------
``out_dir/meta.json`` (written last; its presence marks a complete extraction)::

    {"format": "dcdit-latents", "format_version": 1, "vae_id": ..., "latent_scale": 0.18215,
     "image_size": 256, "latent_shape": [C, h, w], "num_images": N, "num_source_images": N + skipped,
     "num_skipped": 0, "num_classes": K,
     "classes": [...sorted class folder names...], "dtype": "float16",
     "shards": [{"file": "shard_00000.safetensors", "num_images": n}, ...],
     "flip_index": {"0": "original", "1": "horizontal flip"}, ...}

``out_dir/shard_XXXXX.safetensors`` holds, for its ``n`` images (in ImageFolder order):

* ``mean``   (n, 2, C, h, w) posterior mean, UNSCALED (index 1 of dim 1 = horizontally flipped image)
* ``std``    (n, 2, C, h, w) posterior std, unscaled
* ``labels`` (n,) int64

and in its metadata ``source_range`` ("start,stop": the ImageFolder indices it covers) and ``skipped``
(JSON list of the unreadable images of that range, left out: ``{"path", "error"}``).

An image PIL cannot decode (truncated, corrupt, not an image) is skipped with a warning and listed in
``out_dir/skipped_images.json`` (``meta.json`` records ``num_skipped``); ``strict=True``
(``--strict``) stops at it instead, naming the file, and keeps the finished shards for a resume.

``mean``/``std`` are stored in ``dtype`` (default float16: halves disk/RAM, ~42 GB instead of ~84 GB for
ImageNet-1k at 256 px with the SD VAE; the relative rounding error 5e-4 is far below the posterior
noise that training adds anyway).  Use ``dtype="float32"`` for bit-faithful storage.

Every file is written to a temporary name in ``out_dir`` and moved into place with ``os.replace``,
so an interrupted run never leaves a truncated shard; ``resume=True`` (default) re-uses finished
shards of an interrupted run with the same settings.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import DcditWarning, UnreadableImageError, one_line
from ..utils import atomic_write_bytes

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "META_FILE",
    "IMG_EXTENSIONS",
    "DEFAULT_LATENT_SCALE",
    "center_crop_arr",
    "ImageFolderDataset",
    "encode_posterior",
    "extract_features",
    "read_latent_meta",
    "check_latent_meta",
    "LatentDataset",
]

FORMAT_NAME = "dcdit-latents"
FORMAT_VERSION = 1
META_FILE = "meta.json"
STATE_FILE = "extract_state.json"  # in-progress marker for resumable extraction
SKIPPED_FILE = "skipped_images.json"  # the unreadable images an extraction left out
SHARD_PATTERN = "shard_{:05d}.safetensors"
DEFAULT_LATENT_SCALE = 0.18215
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
#: What PIL raises for a file it cannot decode: unknown format, truncated data, a decompression bomb.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_REQUIRED_META_KEYS = (
    "format_version", "vae_id", "latent_scale", "image_size", "latent_shape", "num_images",
    "num_classes", "classes", "shards", "dtype",
)
_HOW_TO_CREATE = (
    "Create it with `dcdit extract-features ...` (see `dcdit extract-features --help`), which encodes "
    "an ImageFolder-style image tree with a VAE, or from Python with "
    "dcdit.data.latents.extract_features(image_root, out_dir, vae, vae_id=...)."
)


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------
def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop to ``image_size`` x ``image_size``.

    1. While the smaller side is >= 2 * image_size, halve both sides (integer division) with BOX
       resampling (cheap anti-aliased downscaling).
    2. BICUBIC resize so that the smaller side equals ``image_size`` (other side rounded).
    3. Cut the central ``image_size`` x ``image_size`` window (offset = floor((side - size) / 2)).
    """
    image_size = int(image_size)
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    img = pil_image
    while min(img.size) >= 2 * image_size:
        w, h = img.size
        img = img.resize((w // 2, h // 2), resample=Image.BOX)
    scale = image_size / min(img.size)
    w, h = img.size
    new_size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
    img = img.resize(new_size, resample=Image.BICUBIC)
    w, h = img.size
    left = (w - image_size) // 2
    top = (h - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def _pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32)
    return x / 127.5 - 1.0


class ImageFolderDataset(Dataset):
    """Images in ImageFolder layout: ``root/<class_name>/**/<image>.<ext>``.

    Class names are the sorted sub-folder names, mapped to 0..K-1; files are sorted within a class
    (sub-folders are searched recursively).  ``ds[i]`` -> ``(x, label)`` with x float32 (3, S, S) in
    [-1, 1] (ADM centre crop to S = image_size, RGB) and label an int.

    Attributes: ``classes``, ``class_to_idx``, ``samples`` (list of (path, label)), ``targets``.
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256, extensions: tuple[str, ...] = IMG_EXTENSIONS):
        self.root = Path(root)
        self.image_size = int(image_size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist or is not a directory")
        exts = tuple(e.lower() for e in extensions)
        self.classes = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise FileNotFoundError(
                f"no class sub-folders in {str(self.root)!r}: expected ImageFolder layout root/<class>/<image>"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for c in self.classes:
            files = []
            for dirpath, dirnames, filenames in os.walk(self.root / c, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in filenames:
                    if not fn.startswith(".") and fn.lower().endswith(exts):
                        files.append(os.path.join(dirpath, fn))
            files.sort()
            self.samples.extend((f, self.class_to_idx[c]) for f in files)
        if not self.samples:
            raise FileNotFoundError(f"no images with extensions {exts} found under {str(self.root)!r}")
        self.targets = [s[1] for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_pil(self, i: int) -> Image.Image:
        """The centre-cropped RGB PIL image of sample ``i``."""
        path, _ = self.samples[i]
        with Image.open(path) as im:
            im = im.convert("RGB")
        return center_crop_arr(im, self.image_size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return _pil_to_tensor(self.load_pil(i)), self.samples[i][1]


# --------------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------------
def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        return p.device, p.dtype
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def encode_posterior(vae: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of ``vae.encode(x).latent_dist`` for images x (B, 3, S, S) in [-1, 1].

    ``x`` is moved to the VAE's device/dtype; results are float32 on the VAE's device (unscaled).
    """
    device, dtype = _module_device_dtype(vae)
    out = vae.encode(x.to(device=device, dtype=dtype))
    dist = out.latent_dist if hasattr(out, "latent_dist") else out[0]
    return dist.mean.float(), dist.std.float()


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def _atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _finished_shard(path: Path, start: int, stop: int) -> dict | None:
    """The record of a shard an earlier run finished for images ``[start, stop)`` (None when absent,
    unreadable or made for other images). Shards written before unreadable images were skipped carry
    no ``source_range`` and are finished when they hold every image of their range."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            n = int(f.get_slice("labels").get_shape()[0])
            shape = [int(v) for v in f.get_slice("mean").get_shape()[2:]]
    except (SafetensorError, OSError):
        return None
    if "source_range" in meta:
        if meta["source_range"] != f"{start},{stop}":
            return None
        skipped = json.loads(meta.get("skipped", "[]"))
    elif n == stop - start:
        skipped = []
    else:
        return None
    return {"file": path.name, "num_images": n, "latent_shape": shape, "skipped": skipped}


class _ImagesOrErrors(Dataset):
    """Images ``indices`` of an :class:`ImageFolderDataset` as ``(index, x, label, None)``, or
    ``(index, None, None, error)`` for a file PIL cannot decode, so one bad file does not stop a batch."""

    def __init__(self, images: ImageFolderDataset, indices: range):
        self.images, self.indices = images, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        i = self.indices[k]
        try:
            x, y = self.images[i]
        except _IMAGE_ERRORS as e:
            return i, None, None, f"{type(e).__name__}: {one_line(e)}"
        return i, x, y, None


def _keep_items(batch: list) -> list:
    """DataLoader collate: the (index, x, label, error) items as they are (failed ones have no tensor)."""
    return batch


def _encode_with_flips(vae: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std) of images x (b, 3, S, S) and of their horizontal flips, each (b, 2, C, h, w)."""
    b = x.shape[0]
    mu, sd = encode_posterior(vae, torch.cat([x, x.flip(-1)], dim=0))
    return torch.stack([mu[:b], mu[b:]], dim=1), torch.stack([sd[:b], sd[b:]], dim=1)


def _encode_shard(vae, images: ImageFolderDataset, indices: range, path: Path, *, store_dtype: torch.dtype,
                  file_meta: dict, batch_size: int, num_workers: int, strict: bool, pbar) -> dict:
    """Encode images ``indices`` into one shard file; unreadable ones are skipped (recorded in the shard's
    metadata) or, with ``strict``, stop the extraction naming the file. Returns the shard's record."""
    loader = DataLoader(_ImagesOrErrors(images, indices), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_keep_items)
    means, stds, labels, skipped = [], [], [], []
    for batch in loader:
        for i, _, _, error in batch:
            if error is not None:
                file = images.samples[i][0]
                if strict:
                    raise UnreadableImageError(
                        f"cannot read image {file} ({error}): remove or replace it, or run without --strict to skip "
                        f"it; the finished shards in {path.parent} are kept and the next run resumes from them")
                warnings.warn(f"skipped unreadable image {file} ({error})", DcditWarning, stacklevel=2)
                skipped.append({"path": file, "error": error})
        good = [item for item in batch if item[3] is None]
        if good:
            mu, sd = _encode_with_flips(vae, torch.stack([x for _, x, _, _ in good]))
            means.append(mu.to("cpu", store_dtype))
            stds.append(sd.to("cpu", store_dtype))
            labels.append(torch.tensor([int(y) for _, _, y, _ in good], dtype=torch.int64))
        if pbar is not None:
            pbar.update(len(batch))
    empty = torch.zeros(0, dtype=store_dtype)  # every image of the shard unreadable: an empty shard marks it done
    tensors = {"mean": torch.cat(means) if means else empty, "std": torch.cat(stds) if stds else empty,
               "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)}
    meta = {**file_meta, "source_range": f"{indices.start},{indices.stop}", "skipped": json.dumps(skipped)}
    _atomic_save_safetensors(path, tensors, meta)
    return {"file": path.name, "num_images": int(tensors["labels"].shape[0]),
            "latent_shape": [int(v) for v in tensors["mean"].shape[2:]], "skipped": skipped}


def _check_extract_args(dtype: str, shard_size: int, batch_size: int, vae_id) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError("shard_size and batch_size must be positive")
    if not isinstance(vae_id, str) or not vae_id:
        raise ValueError("vae_id must be a non-empty string (the hub id or path the VAE was loaded from)")


def _recorded_settings(meta: dict, keys) -> dict:
    """The extraction settings a meta.json / extract_state.json records; files from before unreadable
    images were skipped have num_images where num_source_images is now."""
    meta = {"num_source_images": meta.get("num_images"), **meta}
    return {k: meta.get(k) for k in keys}


def _prepare_output(out: Path, settings: dict, resume: bool, overwrite: bool) -> tuple[dict | None, bool]:
    """(meta of a finished extraction with these settings, or None; whether unfinished shards can be
    re-used). Removes what cannot be re-used; refuses to replace another extraction unless ``overwrite``."""
    meta_path, state_path = out / META_FILE, out / STATE_FILE
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        same = old is not None and _recorded_settings(old, settings) == settings
        if same and resume and all((out / s["file"]).is_file() for s in old.get("shards", [])):
            return old, False  # already done with identical settings
        if not same and not overwrite:
            diff = [] if old is None else [k for k, v in _recorded_settings(old, settings).items() if settings[k] != v]
            raise ValueError(
                f"{str(out)!r} already holds a latent extraction with different settings "
                f"(differing: {diff or 'unreadable meta.json'}; recorded vae_id="
                f"{None if old is None else old.get('vae_id')!r}, requested vae_id={settings['vae_id']!r}); "
                "pass overwrite=True (--overwrite) or choose another output directory"
            )
        meta_path.unlink()
        (out / SKIPPED_FILE).unlink(missing_ok=True)
        if same and resume:  # finished run with a shard missing: re-use the shards that are there
            _atomic_write_json(state_path, settings)
    if not resume or overwrite:
        state_path.unlink(missing_ok=True)
    resumable = False
    if state_path.exists():
        try:
            resumable = _recorded_settings(json.loads(state_path.read_text()), settings) == settings
        except (OSError, ValueError, TypeError):
            resumable = False
    if not resumable:  # stale shards from a run with other settings must go
        for p in out.glob("shard_*.safetensors"):
            p.unlink()
    _atomic_write_json(state_path, settings)
    return None, resumable


def _finish(out: Path, settings: dict, shards: list[dict], image_root) -> dict:
    """Write meta.json (listing the non-empty shards) and, when images were skipped, the report
    ``skipped_images.json``; remove the in-progress marker. Returns the meta dict."""
    skipped = [s for record in shards for s in record["skipped"]]
    if skipped:
        _atomic_write_json(out / SKIPPED_FILE, {"count": len(skipped), "images": skipped,
                                                "note": "unreadable images, left out of the latents"})
    kept = [r for r in shards if r["num_images"]]
    if not kept:
        raise ValueError(f"none of the {settings['num_source_images']} images under {str(image_root)!r} could be read "
                         f"(see {out / SKIPPED_FILE}): nothing to encode")
    meta = dict(settings)
    meta.update(
        {
            "num_images": sum(r["num_images"] for r in kept),
            "num_skipped": len(skipped),
            "latent_shape": kept[0]["latent_shape"],
            "shards": [{"file": r["file"], "num_images": r["num_images"]} for r in kept],
            "flip_index": {"0": "original", "1": "horizontal flip"},
            "layout": "shard tensors: mean, std (n, 2, C, h, w) unscaled posterior; labels (n,) int64",
            "crop": "adm_center_crop",
            "pixel_range": [-1.0, 1.0],
        }
    )
    if skipped:
        meta["skipped_report"] = SKIPPED_FILE
    _atomic_write_json(out / META_FILE, meta)
    (out / STATE_FILE).unlink(missing_ok=True)
    return meta


def extract_features(
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    vae: torch.nn.Module,
    image_size: int = 256,
    batch_size: int = 32,
    shard_size: int = 20000,
    *,
    vae_id: str,
    latent_scale: float = DEFAULT_LATENT_SCALE,
    dtype: str = "float16",
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    max_images: int | None = None,
    strict: bool = False,
) -> dict:
    """Encode an ImageFolder tree into sharded posterior statistics; returns the meta dict.

    Args:
        image_root: ImageFolder-layout directory (``root/<class>/<image>``).
        out_dir: output directory (created).  See the module docstring for the format.
        vae: a ``diffusers.AutoencoderKL`` (or anything whose ``encode(x).latent_dist`` has ``.mean``
            and ``.std``); the caller loads it.  It is put in eval mode (and moved to ``device`` if given).
        image_size: ADM centre-crop size S (images are (3, S, S) in [-1, 1] before encoding).
        batch_size: images per VAE call (each call encodes 2 * batch_size images: originals + flips).
        shard_size: images per ``shard_XXXXX.safetensors`` file (fewer when some are unreadable).
        vae_id: identifier of the VAE (hub id or local path) recorded in meta.json and checked by
            :func:`check_latent_meta` at training/sampling time.
        latent_scale: latent scaling factor recorded in meta.json (applied at READ time; the stored
            mean/std are unscaled).
        dtype: storage dtype of mean/std: "float16" (default), "float32" or "bfloat16".
        device: device for encoding (default: wherever the VAE already is).
        num_workers: DataLoader workers for image decoding.
        progress: show a tqdm progress bar.
        resume: re-use complete shards of an interrupted run with identical settings.
        overwrite: if ``out_dir`` already holds a finished extraction with DIFFERENT settings, replace
            it instead of raising.  A finished extraction with the same settings is returned as is.
        max_images: only encode the first N images (in ImageFolder order; for smoke tests).
        strict: stop at the first image PIL cannot read (:class:`~dcdit.errors.UnreadableImageError`
            naming it) instead of skipping it; skipped images are listed in ``skipped_images.json``.
    """
    _check_extract_args(dtype, shard_size, batch_size, vae_id)
    images = ImageFolderDataset(image_root, image_size=image_size)
    n_total = len(images) if max_images is None else min(len(images), int(max_images))
    settings = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vae_id": vae_id, "latent_scale": float(latent_scale),
        "image_size": int(image_size), "num_source_images": n_total, "num_classes": len(images.classes),
        "classes": list(images.classes), "shard_size": int(shard_size), "dtype": dtype,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finished, resumable = _prepare_output(out, settings, resume, overwrite)
    if finished is not None:
        return finished
    vae = (vae if device is None else vae.to(device)).eval()
    file_meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "vae_id": vae_id,
                 "latent_scale": repr(float(latent_scale)), "image_size": str(int(image_size)),
                 "layout": "mean/std: (n, 2, C, h, w), index 1 of dim 1 = horizontally flipped image; unscaled"}
    from tqdm.auto import tqdm

    shards = []
    with tqdm(total=n_total, desc="extract-features", unit="img", disable=not progress) as pbar:
        for s, start in enumerate(range(0, n_total, shard_size)):
            indices, path = range(start, min(n_total, start + shard_size)), out / SHARD_PATTERN.format(s)
            record = _finished_shard(path, indices.start, indices.stop) if resumable else None
            if record is None:
                record = _encode_shard(vae, images, indices, path, store_dtype=_DTYPES[dtype], file_meta=file_meta,
                                       batch_size=batch_size, num_workers=num_workers, strict=strict, pbar=pbar)
            else:
                pbar.update(len(indices))
            shards.append(record)
    return _finish(out, settings, shards, image_root)


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def read_latent_meta(root: str | os.PathLike) -> dict:
    """Read and validate ``root/meta.json`` of an extracted latent folder.

    Raises FileNotFoundError when the folder/meta.json is missing (e.g. an unfinished extraction) and
    ValueError when meta.json is unreadable or incomplete; both messages say how to create the folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"latent folder {str(root)!r} does not exist. {_HOW_TO_CREATE}")
    meta_path = root / META_FILE
    if not meta_path.is_file():
        extra = (
            " An extraction was started there but did not finish (extract_state.json present); re-run it "
            "to resume." if (root / STATE_FILE).exists() else ""
        )
        raise FileNotFoundError(
            f"latent folder {str(root)!r} has no {META_FILE}, so it is not a (finished) latent extraction."
            f"{extra} {_HOW_TO_CREATE}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON ({e}). {_HOW_TO_CREATE}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{str(meta_path)!r} does not hold a JSON object. {_HOW_TO_CREATE}")
    missing = [k for k in _REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{str(meta_path)!r} lacks the keys {missing}. {_HOW_TO_CREATE}")
    if int(meta["format_version"]) > FORMAT_VERSION:
        raise ValueError(
            f"{str(meta_path)!r} has format_version {meta['format_version']}, newer than this dcdit "
            f"supports ({FORMAT_VERSION}); upgrade dcdit or re-extract."
        )
    return meta


def check_latent_meta(meta: dict, vae_id: str | None = None, latent_scale: float | None = None) -> dict:
    """Check that latents were extracted with the VAE / scale the caller uses; returns ``meta``.

    ``None`` skips a check.  Raises ValueError naming both values on mismatch.
    """
    problems = []
    if vae_id is not None and meta.get("vae_id") != vae_id:
        problems.append(
            f"VAE id mismatch: latents were extracted with vae_id={meta.get('vae_id')!r} but "
            f"vae_id={vae_id!r} is used now"
        )
    if latent_scale is not None:
        stored = meta.get("latent_scale")
        if stored is None or not math.isclose(float(stored), float(latent_scale), rel_tol=1e-6, abs_tol=1e-12):
            problems.append(
                f"latent scale mismatch: latents were extracted with latent_scale={stored!r} but "
                f"latent_scale={latent_scale!r} is used now"
            )
    if problems:
        raise ValueError(
            "; ".join(problems)
            + ". Re-extract the features with the matching VAE (`dcdit extract-features ...`) or use the "
            "VAE/scale recorded in meta.json."
        )
    return meta


def _shard_labels(path: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as h:
        return h.get_tensor("labels")


def _read_shard(path: Path, read):
    """``read(str(path))`` with an error naming a damaged shard and how to re-make it."""
    from safetensors import SafetensorError

    try:
        return read(str(path))
    except SafetensorError as e:
        raise ValueError(
            f"latent shard {path} is unreadable ({e}): it is truncated or corrupt. Delete it and re-run the "
            "same `dcdit extract-features` command: only the missing shard is encoded again"
        ) from e


class LatentDataset(Dataset):
    """Fresh latent samples from an extracted folder.

    ``ds[i]`` -> ``(z, label)``: z float32 (C, h, w) = ``latent_scale * (mean + std * eps)``,
    eps ~ N(0, I) drawn anew on every call, with the flipped posterior (index 1) chosen with p = 0.5
    when ``flip=True`` (index 0 always when ``flip=False``); label int64 scalar tensor.

    Args:
        root: folder written by :func:`extract_features`.
        flip: random horizontal flip (choice of the stored flipped posterior).
        generator: optional ``torch.Generator`` for eps and flip; default torch's global RNG (which
            DataLoader seeds per worker).  A generator is copied into every worker process, so with
            num_workers > 0 workers would repeat each other's draws: use it only in-process.
        in_memory: load all shards into RAM (fast, needs ~N*2*2*C*h*w*itemsize bytes); default False
            reads single rows from the memory-mapped safetensors files on demand.
        latent_scale: override the scale recorded in meta.json (default: the recorded one).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        flip: bool = True,
        generator: torch.Generator | None = None,
        in_memory: bool = False,
        latent_scale: float | None = None,
    ) -> None:
        self.root = Path(root)
        self.meta = read_latent_meta(self.root)
        self.flip = bool(flip)
        self.generator = generator
        self.in_memory = bool(in_memory)
        self.latent_scale = float(self.meta["latent_scale"] if latent_scale is None else latent_scale)
        self.latent_shape = tuple(int(v) for v in self.meta["latent_shape"])
        self.num_classes = int(self.meta["num_classes"])
        self.classes = list(self.meta["classes"])
        self.files = [self.root / s["file"] for s in self.meta["shards"]]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"latent folder {str(self.root)!r} is incomplete, missing shard files {missing}. {_HOW_TO_CREATE}"
            )
        counts = [int(s["num_images"]) for s in self.meta["shards"]]
        self._offsets = np.cumsum([0] + counts).tolist()
        if self._offsets[-1] != int(self.meta["num_images"]):
            raise ValueError(
                f"{str(self.root / META_FILE)!r}: shard sizes sum to {self._offsets[-1]} but num_images is "
                f"{self.meta['num_images']}"
            )
        self._handles: dict[int, Any] = {}
        self._shards: list[dict[str, torch.Tensor]] | None = None
        if self.in_memory:
            from safetensors.torch import load_file

            self._shards = [_read_shard(f, load_file) for f in self.files]
            self.labels = torch.cat([s["labels"] for s in self._shards]).long()
        else:
            self.labels = torch.cat([_read_shard(f, _shard_labels) for f in self.files]).long()

    def __getstate__(self):  # file handles are per process
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return self._offsets[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for LatentDataset of size {n}")
        s = bisect.bisect_right(self._offsets, i) - 1
        return s, i - self._offsets[s]

    def posterior(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stored, UNSCALED (mean, std) of image i, each float32 (2, C, h, w) (index 1 = flip), and label."""
        s, j = self._locate(int(i))
        if self._shards is not None:
            sh = self._shards[s]
            mean, std = sh["mean"][j], sh["std"][j]
        else:
            h = self._handles.get(s)
            if h is None:
                from safetensors import safe_open

                h = self._handles[s] = safe_open(str(self.files[s]), framework="pt")
            mean, std = h.get_slice("mean")[j], h.get_slice("std")[j]
        return mean.float(), std.float(), self.labels[int(i)]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, std, label = self.posterior(i)
        f = int(torch.randint(0, 2, (1,), generator=self.generator).item()) if self.flip else 0
        eps = torch.randn(mean.shape[1:], generator=self.generator, dtype=torch.float32)
        z = self.latent_scale * (mean[f] + std[f] * eps)
        return z, label.clone()

    def __repr__(self) -> str:
        return (
            f"LatentDataset(root={str(self.root)!r}, n={len(self)}, latent_shape={self.latent_shape}, "
            f"num_classes={self.num_classes}, vae_id={self.meta['vae_id']!r}, flip={self.flip})"
        )
