"""Typed model configs, the paper's presets, and the one place that turns a config into a model.

A model config is a :class:`DiTConfig` or a :class:`DCDiTConfig`. From a dict (a YAML ``model:``
section) it is built by :func:`model_config_from_dict`: ``preset`` picks a named starting point and
every other key overrides a field; unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch.nn as nn


@dataclass
class DiTConfig:
    """The fixed-patch DiT baseline (arguments of :class:`dcdit.models.dit.DiT`)."""

    arch: str = "dit"
    input_size: int | tuple[int, int] = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    timestep_freq_shift: float = 0.0


@dataclass
class DCDiTConfig:
    """DC-DiT (arguments of :class:`dcdit.models.dcdit.DCDiT`); ``target_ratio`` is the N of the ratio
    loss (and the boundary rate of the random router)."""

    arch: str = "dcdit"
    input_size: int | tuple[int, int] = 32
    in_channels: int = 4
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    timestep_freq_shift: float = 0.0
    encoder_width: int | None = None
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    conv_norm_groups: int = 32
    router: str = "cosine"
    target_ratio: float = 4.0
    dechunk_sigma: float = 1.0
    residual_init: str = "zero"
    mask_padding: bool = True
    cond_adaptor: bool = False


ModelConfig = DiTConfig | DCDiTConfig

_DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

MODEL_PRESETS: dict[str, ModelConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(hidden_size=D, depth=depth, num_heads=heads, patch_size=patch)
    for size, (D, depth, heads) in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}
MODEL_PRESETS.update(
    {
        f"DC-DiT-{size}/N{n}": DCDiTConfig(hidden_size=D, depth=depth, num_heads=heads, target_ratio=float(n))
        for size, (D, depth, heads) in {"B": _DIT_SIZES["B"], "XL": _DIT_SIZES["XL"]}.items()
        for n in (4, 16)
    }
)

#: Parameter counts the papers report (millions), for the presets table.
PAPER_PARAMS_M = {"DiT-S/2": 33.0, "DiT-B/2": 130.0, "DiT-L/2": 458.0, "DiT-XL/2": 675.0,
                  "DC-DiT-B/N4": 138.0, "DC-DiT-B/N16": 138.0, "DC-DiT-XL/N4": 690.0, "DC-DiT-XL/N16": 690.0}


def get_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name])


def model_config_from_dict(d: dict) -> ModelConfig:
    """{"preset": "DC-DiT-B/N4", "input_size": 32, ...} or {"arch": "dcdit", ...} -> a config."""
    d = dict(d)
    preset = d.pop("preset", None)
    if preset is not None:
        base = get_preset(preset)
    else:
        arch = d.get("arch", "dcdit")
        classes = {"dit": DiTConfig, "dcdit": DCDiTConfig}
        if arch not in classes:
            raise ValueError(f"unknown model arch {arch!r}; valid: {sorted(classes)}")
        base = classes[arch]()
    valid = {f.name for f in fields(base)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(
            f"unknown model config key(s) {unknown} for arch {base.arch!r}; valid keys: preset, {', '.join(sorted(valid))}"
        )
    if d.get("arch", base.arch) != base.arch:
        raise ValueError(f"preset {preset!r} is arch {base.arch!r}, but the config says arch {d['arch']!r}")
    if isinstance(d.get("input_size"), list):
        d["input_size"] = tuple(d["input_size"])
    return dataclasses.replace(base, **d)


def build_model(config: ModelConfig | dict | str) -> nn.Module:
    """A config (dataclass, dict or preset name) -> a freshly initialised DiT or DCDiT."""
    from .models.dcdit import DCDiT
    from .models.dit import DiT

    if isinstance(config, str):
        config = get_preset(config)
    elif isinstance(config, dict):
        config = model_config_from_dict(config)
    kwargs = dataclasses.asdict(config)
    arch = kwargs.pop("arch")
    return {"dit": DiT, "dcdit": DCDiT}[arch](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """All parameters, including DiT's frozen ``pos_embed`` (as the DiT release counts them)."""
    return sum(p.numel() for p in model.parameters())
