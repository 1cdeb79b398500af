"""Small helpers shared across the package: one place each (files, hashes, JSON, model wrappers)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, fsync it and rename it into place, so a
    reader sees the old file or the new one, never half of one; the temporary file never outlives a failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def jsonable(v):
    """Nested dicts / lists of tensors, arrays, numpy scalars, paths, devices -> plain JSON values.
    Non-finite floats become None (JSON has no NaN); anything else unknown becomes its ``str``."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return jsonable(v.detach().cpu().tolist())
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, np.generic):
        return jsonable(v.item())
    if isinstance(v, float):
        return v if np.isfinite(v) else None
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module behind DDP and torch.compile wrappers, stripped by type (never by world size)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def cpu_info() -> dict[str, str]:
    """The CPU's model name and vendor from /proc/cpuinfo ("unknown" where it cannot be read): what
    benchmarks, timings and pinned outputs record, since CPU kernels and speed depend on them."""
    import platform

    first: dict[str, str] = {}  # the first processor's block
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return {"model": first.get("model name") or platform.processor() or "unknown", "vendor": first.get("vendor_id", "unknown")}
