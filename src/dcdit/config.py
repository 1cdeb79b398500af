"""Typed model configs, the paper's presets, and the one place that turns a config into a model.

A model config is a :class:`DiTConfig` or a :class:`DCDiTConfig`. From a dict (a YAML ``model:``
section) it is built by :func:`model_config_from_dict`: ``preset`` picks a named starting point and
every other key overrides a field; unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields

import torch.nn as nn
import yaml

from .config_checks import check_config_dict, check_run_config, read_config_file


@dataclass
class ModelConfigBase:
    """The fields every model has: the DiT backbone's constructor arguments (both :class:`DiTConfig`
    and :class:`DCDiTConfig` extend it; the defaults are DiT-XL's)."""

    arch: str = ""
    input_size: int | tuple[int, int] = 32
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    timestep_freq_shift: float = 0.0
    noise_schedule: str = "linear"  # the diffusion it is trained and sampled with: linear (DiT) or cosine
    label_embed_std: float = 0.02  # init std of the class-embedding table (DiT: 0.02); see configs/mnist.yaml


@dataclass
class DiTConfig(ModelConfigBase):
    """The fixed-patch DiT baseline (arguments of :class:`dcdit.models.dit.DiT`)."""

    arch: str = "dit"
    patch_size: int = 2


@dataclass
class DCDiTConfig(ModelConfigBase):
    """DC-DiT (arguments of :class:`dcdit.models.dcdit.DCDiT`); ``target_ratio`` is the N of the ratio
    loss (and the boundary rate of the random router)."""

    arch: str = "dcdit"
    hidden_size: int = 768  # the bare DC-DiT defaults to DC-DiT-B's sizes
    depth: int = 12
    num_heads: int = 12
    # ---- DC-DiT's own fields
    encoder_width: int | None = None
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    conv_norm_groups: int = 32
    router: str = "cosine"
    target_ratio: float = 4.0
    dechunk_sigma: float = 1.0
    residual_init: str = "zero"
    mask_padding: bool = True
    cond_adaptor: bool = False  # LayerNorm on c inside encoder and decoder (upcycling, paper §4.4)
    pos_scale: float = 1.0  # token (r, c) is at ((r − pos_offset)·pos_scale, ...) in the sin-cos table
    pos_offset: float = 0.0
    # DyDiT gates in the inner blocks (paper §4.5; docs/dydit.md). Off: the plain DC-DiT.
    dydit: bool = False
    dydit_token_hidden_ratio: float = 0.0625  # token router hidden width = D · ratio (DyDiT: D/16)
    dydit_tau: float = 5.0  # Gumbel-sigmoid temperature (at threshold 0.5 it only scales the STE gradient)
    dydit_threshold: float = 0.5  # a gate is on when sigmoid((logit + noise) / tau) > threshold
    # Release parity (docs/release.md): the defaults are our original choices, the comments give the
    # value that reproduces the authors' release (the `*-release` presets set all of them).
    conv_norm_eps: float = 1e-6  # GroupNorm eps of the conv blocks; release: 1e-5
    conv_stack_norm: str = "layernorm"  # norm after the encoder and the decoder: layernorm | rmsnorm (release)
    inner_stack_norm: str = "none"  # norm after the inner DiT blocks: none | rmsnorm (release) | layernorm
    router_centre_tap: bool = False  # predictability router: predict a token from itself too; release: true
    inner_adaln_init: str = "zero"  # inner blocks' adaLN init: zero (adaLN-Zero) | xavier (what the release runs)
    dechunk_eps: float = 0.0  # added to the de-chunk weight sums; release: 1e-8
    tail_drop_rounding: str = "tolerant"  # ⌊f·n⌋: tolerant (float64, 1e-6 slack) | float32 (release)
    # Inner network layout (models/packing.py): packed (real tokens of all samples in one sequence, time
    # follows the mean kept count) or padded (the reference: every sample padded to the batch maximum;
    # mask_padding: false always runs padded).
    execution: str = "packed"
    # One flag per inner block: false = a DiT block without MLP (the release's 'd' in its arch_layout,
    # docs/release.md); null = every block has its MLP.
    inner_mlp: list[bool] | None = None


ModelConfig = DiTConfig | DCDiTConfig

_DIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

MODEL_PRESETS: dict[str, ModelConfig] = {
    f"DiT-{size}/{patch}": DiTConfig(hidden_size=D, depth=depth, num_heads=heads, patch_size=patch)
    for size, (D, depth, heads) in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}
#: The DCDiTConfig values that make a model compute exactly what the authors' release computes
#: (AMD-AGI/DynamicChunkingDiT; every item is checked against its outputs in tests/release/ and
#: explained in docs/release.md). The paper text (v1) describes the cosine router instead.
RELEASE_MODEL_OPTIONS = dict(
    router="predictability", router_centre_tap=True, conv_norm_groups=32, conv_norm_eps=1e-5,
    conv_stack_norm="rmsnorm", inner_stack_norm="rmsnorm", residual_init="xavier", inner_adaln_init="xavier",
    dechunk_eps=1e-8, tail_drop_rounding="float32", mask_padding=True,
)

# DC-DiT-{B,XL}/N{4,16}: the paper text (v1: cosine router, our open choices); "-release": the same
# sizes with the release's model (its shipped configs/DCDiT-B-N4.yaml is DC-DiT-B/N4-release).
MODEL_PRESETS.update(
    {
        f"DC-DiT-{size}/N{n}{suffix}": DCDiTConfig(hidden_size=D, depth=depth, num_heads=heads, target_ratio=float(n), **options)
        for size, (D, depth, heads) in {"B": _DIT_SIZES["B"], "XL": _DIT_SIZES["XL"]}.items()
        for n in (4, 16)
        for suffix, options in (("", {}), ("-release", RELEASE_MODEL_OPTIONS))
    }
)

#: Parameter counts the papers report (millions), for the presets table.
PAPER_PARAMS_M = {"DiT-S/2": 33.0, "DiT-B/2": 130.0, "DiT-L/2": 458.0, "DiT-XL/2": 675.0,
                  **{f"DC-DiT-{size}/N{n}{suffix}": m for size, m in (("B", 138.0), ("XL", 690.0))
                     for n in (4, 16) for suffix in ("", "-release")}}


def _coerce(value, hint, key: str):
    """Check/convert one config value against its field type (YAML reads ``1e-4`` as a string)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ValueError:
                    continue
        raise ValueError(f"config key {key}: {value!r} is not a valid {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # lists, tuples, nested sections: checked by their own code
        return value
    raise ValueError(f"config key {key}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _typed_kwargs(cls, d: dict, where: str) -> dict:
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in d.items()}


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
    return dataclasses.replace(base, **_typed_kwargs(type(base), d, "model"))


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


def model_config_to_dict(config: ModelConfig) -> dict:
    d = dataclasses.asdict(config)
    if isinstance(d.get("input_size"), tuple):
        d["input_size"] = list(d["input_size"])
    return d


def presets_table() -> str:
    """``dcdit presets``: every preset's width, depth, heads, patch size or N, and parameter count next to the paper's."""
    import torch

    lines = [f"{'preset':<21} {'arch':<6} {'D':>5} {'depth':>5} {'heads':>5} {'patch/N':>7} {'params (M)':>11} "
             f"{'paper (M)':>10} {'diff':>7}"]
    for name, cfg in MODEL_PRESETS.items():
        with torch.device("meta"):  # counts without allocating
            n = count_parameters(build_model(cfg)) / 1e6
        paper = PAPER_PARAMS_M.get(name)
        diff = f"{100 * (n - paper) / paper:+.1f}%" if paper else ""
        tokens = f"P={cfg.patch_size}" if cfg.arch == "dit" else f"N={cfg.target_ratio:g}"
        lines.append(f"{name:<21} {cfg.arch:<6} {cfg.hidden_size:>5} {cfg.depth:>5} {cfg.num_heads:>5} {tokens:>7} "
                     f"{n:>11.1f} {paper if paper else '':>10} {diff:>7}")
    lines.append("\nParameters include DiT's fixed pos_embed (as the DiT release counts them). DC-DiT counts are at a "
                 "32x32 latent grid (256 px); paper figures: DiT (Peebles & Xie 2023), DC-DiT (arXiv 2603.06351 §4.1).")
    return "\n".join(lines)


def count_parameters(model: nn.Module) -> int:
    """All parameters, including DiT's frozen ``pos_embed`` (as the DiT release counts them)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Run configs: model + data + train + sample, read from YAML with `_base_` inheritance.
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """``name``: "mnist" (the embedded default, pixel space) or "latents" (``dcdit extract-features``)."""

    name: str = "mnist"
    root: str | None = None  # latents folder
    flip: bool | None = None  # None: the data set's default (latents: True, MNIST: False)
    vae: str | None = None  # VAE id/path the latents were made with (checked against their meta.json)
    latent_scale: float | None = None


@dataclass
class MultiBudgetConfig:
    """Multi-budget training (the authors' release; README "Multi-budget training"): from ``start_step`` on, each step draws one tail-drop
    fraction uniformly from ``fractions``."""

    fractions: list[float] = field(default_factory=list)
    start_step: int = 0


@dataclass
class UpcycleConfig:
    """Start a DC-DiT from a pretrained DiT (paper §4.4): ``from_dit`` is an official ``.pt`` or a
    diffusers DiT folder; the first ``distill_steps`` steps train on activation distillation."""

    from_dit: str | None = None
    num_heads: int | None = None  # the state dict cannot tell; default: the official DiT sizes' heads
    distill_steps: int = 0
    freeze_embedders: bool = True


@dataclass
class TrainConfig:
    steps: int = 400_000
    global_batch_size: int = 256
    micro_batch_size: int | None = None  # per device and forward pass; None = global / world size
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay_n = min(ema_decay, (1 + n) / (10 + n)): short runs get a usable EMA
    grad_clip: float = 1.0
    ratio_loss_weight: float = 0.03
    ratio_batch_size: int = 16
    # The release's curriculum for N (docs/release.md): N moves linearly from target_ratio_start to
    # model.target_ratio over the first target_ratio_warmup_steps steps (None / 0: no curriculum).
    target_ratio_start: float | None = None
    target_ratio_warmup_steps: int = 0
    multi_budget: MultiBudgetConfig = field(default_factory=MultiBudgetConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    init_from: str | None = None  # fine-tune: start from these weights (a dcdit run, checkpoint or .safetensors)
    dydit_target: float = 0.7  # DyDiT FLOPs target λ of the inner blocks (model.dydit=true; paper §4.5)
    dydit_warmup_steps: int = 5000  # linear ramp of the target from 1.0 to λ
    dydit_loss_weight: float = 1.0
    dydit_router_lr: float | None = None  # DyDiT routers' own learning rate (None: train.lr); see docs/dydit.md
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32"
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 50_000
    keep_last: int = 2  # checkpoints kept besides the final one
    max_nonfinite_steps: int = 8  # stop (TrainingDiverged) after this many consecutive skipped non-finite steps
    tensorboard: bool = True
    wandb: bool = False


@dataclass
class SampleConfig:
    """How ``dcdit sample`` / ``sample-ddp`` sample a run (its flags override single fields) and what
    ``dcdit demo`` uses (the ``sample:`` section of configs/mnist.yaml); see ``dcdit.pipelines``."""

    sampler: str = "ddpm"  # "ddpm" or "ddim"
    num_sampling_steps: int = 250
    cfg_scale: float = 1.5
    guidance_channels: int | None = None  # 3 reproduces the DiT release's first-3-channels guidance
    tail_dropping_fraction: float = 0.0
    uncond_tail_dropping_fraction: float | None = None  # Lite-CFG: the unconditional half's fraction
    eta: float = 0.0  # DDIM's noise scale (0: deterministic)
    use_ema: bool = True  # False: the raw weights of a run or checkpoint folder
    seed: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=DCDiTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "sample": SampleConfig}


def _dataclass_from_dict(cls, d: dict, where: str):
    valid = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}.{k}' for k in unknown]}; valid keys in {where}: {', '.join(valid)}")
    kwargs = _typed_kwargs(cls, d, where)
    for key, section in (("multi_budget", MultiBudgetConfig), ("upcycle", UpcycleConfig)):
        if key in kwargs:
            kwargs[key] = _dataclass_from_dict(section, kwargs[key] or {}, f"{where}.{key}")
    if "fractions" in kwargs:
        kwargs["fractions"] = [_coerce(f, float, f"{where}.fractions") for f in kwargs["fractions"]]
    return cls(**kwargs)


def run_config_from_dict(d: dict, check: bool = True) -> RunConfig:
    """``check=False`` skips the range and consistency checks (a checkpoint's saved config loads as written)."""
    check_config_dict(d)  # sections are mappings, lists are lists (dcdit.config_checks)
    unknown = sorted(set(d) - {"model", *_SECTIONS})
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {unknown}; valid: model, {', '.join(_SECTIONS)}")
    cfg = RunConfig(model=model_config_from_dict(d.get("model") or {}))
    for name, cls in _SECTIONS.items():
        setattr(cfg, name, _dataclass_from_dict(cls, d.get(name) or {}, name))
    return check_run_config(cfg) if check else cfg  # ranges and consistency of every key (dcdit.config_checks)


def run_config_to_dict(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["model"] = model_config_to_dict(cfg.model)
    return d


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_with_bases(path: str | os.PathLike) -> dict:
    """A YAML file as a dict; ``_base_: other.yaml`` (or a list of them, relative to the file) is
    read first and deep-merged under it. A bare name is also looked up among the packaged configs."""
    path = resolve_config_path(path)
    d = read_config_file(path)  # a mapping of sections, or a one-line error naming the file (dcdit.config_checks)
    bases = d.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = _deep_merge(merged, read_yaml_with_bases(base_path))
    return _deep_merge(merged, d)


def resolve_config_path(path: str | os.PathLike) -> str:
    """A path, or the name of a packaged config (``mnist`` / ``mnist.yaml`` / ``DC-DiT-B-N4``)."""
    if os.path.exists(path):
        return str(path)
    name = os.path.basename(str(path))
    name = name if name.endswith(".yaml") else name + ".yaml"
    packaged = os.path.join(os.path.dirname(__file__), "configs", name)
    if os.path.exists(packaged):
        return packaged
    available = sorted(f[:-5] for f in os.listdir(os.path.dirname(packaged)) if f.endswith(".yaml"))
    raise FileNotFoundError(f"config {str(path)!r} not found (neither a file nor a packaged config: {', '.join(available)})")


def parse_override(item: str) -> tuple[list[str], object]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 0.0003); the value is parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4)")
    key, value = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def load_run_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (with ``_base_``), apply ``section.key=value`` overrides, validate."""
    d = read_yaml_with_bases(path) if path is not None else {}
    for item in overrides:
        keys, value = parse_override(item)
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return run_config_from_dict(d)


def save_run_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(run_config_to_dict(cfg), f, sort_keys=False)
