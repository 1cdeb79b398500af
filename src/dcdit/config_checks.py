"""Ranges and consistency of a run config, checked when it is resolved: before any data is read or
any step taken (``dcdit.config.run_config_from_dict`` calls :func:`check_config_dict` on the raw
dict and :func:`check_run_config` on the result).

Every leaf key of a run config has one :class:`Rule` in :func:`rules`, found by its dotted name
(``train.lr``, ``model.hidden_size``, ``train.multi_budget.fractions``); a test walks the config
dataclasses and fails for a key without one. Cross-key conditions (widths divisible by heads and
GroupNorm groups, batch sizes, features configured but never used) are in :func:`consistency_problems`.
Each violation reads ``config key KEY is VALUE; it must ...``; all of them are reported at once, in
one line, as a :class:`dcdit.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import ConfigError

#: Routers of :func:`dcdit.models.router.build_router` (a test checks both lists agree).
ROUTERS = ("cosine", "predictability", "random")
#: Timestep frequencies of the timestep embedder (``TimestepEmbedder``): the shift must stay below half of them.
_TIMESTEP_FREQUENCIES = 256
#: Diffusion steps T of training and sampling (``dcdit.diffusion.create_diffusion``'s default).
_DIFFUSION_STEPS = 1000
_SEED_LIMIT = 2**32  # numpy and most tools take seeds in [0, 2**32)


@dataclass(frozen=True)
class Rule:
    """``ok(value)`` is True for allowed values; ``allowed`` says which, after "it must be"."""

    allowed: str
    ok: Callable[[Any], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    """An int in [lo, hi) (either end optional)."""
    bounds = (f" >= {lo}" if lo is not None else "") + (f"{' and' if lo is not None else ''} < {hi}" if hi is not None else "")
    return Rule(f"an integer{bounds}", lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v < hi))


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A finite number between lo and hi (each end closed unless ``*_open``)."""
    if lo is not None and hi is not None:
        bounds = f" in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        bounds = f" {'>' if lo_open else '>='} {lo:g}"
    elif hi is not None:
        bounds = f" {'<' if hi_open else '<='} {hi:g}"
    else:
        bounds = ""

    def ok(v) -> bool:
        if not _is_number(v):
            return False
        above = lo is None or (v > lo if lo_open else v >= lo)
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    return Rule(f"a finite number{bounds}", ok)


def choice(*options: str) -> Rule:
    return Rule(f"one of {', '.join(options)}", lambda v: v in options)


def optional(rule: Rule) -> Rule:
    return Rule(f"null or {rule.allowed}", lambda v: v is None or rule.ok(v))


FLAG = Rule("true or false", lambda v: isinstance(v, bool))
TEXT = Rule("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip()))
GRID = Rule("an integer >= 1 or a list of two integers >= 1 ([height, width])",
            lambda v: (_is_int(v) and v >= 1) or (isinstance(v, (list, tuple)) and len(v) == 2
                                                  and all(_is_int(s) and s >= 1 for s in v)))
FLAGS = Rule("null or a list of true/false, one per inner block (e.g. [true, false])",
              lambda v: v is None or (isinstance(v, (list, tuple)) and all(isinstance(f, bool) for f in v)))
FRACTIONS = Rule("a list of finite numbers in [0, 1), e.g. [0, 0.1, 0.2]",
                 lambda v: isinstance(v, (list, tuple)) and all(number(0, 1, hi_open=True).ok(f) for f in v))


_POSITIVE = number(0, lo_open=True)
_FRACTION = number(0, 1, hi_open=True)


def _model_rules() -> dict[str, Rule]:
    """``model:`` keys (DiT's and DC-DiT's)."""
    from .diffusion.schedules import NOISE_SCHEDULES
    from .models.chunking import TAIL_DROP_ROUNDINGS
    from .models.dcdit import EXECUTIONS
    from .models.norms import STACK_NORMS

    positive, fraction = _POSITIVE, _FRACTION
    return {
        "arch": choice("dit", "dcdit"),
        "input_size": GRID,
        "patch_size": integer(1),
        "in_channels": integer(1),
        "hidden_size": integer(4),
        "depth": integer(1),
        "num_heads": integer(1),
        "mlp_ratio": positive,
        "class_dropout_prob": fraction,  # 1 would drop every label: nothing conditional is learnt
        "num_classes": integer(1),
        "learn_sigma": FLAG,
        "timestep_freq_shift": number(hi=_TIMESTEP_FREQUENCIES // 2, hi_open=True),  # divides by (128 − shift)
        "noise_schedule": choice(*NOISE_SCHEDULES),
        "label_embed_std": positive,
        "encoder_width": optional(integer(1)),
        "encoder_blocks": integer(1),
        "decoder_blocks": integer(1),
        "conv_norm_groups": integer(1),
        "router": choice(*ROUTERS),
        "target_ratio": number(1, lo_open=True),  # the ratio loss has N / (N − 1)
        "dechunk_sigma": positive,
        "residual_init": choice("zero", "xavier"),
        "mask_padding": FLAG,
        "cond_adaptor": FLAG,
        "pos_scale": positive,
        "pos_offset": number(),
        "dydit": FLAG,
        "dydit_token_hidden_ratio": positive,
        "dydit_tau": positive,
        "dydit_threshold": number(0, 1, lo_open=True, hi_open=True),
        "conv_norm_eps": positive,
        "conv_stack_norm": choice(*STACK_NORMS),
        "inner_stack_norm": choice(*STACK_NORMS),
        "router_centre_tap": FLAG,
        "inner_adaln_init": choice("zero", "xavier"),
        "dechunk_eps": number(0),
        "tail_drop_rounding": choice(*TAIL_DROP_ROUNDINGS),
        "execution": choice(*EXECUTIONS),
        "inner_mlp": FLAGS,  # false: a DiT block without MLP (the release's 'd'); length checked below
    }


def _data_rules() -> dict[str, Rule]:
    """``data:`` keys."""
    from .data import DATASETS

    positive = _POSITIVE
    return {
        "name": choice(*sorted(DATASETS)),
        "root": optional(TEXT),
        "flip": optional(FLAG),
        "vae": optional(TEXT),
        "latent_scale": optional(positive),
    }


def _train_rules() -> dict[str, Rule]:
    """``train:`` keys (nested sections with dotted names)."""
    positive = _POSITIVE
    return {
        "steps": integer(1),
        "global_batch_size": integer(1),
        "micro_batch_size": optional(integer(1)),
        "lr": positive,
        "weight_decay": number(0),
        "ema_decay": number(0, 1),
        "ema_warmup": FLAG,
        "grad_clip": Rule("a finite number >= 0 (0 = no clipping)", number(0).ok),
        "ratio_loss_weight": number(0),
        "ratio_batch_size": integer(1),
        "target_ratio_start": optional(number(1, lo_open=True)),  # the curriculum's first N (ratio loss: N > 1)
        "target_ratio_warmup_steps": integer(0),
        "multi_budget.fractions": FRACTIONS,
        "multi_budget.start_step": integer(0),
        "upcycle.from_dit": optional(TEXT),
        "upcycle.num_heads": optional(integer(1)),
        "upcycle.distill_steps": integer(0),
        "upcycle.freeze_embedders": FLAG,
        "init_from": optional(TEXT),
        "dydit_target": number(0, 1, lo_open=True),
        "dydit_warmup_steps": integer(0),
        "dydit_loss_weight": number(0),
        "dydit_router_lr": optional(positive),
        "mixed_precision": choice("auto", "bf16", "fp32"),
        "seed": integer(0, _SEED_LIMIT),
        "log_every": integer(1),
        "ckpt_every": integer(1),
        "keep_last": integer(0),
        "tensorboard": FLAG,
        "wandb": FLAG,
        "max_nonfinite_steps": integer(1),  # 0 would stop before the first skipped step could be retried
    }


def _sample_rules() -> dict[str, Rule]:
    """``sample:`` keys."""
    fraction = _FRACTION
    return {
        "sampler": choice("ddpm", "ddim"),
        "num_sampling_steps": integer(1, _DIFFUSION_STEPS + 1),
        "cfg_scale": number(0),
        "guidance_channels": optional(integer(1)),
        "tail_dropping_fraction": fraction,
        "uncond_tail_dropping_fraction": optional(fraction),
        "use_ema": FLAG,
        "seed": integer(0, _SEED_LIMIT),
        "eta": number(0),
    }


@functools.cache
def rules() -> dict[str, Rule]:
    """The rule of every leaf key, by dotted name (model keys cover both DiT and DC-DiT)."""
    sections = {"model": _model_rules(), "data": _data_rules(), "train": _train_rules(), "sample": _sample_rules()}
    return {f"{s}.{k}": rule for s, keys in sections.items() for k, rule in keys.items()}


def _problem(key: str, value, must: str) -> str:
    return f"config key {key} is {value!r}; it must {must}"


def leaf_values(cfg, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf field of a config dataclass, nested sections flattened."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaf_values(value, key + ".")
        else:
            yield key, value


def range_problems(cfg) -> list[str]:
    """Every leaf value against its rule (keys without a rule are skipped; a test keeps the table complete)."""
    table = rules()
    return [_problem(key, value, f"be {table[key].allowed}")
            for key, value in leaf_values(cfg) if key in table and not table[key].ok(value)]


def _model_problems(m) -> Iterator[str]:
    D, heads = m.hidden_size, m.num_heads
    grid = (m.input_size, m.input_size) if isinstance(m.input_size, int) else tuple(m.input_size)
    if D % heads:
        yield _problem("model.num_heads", heads, f"divide model.hidden_size ({D}) (attention splits the width into heads)")
    if D % 4:
        yield _problem("model.hidden_size", D, "be divisible by 4 (the 2D sin-cos position table)")
    mlp = int(D * m.mlp_ratio)
    if mlp < 1:
        yield _problem("model.mlp_ratio", m.mlp_ratio, f"give an MLP width int(hidden_size × mlp_ratio) >= 1, not {mlp}")
    if m.arch == "dit":
        if grid[0] % m.patch_size or grid[1] % m.patch_size:
            yield _problem("model.patch_size", m.patch_size, f"divide both sides of model.input_size {list(grid)}")
        return
    d = m.encoder_width or D // 4
    widths = {"model.encoder_width" if m.encoder_width else "the encoder width hidden_size/4": d, "model.hidden_size": D}
    bad = [f"{name} ({width})" for name, width in widths.items() if width % m.conv_norm_groups]
    if bad:
        yield _problem("model.conv_norm_groups", m.conv_norm_groups,
                       f"divide {' and '.join(bad)}: the conv blocks' GroupNorm splits their channels into groups")
    if m.router == "predictability" and ((D // 4) % 8 or D // 4 < 8):
        yield _problem("model.router", m.router, f"run on hidden_size/4 = {D // 4} channels divisible by 8 "
                                                 "(its GroupNorm(8)): use hidden_size a multiple of 32, or another router")
    if m.inner_mlp is not None and len(m.inner_mlp) != m.depth:
        yield _problem("model.inner_mlp", m.inner_mlp, f"have one entry per inner block (model.depth = {m.depth})")
    if m.dydit and not all(m.inner_mlp or ()):
        yield _problem("model.inner_mlp", m.inner_mlp, "have no false entry with model.dydit (DyDiT gates every block's MLP)")
    if m.dydit and mlp % heads:
        yield _problem("model.mlp_ratio", m.mlp_ratio, f"give an MLP width ({mlp}) divisible by model.num_heads ({heads}) "
                                                       "with model.dydit (DyDiT gates the MLP in num_heads groups)")


def _train_problems(cfg) -> Iterator[str]:
    t, arch = cfg.train, cfg.model.arch
    G, micro = t.global_batch_size, t.micro_batch_size
    if micro is not None and (micro > G or G % micro):
        yield _problem("train.micro_batch_size", micro, f"divide train.global_batch_size ({G})")
    per_pass = micro or G
    if arch == "dcdit" and per_pass % t.ratio_batch_size:
        what = "train.micro_batch_size" if micro else "train.global_batch_size"
        yield _problem("train.ratio_batch_size", t.ratio_batch_size,
                       f"divide {what} ({per_pass}): the ratio loss is taken over groups of this many samples of each "
                       "forward pass")
    mb = t.multi_budget
    if mb.fractions and arch != "dcdit":
        yield _problem("train.multi_budget.fractions", mb.fractions, "be empty for a DiT (tail dropping needs DC-DiT's router)")
    up = t.upcycle
    if up.from_dit and arch != "dcdit":
        yield _problem("train.upcycle.from_dit", up.from_dit, "be null unless model.arch is dcdit (upcycling builds a DC-DiT)")
    if up.from_dit and not all(getattr(cfg.model, "inner_mlp", None) or ()):
        yield _problem("model.inner_mlp", cfg.model.inner_mlp, "have no false entry with train.upcycle.from_dit "
                                                               "(upcycling copies every DiT block's MLP)")
    if up.distill_steps and not up.from_dit:
        yield _problem("train.upcycle.distill_steps", up.distill_steps,
                       "be 0 unless train.upcycle.from_dit names the DiT to distil from")
    if t.dydit_router_lr is not None and not getattr(cfg.model, "dydit", False):
        yield _problem("train.dydit_router_lr", t.dydit_router_lr, "be null unless model.dydit is true (there are no DyDiT routers)")


def _data_problems(cfg) -> Iterator[str]:
    if cfg.data.name == "latents" and not cfg.data.root:
        yield _problem("data.root", cfg.data.root, "name the folder written by `dcdit extract-features` (data.name is latents)")


def _sample_problems(cfg) -> Iterator[str]:
    s, m = cfg.sample, cfg.model
    if s.guidance_channels is not None and s.guidance_channels > m.in_channels:
        yield _problem("sample.guidance_channels", s.guidance_channels, f"be at most model.in_channels ({m.in_channels})")
    if m.arch == "dit":
        for key in ("tail_dropping_fraction", "uncond_tail_dropping_fraction"):
            if getattr(s, key):
                yield _problem(f"sample.{key}", getattr(s, key), "be 0 or null for a DiT (tail dropping needs DC-DiT's router)")
    if s.eta and s.sampler != "ddim":
        yield _problem("sample.eta", s.eta, "be 0 unless sample.sampler is ddim (eta is DDIM's noise scale)")
    if s.sampler == "ddim":
        from .diffusion import space_timesteps

        try:
            space_timesteps(_DIFFUSION_STEPS, f"ddim{s.num_sampling_steps}")
        except ValueError:
            yield _problem("sample.num_sampling_steps", s.num_sampling_steps,
                           f"split the {_DIFFUSION_STEPS} diffusion steps with an integer stride for DDIM (e.g. 25, 50, 100, 250)")


def consistency_problems(cfg) -> list[str]:
    """Conditions between keys (the values are known to be in range)."""
    return [*_model_problems(cfg.model), *_train_problems(cfg), *_data_problems(cfg), *_sample_problems(cfg)]


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


def check_run_config(cfg):
    """Raise one :class:`ConfigError` naming every key out of range or inconsistent; return ``cfg``."""
    _raise(range_problems(cfg))
    _raise(consistency_problems(cfg))
    return cfg


def _section_kind(hint) -> str | None:
    """"section" for a nested config dataclass (or a union of them), "list" for a list field, else None."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if all(dataclasses.is_dataclass(a) for a in args):
        return "section"
    if typing.get_origin(hint) is list:
        return "list"
    return None


def _shape_problems(node, cls, prefix: str) -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in node or node[f.name] is None:
            continue
        value, key = node[f.name], f"{prefix}{f.name}"
        kind = _section_kind(hints[f.name])
        if kind == "section" and not isinstance(value, dict):
            yield _problem(key, value, f"be a section of key: value lines (e.g. {key}.<name>=... on the command line)")
        elif kind == "section" and dataclasses.is_dataclass(hints[f.name]):
            yield from _shape_problems(value, hints[f.name], key + ".")
        elif kind == "list" and not isinstance(value, (list, tuple)):
            yield _problem(key, value, f"be {rules()[key].allowed}" if key in rules() else "be a list")


def check_config_dict(d, where: str = "the config") -> dict:
    """Before the dataclasses are built: the config is a mapping, its sections are mappings and
    list-valued keys are lists (``train.multi_budget.fractions=0.5`` instead of ``[0.5]``)."""
    from .config import RunConfig

    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a YAML mapping of sections (model:, data:, train:, sample:), "
                          f"not a {type(d).__name__}")
    _raise(list(_shape_problems(d, RunConfig, "")))
    return d


def read_config_file(path) -> dict:
    """One YAML config file as a dict, checked to be a mapping of sections; a binary file (a checkpoint
    passed as the config) is named. Malformed YAML raises ``yaml.YAMLError`` with the file and line."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text (YAML) file: pass a .yaml config or a packaged config "
                          "name (dcdit train mnist)") from None
    return check_config_dict(d or {}, where=f"config file {path}")


def check_batch_split(cfg, world_size: int) -> tuple[int, int]:
    """The per-process micro-batch and gradient-accumulation steps for ``world_size`` processes:
    (micro, accum) with global = world × micro × accum, and the ratio-loss groups filling each micro-batch."""
    t = cfg.train
    G = t.global_batch_size
    micro = t.micro_batch_size or G // world_size
    if micro < 1 or G % (world_size * micro):
        raise ConfigError(
            f"config key train.global_batch_size is {G}; it must equal world size ({world_size}) × micro-batch "
            f"({micro}) × gradient-accumulation steps: set train.micro_batch_size to a divisor of {G // max(world_size, 1)}")
    if cfg.model.arch == "dcdit" and micro % t.ratio_batch_size:
        raise ConfigError(_problem("train.ratio_batch_size", t.ratio_batch_size,
                                   f"divide the micro-batch of each of the {world_size} processes ({micro}): set "
                                   f"train.ratio_batch_size to a divisor of {micro}"))
    return micro, G // (world_size * micro)
