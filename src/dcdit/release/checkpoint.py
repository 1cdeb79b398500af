"""Reading a checkpoint written by the release's ``train.py`` safely, and converting it to a dcdit run.

An official checkpoint is ``torch.save({"model", "ema", "opt", "config"})`` where ``config`` is a pickled
instance of the release's ``config.Config`` dataclass (and its six nested dataclasses), with every
weight storage tagged ``cuda:0``. It is read here with ``torch.load(weights_only=True,
map_location="cpu")`` and empty stand-in classes allow-listed under exactly those seven names, so no
code from the file ever runs and no GPU is needed; a file that pickles any other global is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import DataConfig, MultiBudgetConfig, RunConfig, TrainConfig, model_config_to_dict, run_config_to_dict
from ..utils import atomic_write_text, sha256_file
from .keys import model_from_release, release_key_map
from .layout import release_model_config

CONFIG_CLASSES = ("Config", "ModelConfig", "HNetConfig", "TrainingConfig", "DataConfig", "DiffusionConfig", "LoggingConfig")
#: The release's scripts hard-code these: 4 latent channels of the SD VAE, the image size / 8 grid; its
#: sampler decodes with stabilityai/sd-vae-ft-<ema|mse> (ema by default), which a checkpoint does not record.
LATENT_CHANNELS, VAE_DOWNSAMPLING, RELEASE_VAE = 4, 8, "stabilityai/sd-vae-ft-ema"


def _stand_in(name: str) -> type:
    return type(name, (), {"__module__": "dcdit.release.standins",
                           "__doc__": f"Empty stand-in for the release's config.{name}: unpickling fills its __dict__."})


_STAND_INS = [(_stand_in(name), f"config.{name}") for name in CONFIG_CLASSES]


def _plain(obj):
    """Stand-in dataclass instances -> nested dicts; containers recursively; anything else as is."""
    if any(isinstance(obj, cls) for cls, _ in _STAND_INS):
        return {k: _plain(v) for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


@dataclass
class ReleaseCheckpoint:
    """What an official checkpoint holds. ``config`` is the run configuration as nested dicts
    (``model``, ``training``, ``data``, ``diffusion``, ``logging``, ``ckpt``); ``step`` comes from a
    ``0050000.pt``-style file name (None otherwise)."""

    path: Path
    model: dict | None = None
    ema: dict | None = None
    opt: dict | None = None
    config: dict | None = None
    step: int | None = None
    extra_keys: list[str] = field(default_factory=list)


def read_release_checkpoint(path: str | os.PathLike) -> ReleaseCheckpoint:
    """Load an official checkpoint (or a bare state dict) without unpickling anything but tensors,
    containers and the seven config classes; one-line errors for everything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"release checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:  # not a pickle a torch.save wrote (bad opcodes, truncated)
            raise ValueError(f"{path} is not a readable torch checkpoint (its pickle is malformed)") from None
        raise ValueError(f"{path}: refusing to unpickle {found.group(1)}: an official checkpoint holds only tensors, plain "
                         "containers and the release's config.* dataclasses") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    step = int(path.stem) if re.fullmatch(r"\d{7}", path.stem) else None
    if isinstance(obj, dict) and ("model" in obj or "ema" in obj):
        return ReleaseCheckpoint(path, obj.get("model"), obj.get("ema"), obj.get("opt"), _plain(obj.get("config")), step,
                                 sorted(set(obj) - {"model", "ema", "opt", "config"}))
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return ReleaseCheckpoint(path, model=obj, step=step)  # a bare state dict, as sample.py also accepts
    raise ValueError(f"{path} holds neither an official checkpoint (model/ema/opt/config) nor a state dict")


def model_section(config: dict) -> dict:
    """The run configuration of an official checkpoint -> the model description of :func:`release_model_config`,
    completed the way the release's scripts build the network (grid = image_size / 8, 4 channels)."""
    try:
        training, data = config["training"], config["data"]
        return {"model": config["model"], "input_size": int(data["image_size"]) // VAE_DOWNSAMPLING,
                "in_channels": LATENT_CHANNELS, "num_classes": int(data["num_classes"]),
                "class_dropout_prob": float(training["class_dropout_prob"]), "learn_sigma": bool(training["learn_sigma"])}
    except (KeyError, TypeError) as e:
        raise ValueError(f"the checkpoint's config lacks {e} (expected the release's Config: model, training, data, …)") from None


def _first(value) -> float:
    return float(value[0] if isinstance(value, (list, tuple)) else value)


def train_section(training: dict) -> TrainConfig:
    """The release's training settings -> ours (values arrive as YAML parsed them, e.g. lr as "1e-4")."""
    mb_start = training.get("multi_budget_start_step")
    start = training.get("downsample_factor_start")
    return TrainConfig(
        global_batch_size=int(training["global_batch_size"]), lr=float(training["learning_rate"]),
        weight_decay=float(training["weight_decay"]), ema_decay=float(training["ema_decay"]),
        grad_clip=float(training["max_grad_norm"]), ratio_loss_weight=float(training["ratio_loss_weight"]),
        ratio_batch_size=int(training.get("ratio_batch_size") or training["global_batch_size"]),
        multi_budget=MultiBudgetConfig(
            fractions=[float(f) for f in training["multi_budget_drop_fractions"]] if training.get("multi_budget_training") else [],
            start_step=int(mb_start if mb_start is not None else training.get("downsample_factor_warmup_steps", 0))),
        target_ratio_start=None if start is None else _first(start),
        target_ratio_warmup_steps=int(training.get("downsample_factor_warmup_steps", 0)),
    )


@dataclass
class ConversionReport:
    out: Path
    step: int
    weights: str
    key_map: dict[str, str]
    run_config: RunConfig

    def summary(self) -> str:
        """The key map folded over block indices: one line per module kind, with its tensor count."""
        groups: dict[tuple[str, str], int] = {}
        for theirs, ours in self.key_map.items():
            key = (re.sub(r"\.layers\.\d+\.", ".layers.{i}.", theirs.rsplit(".", 1)[0]),
                   re.sub(r"^(\w+\.)?blocks\.\d+\.", lambda m: f"{m.group(1) or ''}blocks.{{i}}.", ours.rsplit(".", 1)[0]))
            groups[key] = groups.get(key, 0) + 1
        lines = [f"  {theirs:<52} -> {ours:<32} {n:>4}" for (theirs, ours), n in groups.items()]
        return "\n".join([f"key mapping, release -> dcdit ({len(self.key_map)} tensors; pos_embed is checked against "
                          "the sin-cos table, not copied):", *lines])


def convert_release_checkpoint(path: str | os.PathLike, out: str | os.PathLike, weights: str = "ema") -> ConversionReport:
    """Write an official checkpoint as a dcdit run folder: ``checkpoints/<step>/ema.safetensors`` holds the
    chosen weights (``ema`` by default, what the release's sampler uses), ``model.safetensors`` the raw
    ``model`` weights, with the resolved run config in both and in ``config.yaml``; ``conversion.json``
    records the source (sha256) and the full key map. No optimizer state: continue with ``train.init_from``."""
    from ..checkpoint import save_weights

    if weights not in ("ema", "model"):
        raise ValueError(f"--weights must be 'ema' or 'model', got {weights!r}")
    ckpt = read_release_checkpoint(path)
    if ckpt.config is None:
        raise ValueError(f"{path} is a bare state dict without the release's config: convert a checkpoint written by its train.py")
    chosen = getattr(ckpt, weights)
    if chosen is None:
        raise ValueError(f"{path} has no {weights!r} weights: use --weights {'model' if weights == 'ema' else 'ema'}")
    section = model_section(ckpt.config)
    target = _first(ckpt.config["training"]["downsample_factor"])
    schedule = (ckpt.config.get("diffusion") or {}).get("noise_schedule", "linear")
    ema = model_from_release(chosen, section, target, schedule)
    raw = model_from_release(ckpt.model, section, target, schedule) if ckpt.model is not None else ema
    run_cfg = RunConfig(model=release_model_config(section, target, schedule), train=train_section(ckpt.config["training"]),
                        data=DataConfig(name="latents", latent_scale=0.18215))  # the VAE is not recorded by the release
    step = ckpt.step or 0
    _write_run(Path(out), step, {"ema.safetensors": ema, "model.safetensors": raw}, run_cfg, save_weights)
    key_map = release_key_map(section)
    record = {"source": str(Path(path).resolve()), "source_sha256": sha256_file(path), "weights": weights, "step": step,
              "release_config": ckpt.config, "key_map": key_map, "model": model_config_to_dict(run_cfg.model)}
    atomic_write_text(Path(out) / "conversion.json", json.dumps(record, indent=2) + "\n")
    return ConversionReport(Path(out), step, weights, key_map, run_cfg)


def _write_run(out: Path, step: int, files: dict, run_cfg: RunConfig, save_weights) -> None:
    """A run folder with one checkpoint, written under a temporary name and renamed into place."""
    import yaml

    root = out / "checkpoints"
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{out} already holds checkpoints: choose a new --out")
    root.mkdir(parents=True, exist_ok=True)
    tmp, final = root / f".tmp-{step:07d}-{os.getpid()}", root / f"{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, model in files.items():
        save_weights(tmp / name, model.state_dict(), run_cfg, step)
    text = yaml.safe_dump(run_config_to_dict(run_cfg), sort_keys=False)
    (tmp / "config.yaml").write_text(text)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    atomic_write_text(out / "config.yaml", text)
