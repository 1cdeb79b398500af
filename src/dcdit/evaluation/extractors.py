"""Feature networks for FID / Inception Score / precision-recall, read from LOCAL files only.

The network is supplied by the user; nothing is ever downloaded (docs/evaluation.md says why the
TorchScript Inception file and not torch-fidelity):

* ``kind="nvlabs"``: the TorchScript Inception-v3 of StyleGAN2-ADA / StyleGAN3 / clean-fid
  (``inception-2015-12-05.pt``, a direct translation of the TF graph the ADM suite uses). It is
  called as ``net(x_uint8_nchw, return_features=True)`` for the 2048-d pool features and
  ``net(x, no_output_bias=True)`` for the 1008-way softmax (Inception Score), as those tools do;
  it resizes to 299×299 internally.
* ``kind="generic"``: any TorchScript module mapping float images (``input_range``) to features
  (a tensor), or to ``(features, logits)`` (a tuple) for the Inception Score.
* In Python, any :class:`FeatureExtractor` (e.g. :class:`ModuleExtractor` around an ``nn.Module``).

The MNIST metrics use their own network, the packaged classifier (:mod:`.mnist_classifier`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import sha256_file
from .images import check_samples

__all__ = [
    "INPUT_RANGES",
    "FeatureExtractor",
    "ModuleExtractor",
    "NVLabsInceptionExtractor",
    "load_feature_extractor",
    "compute_features",
]

# how uint8 values are mapped for a generic network: x = u8 * scale + offset, as (offset, scale)
INPUT_RANGES = {"0-255": (0.0, 1.0), "0-1": (0.0, 1.0 / 255.0), "-1-1": (-1.0, 2.0 / 255.0)}


class FeatureExtractor:
    """Maps a batch of uint8 images (B, 3, H, W) to ``(features (B, D), probs (B, K) or None)``.

    Subclasses set ``has_probs`` (class probabilities available for the Inception Score) and
    implement :meth:`extract`; :meth:`describe` goes into the results JSON, and its ``identity``
    guards precomputed reference statistics against a different network.
    """

    has_probs: bool = False
    name: str = "custom"

    def extract(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.name}

    @property
    def identity(self) -> str:
        return str(self.describe().get("identity", self.name))


def _split_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A generic network's output (features / (features, logits) / {"features", "logits"}) -> (features, logits)."""
    if isinstance(out, dict):
        return out["features"], out.get("logits")
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


class ModuleExtractor(FeatureExtractor):
    """An ``nn.Module`` / TorchScript module ``f(x)`` on float images.

    ``input_range``: "0-255", "0-1" or "-1-1" (how uint8 values are scaled). ``resize``: optional
    side length, bilinear resize (antialias off, as pytorch-fid) before the call. The module returns
    features (B, D), or ``(features, logits)`` for the Inception Score (softmax is applied here),
    or a dict with ``features`` and optionally ``logits``.
    """

    def __init__(self, module: Callable, *, input_range: str = "0-255", resize: int | None = None,
                 name: str = "module", identity: str | None = None, has_probs: bool | None = None,
                 device: str | torch.device = "cpu"):
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {list(INPUT_RANGES)}, got {input_range!r}")
        self.module, self.input_range, self.resize = module, input_range, resize
        self.name, self._identity, self.device = name, identity or name, torch.device(device)
        self._has_probs = has_probs
        if isinstance(module, nn.Module):
            module.eval()

    @property
    def has_probs(self) -> bool:  # type: ignore[override]
        return bool(self._has_probs)

    def extract(self, images_u8):
        off, scale = INPUT_RANGES[self.input_range]
        x = images_u8.to(self.device).float() * scale + off
        if self.resize and tuple(x.shape[-2:]) != (self.resize, self.resize):
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        feats, logits = _split_output(self.module(x))
        if self._has_probs is None:
            self._has_probs = logits is not None
        probs = torch.softmax(logits.double(), dim=1) if logits is not None else None
        return feats.reshape(feats.shape[0], -1), probs

    def describe(self) -> dict:
        return {"name": self.name, "kind": "generic", "identity": self._identity,
                "input_range": self.input_range, "resize": self.resize}


class NVLabsInceptionExtractor(FeatureExtractor):
    """The TorchScript Inception-v3 of StyleGAN2-ADA/StyleGAN3 (``inception-2015-12-05.pt``).

    Features: ``net(x, return_features=True)`` (2048-d pool3); probabilities:
    ``net(x, no_output_bias=True)`` (1008-way softmax, as the original TF Inception Score). The
    network takes uint8-valued NCHW tensors of any size and resizes to 299 itself.
    """

    has_probs = True

    def __init__(self, module, name: str = "nvlabs-inception", identity: str | None = None, device="cpu"):
        self.module, self.name, self._identity, self.device = module, name, identity or name, torch.device(device)

    def extract(self, images_u8):
        x = images_u8.to(self.device)
        feats = self.module(x, return_features=True)
        probs = self.module(x, no_output_bias=True)
        return feats.reshape(feats.shape[0], -1), probs.double()

    def describe(self) -> dict:
        return {"name": self.name, "kind": "nvlabs", "identity": self._identity, "input_range": "0-255 (uint8)",
                "resize": "299 inside the network"}


def _load_torchscript(path, device) -> tuple[Path, torch.jit.ScriptModule]:
    s = str(path)
    if "://" in s:
        raise ValueError(f"{s}: feature extractors are loaded from local files only (dcdit never downloads); "
                         f"fetch the file yourself and pass its path")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"feature extractor {p} not found")
    try:
        module = torch.jit.load(str(p), map_location=device)
    except Exception as e:  # noqa: BLE001 - report what the file must be
        raise ValueError(f"{p}: not a TorchScript file that torch.jit.load can read ({type(e).__name__}: {e}); "
                         f"pickled networks (.pkl) are not loaded for safety") from e
    return p, module.eval()


def load_feature_extractor(path, kind: str = "auto", input_range: str = "0-255", resize: int | None = None,
                           device: str | torch.device = "cpu") -> FeatureExtractor:
    """Load a TorchScript feature network from a LOCAL file (URLs are refused: nothing downloads).

    ``kind``: "nvlabs" (StyleGAN-style Inception: ``return_features`` / ``no_output_bias``
    keywords), "generic" (see :class:`ModuleExtractor`) or "auto" (nvlabs when the forward
    accepts ``return_features``). The file's sha256 is the extractor's identity.
    """
    p, module = _load_torchscript(path, device)
    if kind == "auto":
        try:
            schema = str(module.forward.schema)
        except Exception:  # noqa: BLE001
            schema = ""
        kind = "nvlabs" if "return_features" in schema else "generic"
    ident = f"{p.name}:sha256={sha256_file(p)}"
    if kind == "nvlabs":
        return NVLabsInceptionExtractor(module, name=p.name, identity=ident, device=device)
    if kind == "generic":
        return ModuleExtractor(module, input_range=input_range, resize=resize, name=p.name, identity=ident, device=device)
    raise ValueError(f"kind must be 'auto', 'nvlabs' or 'generic', got {kind!r}")


@torch.no_grad()
def compute_features(images_u8: np.ndarray, extractor: FeatureExtractor, batch_size: int = 100,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Checked uint8 images (N, H, W, 3) -> (features (N, D) float64, probabilities (N, K) float64 or None)."""
    images_u8 = check_samples(images_u8)
    feats, probs = [], []
    rng = range(0, len(images_u8), batch_size)
    if progress:
        from tqdm.auto import tqdm

        rng = tqdm(rng, desc="features")
    for i in rng:
        x = torch.from_numpy(images_u8[i: i + batch_size]).permute(0, 3, 1, 2).contiguous()
        f, p = extractor.extract(x)
        feats.append(f.detach().double().cpu())
        if p is not None:
            probs.append(p.detach().double().cpu())
    f = torch.cat(feats).numpy()
    if not np.isfinite(f).all():
        raise ValueError(f"the feature extractor returned {int((~np.isfinite(f)).sum())} non-finite feature values")
    return f, (torch.cat(probs).numpy() if probs else None)
