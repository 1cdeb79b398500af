"""Checkpoints: safetensors weights + a training-state file, written atomically; safe loading.

A training checkpoint is a folder ``<run>/checkpoints/<step:07d>/`` holding

* ``model.safetensors`` – the raw weights, ``ema.safetensors`` – the EMA weights. Each carries the
  resolved run config (JSON) and the step in its safetensors metadata, so either file alone is a
  complete, shareable model (``dcdit sample --ckpt .../ema.safetensors``).
* ``training_state.pt`` – optimizer state, step, counters and RNG states (tensors and plain Python
  values only; read back with ``torch.load(weights_only=True)``).
* ``config.yaml`` – the resolved run config.

* ``manifest.json`` – size and SHA-256 of each file above, written last.

The folder is written under a temporary name (``checkpoints/.tmp-<step>-<pid>``), fsynced and renamed
into place, then ``checkpoints/latest`` is replaced atomically, so a crash never leaves a half-written
checkpoint behind; the temporaries of a killed or failed write are removed by
:func:`remove_stale_temporaries` (at the next save, and when training starts or resumes). A full disk
while writing raises :class:`dcdit.errors.DiskFullError` naming the folder.

Reading: :func:`find_checkpoint` checks a checkpoint before handing it out (:func:`checkpoint_problems`:
files present, sizes as in the manifest, safetensors headers and the ``training_state.pt`` archive
readable; cheap, no file is read in full). When the latest checkpoint of a run is damaged it warns,
naming it, and returns the newest intact one. Foreign ``.pt`` files (official DiT releases) and
``training_state.pt`` are read with ``torch.load(weights_only=True)`` (:func:`torch_load_safely`).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import RunConfig, build_model, run_config_from_dict, run_config_to_dict
from .errors import (CheckpointError, DcditWarning, DiskFullError, UnsafePickleError, is_disk_full, one_line,
                     unpickling_refusal)
from .utils import atomic_write_text, sha256_file

CONFIG_KEY = "dcdit_config"
#: The files of a training checkpoint (all needed to resume; sampling needs one of the weights).
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "training_state.pt", "config.yaml")
#: What a checkpoint without a manifest must hold (older dcdit checkpoints, converted release runs).
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")
MANIFEST_FILE = "manifest.json"
TEMP_PREFIX = ".tmp-"


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


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete what killed or failed checkpoint writes left in ``<run>/checkpoints``: ``.tmp-*`` folders
    and the temporary files of ``latest``. Call it only while no other process writes checkpoints into
    this run (every run has one writer: rank 0). Returns the paths removed."""
    ckpt_root = Path(run_dir) / "checkpoints"
    if not ckpt_root.is_dir():
        return []
    stale = [p for p in ckpt_root.iterdir() if p.name.startswith(TEMP_PREFIX)
             or (p.name.startswith(".latest.") and p.name.endswith(".tmp"))]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def save_checkpoint(run_dir: Path, step: int, model, ema, optimizer, cfg: RunConfig, extra: dict, keep_last: int = 2) -> Path:
    """Write ``checkpoints/<step>`` atomically and point ``checkpoints/latest`` at it.

    A failed write leaves nothing behind (its temporary folder is removed); a full disk raises
    :class:`DiskFullError` naming the folder."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    final = ckpt_root / f"{step:07d}"
    tmp = ckpt_root / f"{TEMP_PREFIX}{step:07d}-{os.getpid()}"
    try:
        tmp.mkdir()
        state = {"optimizer": optimizer.state_dict(), "step": step, "rng": rng_state(), **extra}
        _write_checkpoint_files(tmp, step, model, ema, state, cfg)
    except BaseException as e:
        full = is_disk_full(e)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            free = shutil.disk_usage(ckpt_root).free / 2**20
            raise DiskFullError(
                f"the disk is full: could not write checkpoint {final.name} into {ckpt_root} ({free:.1f} MiB free; the "
                "partial copy was removed). Free some space (or lower train.keep_last) and continue with --resume",
                ckpt_root) from e
        raise
    _move_into_place(tmp, final)
    atomic_write_text(ckpt_root / "latest", final.name)
    _prune(ckpt_root, keep_last, keep=final.name)
    return final


def _write_checkpoint_files(folder: Path, step: int, model, ema, state: dict, cfg: RunConfig) -> None:
    """The four files, the manifest of their sizes and hashes, all flushed to disk."""
    save_weights(folder / "model.safetensors", model.state_dict(), cfg, step)
    save_weights(folder / "ema.safetensors", ema.state_dict(), cfg, step)
    with open(folder / "training_state.pt", "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC)
        torch.save(state, f)
    (folder / "config.yaml").write_text(yaml.safe_dump(run_config_to_dict(cfg), sort_keys=False))
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in CHECKPOINT_FILES}
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": "dcdit-checkpoint-manifest", "step": step, "files": files}, indent=1))
    for name in (*CHECKPOINT_FILES, MANIFEST_FILE):
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step written again) is moved aside first,
    so a crash leaves either folder intact, never none."""
    old = None
    if final.exists():
        old = final.with_name(f"{TEMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    steps = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.isdigit())
    for old in steps[: max(0, len(steps) - keep_last)]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _header_problem(path: Path) -> str | None:
    """Why a checkpoint file cannot be read, from its header alone (None when it can)."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                if CONFIG_KEY not in (f.metadata() or {}):
                    return "no dcdit config in its metadata"
        elif path.suffix == ".pt":
            with zipfile.ZipFile(path) as z:  # reads the central directory at the end: a truncated file has none
                if not any(n.endswith("data.pkl") for n in z.namelist()):
                    return "not a torch.save archive"
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
    except (SafetensorError, zipfile.BadZipFile, yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        return one_line(e) or type(e).__name__
    return None


def checkpoint_problems(folder: str | os.PathLike, require: tuple[str, ...] | None = None, full: bool = False) -> list[str]:
    """What is wrong with the files ``require`` of one checkpoint folder; [] when it is intact.
    ``require=None``: every file its manifest lists, or the two weight files when it has no manifest
    (checkpoints written before manifests existed, converted release runs).

    Cheap by default: each file exists, has the size the manifest recorded, and its header reads
    (safetensors header and metadata, the zip directory of ``training_state.pt``, the YAML).
    ``full=True`` also compares every file's SHA-256 with the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["the folder does not exist"]
    recorded: dict = {}
    if (folder / MANIFEST_FILE).exists():
        try:
            recorded = json.loads((folder / MANIFEST_FILE).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return [f"{MANIFEST_FILE} is unreadable"]
    problems = []
    for name in require or tuple(recorded) or WEIGHT_FILES:
        path, entry = folder / name, recorded.get(name)
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif entry and path.stat().st_size != entry["bytes"]:
            size = path.stat().st_size
            problems.append(f"{name} is {'truncated' if size < entry['bytes'] else 'damaged'} "
                            f"({size} bytes, {entry['bytes']} written)")
        elif full and entry and sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} is corrupt (its SHA-256 differs from the one written)")
        elif (problem := _header_problem(path)) is not None:
            problems.append(f"{name} is unreadable ({problem})")
    return problems


def _read_latest(ckpt_root: Path) -> str | None:
    try:
        return (ckpt_root / "latest").read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _numbered(ckpt_root: Path) -> list[Path]:
    return sorted((p for p in ckpt_root.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def newest_intact_checkpoint(ckpt_root: Path, require: tuple[str, ...] | None = None) -> Path:
    """The checkpoint ``latest`` names if it is intact, else the newest intact one (with a warning
    naming the damaged ones); a :class:`CheckpointError` listing every problem when none is intact."""
    latest = _read_latest(ckpt_root)
    candidates = ([ckpt_root / latest] if latest else []) + [p for p in _numbered(ckpt_root) if p.name != latest]
    rejected = []
    for candidate in candidates:
        problems = checkpoint_problems(candidate, require)
        if not problems:
            if rejected:
                warnings.warn(f"skipping damaged checkpoint(s) {', '.join(rejected)}; using {candidate}, the newest "
                              f"intact one", DcditWarning, stacklevel=3)
            return candidate
        rejected.append(f"{candidate} ({'; '.join(problems)})")
    raise CheckpointError(f"no intact checkpoint in {ckpt_root}: {', '.join(rejected) or 'it is empty'}. "
                          "Start a new run (another --out) or restore a copy of the run folder")


def find_checkpoint(path: str | os.PathLike, require: tuple[str, ...] | None = None) -> Path:
    """A run folder, its ``checkpoints`` folder, or one checkpoint folder -> the checkpoint folder whose
    files ``require`` (default: all it was written with, see :func:`checkpoint_problems`) are intact.
    For a run, that is ``latest`` or, when it is damaged, the newest intact checkpoint (with a warning);
    a checkpoint folder named directly must be intact itself."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        if root.is_dir() and ((root / "latest").exists() or _numbered(root)):
            return newest_intact_checkpoint(root, require)
    if any((path / name).exists() for name in ("model.safetensors", "ema.safetensors")):
        problems = checkpoint_problems(path, require)
        if problems:
            run = f"the run folder {path.parent.parent}" if path.parent.name == "checkpoints" else "the run folder"
            raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}. Pass {run} to use its newest "
                                  "intact checkpoint")
        return path
    raise FileNotFoundError(
        f"no checkpoint at {path}: expected a run folder (with checkpoints/latest), a checkpoint folder "
        f"(with model.safetensors) or a .safetensors file written by `dcdit train`"
    )


def _pickle_kind(path: Path) -> str | None:
    """"a torch.save archive" / "a pickle" when the file starts like one, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04":
        return "a torch.save archive"
    if head[:1] == b"\x80":
        return "a pickle"
    return None


def _not_safetensors(path: Path, error: Exception) -> str:
    """The message for a file ``read_weights`` cannot open: a ``.pt`` passed as a checkpoint, or a damaged file."""
    kind = _pickle_kind(path)
    if kind and path.name == "training_state.pt":
        return (f"{path} is the optimizer and RNG state of a checkpoint ({kind}), not a model: pass the checkpoint "
                f"folder {path.parent} or its ema.safetensors")
    if kind:
        return (f"{path} is {kind} (a PyTorch .pt file), not a dcdit checkpoint: pass a run folder, a checkpoint "
                f"folder or a .safetensors file written by `dcdit train`. A checkpoint of the authors' DC-DiT release "
                f"converts with `dcdit convert-release {path} --out RUN`; an official DiT .pt becomes a DC-DiT with "
                f"`dcdit upcycle CONFIG --dit {path} --out model.safetensors`")
    return (f"{path} is not a readable .safetensors file ({one_line(error)}): it is truncated or corrupt; "
            "pass its run folder to use the newest intact checkpoint")


def read_weights(path: str | os.PathLike) -> tuple[dict, RunConfig, int]:
    """A dcdit safetensors file -> (state_dict, run config, step)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if CONFIG_KEY not in meta:
                raise ValueError(
                    f"{path} has no dcdit config in its metadata: it was not written by dcdit. "
                    f"Load foreign DiT checkpoints with dcdit.checkpoint.load_foreign_state_dict"
                )
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(_not_safetensors(Path(path), e)) from e
    # As written: a model trained under older, looser checks must stay loadable (its constructor checks what it needs).
    return state, run_config_from_dict(json.loads(meta[CONFIG_KEY]), check=False), int(meta.get("step", 0))


def torch_load_safely(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file: a pickle
    holding other objects than tensors (:class:`UnsafePickleError`), a truncated or foreign file."""
    path = Path(path)
    if _pickle_kind(path) is None and path.exists():
        raise CheckpointError(f"{path} is not a PyTorch .pt file (neither a torch.save archive nor a pickle)")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(f"refused to load {path}: {unpickling_refusal(e)}. If you trust the file, load it "
                                "yourself and save its tensors as a plain state dict or .safetensors") from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} is not a complete .pt file ({' '.join(str(e).split()[:8])} ...): it is "
                              "truncated or corrupt") from e


def read_training_state(ckpt: str | os.PathLike) -> dict:
    """``<checkpoint>/training_state.pt`` (optimizer, step, RNG and counters), read safely."""
    return torch_load_safely(Path(ckpt) / "training_state.pt")


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
        name = "ema.safetensors" if use_ema else "model.safetensors"
        path = find_checkpoint(path, require=(name,)) / name
    state, cfg, step = read_weights(path)
    model = build_model(cfg.model)
    load_state_dict_checked(model, state, str(path))
    return model.to(device).eval(), cfg, step


def load_foreign_state_dict(path: str | os.PathLike, prefer: str = "ema") -> dict:
    """An official DiT ``.pt`` (bare state dict, or one under ``ema`` / ``model``), read safely."""
    obj = torch_load_safely(path)
    if isinstance(obj, dict) and any(k in obj for k in ("ema", "model")):
        key = prefer if prefer in obj else ("ema" if "ema" in obj else "model")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj
