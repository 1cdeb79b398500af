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
     "image_size": 256, "latent_shape": [C, h, w], "num_images": N, "num_classes": K,
     "classes": [...sorted class folder names...], "dtype": "float16",
     "shards": [{"file": "shard_00000.safetensors", "num_images": n}, ...],
     "flip_index": {"0": "original", "1": "horizontal flip"}, ...}

``out_dir/shard_XXXXX.safetensors`` holds, for its ``n`` images (in ImageFolder order):

* ``mean``   (n, 2, C, h, w) posterior mean, UNSCALED (index 1 of dim 1 = horizontally flipped image)
* ``std``    (n, 2, C, h, w) posterior std, unscaled
* ``labels`` (n,) int64

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
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
SHARD_PATTERN = "shard_{:05d}.safetensors"
DEFAULT_LATENT_SCALE = 0.18215
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
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


def _shard_num_images(path: Path) -> int | None:
    """Number of images in an existing shard file (None if unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("labels").get_shape()[0])
    except Exception:
        return None


def _shard_latent_shape(path: Path) -> list[int]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return [int(s) for s in f.get_slice("mean").get_shape()[2:]]


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
) -> dict:
    """Encode an ImageFolder tree into sharded posterior statistics; returns the meta dict.

    Args:
        image_root: ImageFolder-layout directory (``root/<class>/<image>``).
        out_dir: output directory (created).  See the module docstring for the format.
        vae: a ``diffusers.AutoencoderKL`` (or anything whose ``encode(x).latent_dist`` has ``.mean``
            and ``.std``); the caller loads it.  It is put in eval mode (and moved to ``device`` if given).
        image_size: ADM centre-crop size S (images are (3, S, S) in [-1, 1] before encoding).
        batch_size: images per VAE call (each call encodes 2 * batch_size images: originals + flips).
        shard_size: images per ``shard_XXXXX.safetensors`` file.
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
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError("shard_size and batch_size must be positive")
    if not isinstance(vae_id, str) or not vae_id:
        raise ValueError("vae_id must be a non-empty string (the hub id or path the VAE was loaded from)")
    store_dtype = _DTYPES[dtype]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    dataset = ImageFolderDataset(image_root, image_size=image_size)
    n_total = len(dataset)
    if max_images is not None:
        n_total = min(n_total, int(max_images))
    num_shards = math.ceil(n_total / shard_size)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vae_id": vae_id,
        "latent_scale": float(latent_scale),
        "image_size": int(image_size),
        "num_images": n_total,
        "num_classes": len(dataset.classes),
        "classes": list(dataset.classes),
        "shard_size": int(shard_size),
        "dtype": dtype,
    }

    meta_path, state_path = out / META_FILE, out / STATE_FILE
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        same = old is not None and all(old.get(k) == v for k, v in config.items())
        if same and resume and all((out / s["file"]).is_file() for s in old.get("shards", [])):
            return old  # already done with identical settings
        if not same and not overwrite:
            diff = [] if old is None else [k for k, v in config.items() if old.get(k) != v]
            raise ValueError(
                f"{str(out)!r} already holds a latent extraction with different settings "
                f"(differing: {diff or 'unreadable meta.json'}; recorded vae_id="
                f"{None if old is None else old.get('vae_id')!r}, requested vae_id={vae_id!r}); "
                "pass overwrite=True or choose another output directory"
            )
        meta_path.unlink()
        if same and resume:  # finished run with a shard missing: re-use the shards that are there
            _atomic_write_json(state_path, config)
    if not resume or overwrite:
        state_path.unlink(missing_ok=True)
    # stale shards from a run with other settings must go
    resumable = False
    if state_path.exists():
        try:
            resumable = json.loads(state_path.read_text()) == config
        except (OSError, ValueError):
            resumable = False
    if not resumable:
        for p in out.glob("shard_*.safetensors"):
            p.unlink()
    _atomic_write_json(state_path, config)

    if device is not None:
        vae = vae.to(device)
    vae.eval()

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    pbar = tqdm(total=n_total, desc="extract-features", unit="img", disable=not progress) if tqdm else None

    shards_meta: list[dict] = []
    latent_shape: list[int] | None = None
    file_meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "vae_id": vae_id,
                 "latent_scale": repr(float(latent_scale)), "image_size": str(int(image_size)),
                 "layout": "mean/std: (n, 2, C, h, w), index 1 of dim 1 = horizontally flipped image; unscaled"}
    try:
        for s in range(num_shards):
            start, stop = s * shard_size, min(n_total, (s + 1) * shard_size)
            fname = SHARD_PATTERN.format(s)
            path = out / fname
            if resumable and path.exists() and _shard_num_images(path) == stop - start:
                shards_meta.append({"file": fname, "num_images": stop - start})
                if latent_shape is None:
                    latent_shape = _shard_latent_shape(path)
                if pbar is not None:
                    pbar.update(stop - start)
                continue
            loader = DataLoader(
                Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                num_workers=num_workers, drop_last=False,
            )
            means, stds, labels = [], [], []
            for x, y in loader:
                b = x.shape[0]
                mu, sd = encode_posterior(vae, torch.cat([x, x.flip(-1)], dim=0))
                mu = torch.stack([mu[:b], mu[b:]], dim=1)  # (b, 2, C, h, w)
                sd = torch.stack([sd[:b], sd[b:]], dim=1)
                if latent_shape is None:
                    latent_shape = [int(v) for v in mu.shape[2:]]
                means.append(mu.to("cpu", store_dtype))
                stds.append(sd.to("cpu", store_dtype))
                labels.append(torch.as_tensor(y, dtype=torch.int64))
                if pbar is not None:
                    pbar.update(b)
            _atomic_save_safetensors(
                path,
                {"mean": torch.cat(means), "std": torch.cat(stds), "labels": torch.cat(labels)},
                file_meta,
            )
            shards_meta.append({"file": fname, "num_images": stop - start})
    finally:
        if pbar is not None:
            pbar.close()

    meta = dict(config)
    meta.update(
        {
            "latent_shape": latent_shape,
            "shards": shards_meta,
            "flip_index": {"0": "original", "1": "horizontal flip"},
            "layout": "shard tensors: mean, std (n, 2, C, h, w) unscaled posterior; labels (n,) int64",
            "crop": "adm_center_crop",
            "pixel_range": [-1.0, 1.0],
        }
    )
    _atomic_write_json(meta_path, meta)
    state_path.unlink(missing_ok=True)
    return meta


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

            self._shards = [load_file(str(f)) for f in self.files]
            self.labels = torch.cat([s["labels"] for s in self._shards]).long()
        else:
            from safetensors import safe_open

            labels = []
            for f in self.files:
                with safe_open(str(f), framework="pt") as h:
                    labels.append(h.get_tensor("labels"))
            self.labels = torch.cat(labels).long()

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
