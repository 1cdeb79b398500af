"""Checkpoints: safetensors weights + a training-state file, written atomically; safe loading.

A training checkpoint is a folder ``<run>/checkpoints/<step:07d>/`` holding

* ``model.safetensors`` – the raw weights, ``ema.safetensors`` – the EMA weights. Each carries the
  resolved run config (JSON) and the step in its safetensors metadata, so either file alone is a
  complete, shareable model (``dcdit sample --ckpt .../ema.safetensors``).
* ``training_state.pt`` – optimizer state, step, counters and RNG states (tensors and plain Python
  values only; read back with ``torch.load(weights_only=True)``).
* ``config.yaml`` – the resolved run config.

The folder is written under a temporary name and renamed into place, then ``checkpoints/latest`` is
replaced atomically, so a crash never leaves a half-written checkpoint behind.
Foreign ``.pt`` files (official DiT releases) are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from .utils import atomic_write_text
from .config import RunConfig, build_model, run_config_from_dict, run_config_to_dict

CONFIG_KEY = "dcdit_config"


def save_weights(path: Path, state_dict: dict, cfg: RunConfig, step: int) -> None:
    """One safetensors file with the config and step in its metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {CONFIG_KEY: json.dumps(run_config_to_dict(cfg)), "step": str(step), "format": "dcdit-1"}
    save_file(tensors, str(path), metadata=metadata)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.array(np.random.get_state()[1], dtype=np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, ema, optimizer, cfg: RunConfig, extra: dict, keep_last: int = 2) -> Path:
    """Write ``checkpoints/<step>`` atomically and point ``checkpoints/latest`` at it."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{step:07d}"
    tmp = ckpt_root / f".tmp-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp / "model.safetensors", model.state_dict(), cfg, step)
    save_weights(tmp / "ema.safetensors", ema.state_dict(), cfg, step)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "rng": rng_state(), **extra}, tmp / "training_state.pt")
    (tmp / "config.yaml").write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name)
    _prune(ckpt_root, keep_last, keep=final.name)
    return final


def _prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.isdigit())
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder, its ``checkpoints`` folder, or one checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.exists():
            return root / latest.read_text().strip()
    if (path / "model.safetensors").exists():
        return path
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a run folder (with checkpoints/latest), a checkpoint folder "
        f"(with model.safetensors) or a .safetensors file written by `dcdit train`"
    )


def read_weights(path: str | os.PathLike) -> tuple[dict, RunConfig, int]:
    """A dcdit safetensors file -> (state_dict, run config, step)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if CONFIG_KEY not in meta:
            raise ValueError(
                f"{path} has no dcdit config in its metadata: it was not written by dcdit. "
                f"Load foreign DiT checkpoints with dcdit.checkpoint.load_foreign_state_dict"
            )
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, run_config_from_dict(json.loads(meta[CONFIG_KEY])), int(meta.get("step", 0))


def load_state_dict_checked(model: torch.nn.Module, state: dict, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        def head(xs):
            return ", ".join(xs[:5]) + (f" … (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        parts = [f"missing keys [{head(missing)}]" if missing else "",
                 f"unexpected keys [{head(unexpected)}]" if unexpected else "",
                 f"shape mismatches [{head(shapes)}]" if shapes else ""]
        raise ValueError(
            f"checkpoint {source} does not match the model: " + "; ".join(p for p in parts if p)
            + ". Check that the config (model section) is the one the checkpoint was trained with."
        )
    model.load_state_dict(state, strict=True)


def load_model(path: str | os.PathLike, use_ema: bool = True, device="cpu") -> tuple[torch.nn.Module, RunConfig, int]:
    """Build the model a dcdit checkpoint describes and load its (EMA) weights.

    ``path``: a ``.safetensors`` file, a checkpoint folder or a run folder (its latest checkpoint).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        path = find_checkpoint(path) / ("ema.safetensors" if use_ema else "model.safetensors")
    state, cfg, step = read_weights(path)
    model = build_model(cfg.model)
    load_state_dict_checked(model, state, str(path))
    return model.to(device).eval(), cfg, step


def load_foreign_state_dict(path: str | os.PathLike, prefer: str = "ema") -> dict:
    """An official DiT ``.pt`` (bare state dict, or one under ``ema`` / ``model``), read safely."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and any(k in obj for k in ("ema", "model")):
        key = prefer if prefer in obj else ("ema" if "ema" in obj else "model")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj
