"""State-dict and config conversion between our DiT (the official layout) and diffusers' ``DiTTransformer2DModel``.

Nothing here imports diffusers: the functions map plain ``{name: tensor}`` dicts and config dicts, so
a checkpoint can be converted on a machine without diffusers. ``set_diffusers_timestep_freq_shift``
touches a diffusers model object (duck-typed) only when you pass one.

Layouts (D = hidden = heads·head_dim, C = in_channels, C_out = 2C if learn_sigma else C, P = patch,
T = (H/P)·(W/P) tokens, K = num_classes, F = 256 timestep frequencies, i = block index)::

    ours / official DiT                      diffusers DiTTransformer2DModel
    -------------------------------------    ------------------------------------------------------------
    x_embedder.proj.{weight (D,C,P,P), bias} pos_embed.proj.{weight, bias}                  (same conv)
    pos_embed (1, T, D)  [Parameter]         — (``pos_embed.pos_embed`` is a NON-persistent buffer that
                                                diffusers recomputes from sample_size; never in its
                                                state dict, so a learned / non-sin-cos table cannot move)
    t_embedder.mlp.0.{weight (D,F), bias}    transformer_blocks.i.norm1.emb.timestep_embedder.linear_1.*
    t_embedder.mlp.2.{weight (D,D), bias}    transformer_blocks.i.norm1.emb.timestep_embedder.linear_2.*
    y_embedder.embedding_table.weight        transformer_blocks.i.norm1.emb.class_embedder.embedding_table.weight
        (K+1, D)                                 — one COPY PER BLOCK (diffusers builds a
                                                 CombinedTimestepLabelEmbeddings inside every
                                                 AdaLayerNormZero; only block 0's copy conditions the
                                                 final layer, each block's copy conditions that block)
    blocks.i.attn.qkv.weight (3D, D)         transformer_blocks.i.attn1.to_{q,k,v}.weight (D, D) each
    blocks.i.attn.qkv.bias (3D,)             transformer_blocks.i.attn1.to_{q,k,v}.bias (D,) each
        (rows [q | k | v], each head-major: row = h·head_dim + d — a plain chunk(3) along dim 0)
    blocks.i.attn.proj.*  (D, D)             transformer_blocks.i.attn1.to_out.0.*
    blocks.i.mlp.fc1.*    (4D, D)            transformer_blocks.i.ff.net.0.proj.*   (GELU(tanh) module)
    blocks.i.mlp.fc2.*    (D, 4D)            transformer_blocks.i.ff.net.2.*
    blocks.i.adaLN_modulation.1.* (6D, D)    transformer_blocks.i.norm1.linear.*
        (chunks shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp in both: no reorder)
    final_layer.adaLN_modulation.1.* (2D, D) proj_out_1.*   (chunks shift, scale in both: no reorder)
    final_layer.linear.* (P²·C_out, D)       proj_out_2.*   (both unpatchify with "nhwpqc->nchpwq":
                                                             output row = (p·P + q)·C_out + c, no reorder)

Numerical conventions (what must match for identical outputs):

* Timestep frequencies. diffusers' ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``
  uses exp(-ln(1e4)·k/(half-1)); the official DiT divides by ``half``. Our ``timestep_freq_shift``
  selects the convention: a converted diffusers checkpoint needs ``timestep_freq_shift=1`` (what
  :func:`dit_config_from_diffusers` returns); a model trained with the official convention run in
  diffusers needs :func:`set_diffusers_timestep_freq_shift` ``(model, 0)``. At equal weights the two
  conventions differ by O(1) in the output.
* LayerNorm eps. Our three LayerNorms (norm1, norm2, norm_final) use eps=1e-6. diffusers hard-codes
  1e-6 for AdaLayerNormZero.norm (= our norm1) and norm_out (= our norm_final), but its pre-MLP
  LayerNorm (``norm3`` = our norm2) takes ``norm_eps``, default 1e-5 — and diffusers' own DiT
  conversion leaves the default. :func:`diffusers_config_from_dit` therefore sets ``norm_eps=1e-6``
  (exact parity); :func:`dit_config_from_diffusers` warns when a config has another value (our model
  has no eps setting; the difference is tiny but not zero).
* Class dropout. diffusers hard-codes class_dropout_prob=0.1 in the label embedder, so its table has
  K+1 rows (null class K). Our DiT must have ``class_dropout_prob > 0`` for the shapes to agree.
* Positions. diffusers recomputes the 2D sin-cos table from ``sample_size`` (float64 -> float32, the
  same MAE formula as ours) and only supports square grids (its unpatchify takes sqrt(T)).
* MLP width. diffusers' ``FeedForward`` has mult=4 and the config cannot change it: mlp_ratio must be 4.
"""

from __future__ import annotations

import inspect
import re
import warnings
from dataclasses import dataclass, field

import torch

from .models.embedders import get_2d_sincos_pos_embed

__all__ = [
    "ConversionReport",
    "dit_to_diffusers_state_dict",
    "diffusers_to_dit_state_dict",
    "dit_config_from_diffusers",
    "diffusers_config_from_dit",
    "set_diffusers_timestep_freq_shift",
]

# ---------------------------------------------------------------------------------------------------
# key tables

# shared (one copy in ours) -> per-block suffix under transformer_blocks.i.norm1.emb.
_EMBEDDER_KEYS = {
    "t_embedder.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embedder.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embedder.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embedder.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}

# per-block one-to-one renames: ours blocks.i.<k> -> diffusers transformer_blocks.i.<v>
_BLOCK_KEYS = {
    "attn.proj.weight": "attn1.to_out.0.weight",
    "attn.proj.bias": "attn1.to_out.0.bias",
    "mlp.fc1.weight": "ff.net.0.proj.weight",
    "mlp.fc1.bias": "ff.net.0.proj.bias",
    "mlp.fc2.weight": "ff.net.2.weight",
    "mlp.fc2.bias": "ff.net.2.bias",
    "adaLN_modulation.1.weight": "norm1.linear.weight",
    "adaLN_modulation.1.bias": "norm1.linear.bias",
}

_TOP_KEYS = {
    "x_embedder.proj.weight": "pos_embed.proj.weight",
    "x_embedder.proj.bias": "pos_embed.proj.bias",
    "final_layer.adaLN_modulation.1.weight": "proj_out_1.weight",
    "final_layer.adaLN_modulation.1.bias": "proj_out_1.bias",
    "final_layer.linear.weight": "proj_out_2.weight",
    "final_layer.linear.bias": "proj_out_2.bias",
}

_QKV = ("to_q", "to_k", "to_v")

# DiTTransformer2DModel.__init__ defaults (diffusers 0.30 - 0.42), used for keys a config omits.
_DIFFUSERS_DEFAULTS = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": None,
    "num_layers": 28,
    "dropout": 0.0,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

_OUR_EPS = 1e-6
_DIFFUSERS_CLASS_DROPOUT = 0.1  # hard-coded in diffusers' CombinedTimestepLabelEmbeddings


@dataclass
class ConversionReport:
    """What :func:`diffusers_to_dit_state_dict` did.

    mapped: our key -> the diffusers key(s) it was built from (qkv from 3, embedders from block 0).
    generated: our keys made from scratch (``pos_embed``, the sin-cos table diffusers does not store).
    missing: diffusers keys the layout needs but the input lacks.
    unexpected: input keys that are not part of the layout (ignored).
    num_layers: blocks found; the embedder copies of all of them were checked identical.
    """

    mapped: dict[str, list[str]] = field(default_factory=dict)
    generated: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    num_layers: int = 0


# ---------------------------------------------------------------------------------------------------
# ours -> diffusers


def _block_indices(keys, prefix: str) -> set[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def dit_to_diffusers_state_dict(sd: dict, num_layers: int, check_pos_embed: bool = True) -> dict:
    """Our / official DiT state dict -> ``DiTTransformer2DModel`` state dict (loads with strict=True).

    Tensors are shared where possible (renames) and split views for qkv; call ``.clone()`` on the
    result if you need independent storage. ``pos_embed`` is dropped: diffusers recomputes the
    sin-cos table, so with ``check_pos_embed`` the table is verified to be that sin-cos table (a
    learned or shifted table would otherwise be lost silently) and ValueError is raised if not.
    Raises ValueError on missing or unknown keys, or a block count other than ``num_layers``.
    """
    sd = dict(sd)
    found = _block_indices(sd, "blocks")
    if found != set(range(num_layers)):
        raise ValueError(
            f"state dict has blocks {sorted(found)} but num_layers={num_layers}; "
            f"pass the model's depth (expected blocks 0..{num_layers - 1})"
        )
    needed = list(_TOP_KEYS) + list(_EMBEDDER_KEYS) + [
        f"blocks.{i}.{k}" for i in range(num_layers) for k in [*_BLOCK_KEYS, "attn.qkv.weight", "attn.qkv.bias"]
    ]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"our DiT state dict lacks {len(missing)} keys, e.g. {missing[:5]}")
    known = set(needed) | {"pos_embed"}
    unknown = sorted(k for k in sd if k not in known)
    if unknown:
        raise ValueError(f"unexpected keys in our DiT state dict (not part of the DiT layout): {unknown[:10]}")

    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_KEYS.items():
        out[theirs] = sd[ours]
    for i in range(num_layers):
        for ours, theirs in _EMBEDDER_KEYS.items():
            out[f"transformer_blocks.{i}.norm1.emb.{theirs}"] = sd[ours]
        for ours, theirs in _BLOCK_KEYS.items():
            out[f"transformer_blocks.{i}.{theirs}"] = sd[f"blocks.{i}.{ours}"]
        for kind in ("weight", "bias"):
            fused = sd[f"blocks.{i}.attn.qkv.{kind}"]
            if fused.shape[0] % 3:
                raise ValueError(f"blocks.{i}.attn.qkv.{kind} has {fused.shape[0]} rows, not a multiple of 3")
            for name, part in zip(_QKV, fused.chunk(3, dim=0)):
                out[f"transformer_blocks.{i}.attn1.{name}.{kind}"] = part

    if "pos_embed" in sd and check_pos_embed:
        pos = sd["pos_embed"]
        if pos.device.type != "meta":
            T, D = pos.shape[-2:]
            side = int(round(T**0.5))
            if side * side != T:
                raise ValueError(
                    f"pos_embed has {T} tokens, not a square grid; diffusers' DiTTransformer2DModel "
                    "only supports square sample_size"
                )
            ref = torch.from_numpy(get_2d_sincos_pos_embed(D, side)).float()
            err = (pos.detach().reshape(T, D).float().cpu() - ref).abs().max().item()
            if err > 1e-5:
                raise ValueError(
                    f"pos_embed differs from the fixed 2D sin-cos table by {err:.3g}; diffusers recomputes "
                    "the table (non-persistent buffer), so this model cannot be represented exactly"
                )
    return out


# ---------------------------------------------------------------------------------------------------
# diffusers -> ours


class _Collector:
    """Builds our state dict from a diffusers one, recording every source key in a ConversionReport."""

    def __init__(self, sd: dict):
        self.sd, self.out, self.used, self.report = sd, {}, set(), ConversionReport()

    def take(self, ours: str, *theirs: str, fn=None) -> None:
        """``out[ours]`` = the tensor at ``theirs`` (or ``fn`` of the tensors); absent keys go to ``missing``."""
        absent = [k for k in theirs if k not in self.sd]
        if absent:
            self.report.missing.extend(absent)
            return
        self.used.update(theirs)
        tensors = [self.sd[k] for k in theirs]
        self.out[ours] = fn(tensors) if fn else tensors[0]
        self.report.mapped[ours] = list(theirs)


def _take_shared_embedders(c: _Collector, num_layers: int) -> None:
    """Our one timestep / class embedder from block 0's copy, after checking every block holds the same."""
    for ours, suffix in _EMBEDDER_KEYS.items():
        if num_layers == 0:
            c.report.missing.append(f"transformer_blocks.0.norm1.emb.{suffix}")
            continue
        copies = [f"transformer_blocks.{i}.norm1.emb.{suffix}" for i in range(num_layers)]
        present = [k for k in copies if k in c.sd]
        c.report.missing.extend(k for k in copies if k not in c.sd)
        if not present:
            continue
        ref_key = present[0]
        ref = c.sd[ref_key]
        for k in present[1:]:
            other = c.sd[k]
            if other.shape != ref.shape or not torch.equal(other, ref):
                diff = (
                    "shape " + str(tuple(other.shape))
                    if other.shape != ref.shape
                    else f"max abs diff {(other.float() - ref.float()).abs().max().item():.3g}"
                )
                raise ValueError(
                    f"{k} differs from {ref_key} ({diff}). diffusers stores a timestep/class embedder copy "
                    "in every block, but our DiT (like the official one) has a single shared embedder; "
                    "a model whose per-block copies differ cannot be converted"
                )
        c.used.update(present)
        c.out[ours] = ref
        c.report.mapped[ours] = present


def _take_blocks(c: _Collector, num_layers: int) -> None:
    """Per-block renames, and the fused qkv from diffusers' separate to_q / to_k / to_v."""
    for i in range(num_layers):
        for ours, theirs in _BLOCK_KEYS.items():
            c.take(f"blocks.{i}.{ours}", f"transformer_blocks.{i}.{theirs}")
        for kind in ("weight", "bias"):
            c.take(
                f"blocks.{i}.attn.qkv.{kind}",
                *[f"transformer_blocks.{i}.attn1.{n}.{kind}" for n in _QKV],
                fn=lambda ts: torch.cat(ts, dim=0),
            )


def _take_pos_embed(c: _Collector, input_size) -> None:
    """``pos_embed``: diffusers' buffer when the dict has it, else the sin-cos table of ``input_size``'s grid."""
    sd = c.sd
    if "pos_embed.pos_embed" in sd:
        c.out["pos_embed"] = sd["pos_embed.pos_embed"].reshape(1, *sd["pos_embed.pos_embed"].shape[-2:])
        c.used.add("pos_embed.pos_embed")
        c.report.mapped["pos_embed"] = ["pos_embed.pos_embed"]
        return
    if input_size is None:
        raise ValueError(
            "the diffusers state dict has no pos_embed (diffusers recomputes it); pass "
            "input_size=<sample_size> so the sin-cos table can be generated for that grid"
        )
    if "pos_embed.proj.weight" not in sd:
        raise ValueError("cannot generate pos_embed without pos_embed.proj.weight (hidden size, patch size)")
    D, _, p, q = sd["pos_embed.proj.weight"].shape
    gh, gw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if gh % p or gw % q:
        raise ValueError(f"input_size {(gh, gw)} is not divisible by the patch size {(p, q)}")
    table = torch.from_numpy(get_2d_sincos_pos_embed(D, (gh // p, gw // q))).float().unsqueeze(0)
    c.out["pos_embed"] = table.to(sd["pos_embed.proj.weight"].device)
    c.report.generated.append("pos_embed")


def diffusers_to_dit_state_dict(
    sd: dict, input_size: int | tuple[int, int] | None = None, strict: bool = True
) -> tuple[dict, ConversionReport]:
    """``DiTTransformer2DModel`` state dict -> (our DiT state dict, :class:`ConversionReport`).

    The timestep and class embedders are taken from block 0 after checking that every block holds
    bit-identical copies: our layout has ONE shared embedder, so a diffusers model whose per-block
    copies were trained apart cannot be represented and raises ValueError.

    ``pos_embed``: taken from ``pos_embed.pos_embed`` if the dict has it (it normally does not — the
    buffer is non-persistent), else generated with :func:`get_2d_sincos_pos_embed` on the token grid
    of ``input_size`` (the latent size = diffusers' ``sample_size``; the state dict alone does not
    determine it, so ValueError asks for it when needed).

    ``strict``: raise ValueError on missing or unexpected keys; with ``strict=False`` they are only
    listed in the report (and missing ones are absent from the result).
    """
    layers = sorted(_block_indices(sd, "transformer_blocks"))
    if layers != list(range(len(layers))):
        raise ValueError(f"transformer_blocks indices are not contiguous from 0: {layers}")
    c = _Collector(sd)
    L = c.report.num_layers = len(layers)
    for ours, theirs in _TOP_KEYS.items():
        c.take(ours, theirs)
    _take_shared_embedders(c, L)
    _take_blocks(c, L)
    _take_pos_embed(c, input_size)
    report = c.report
    report.unexpected = sorted(k for k in sd if k not in c.used)
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"diffusers DiT state dict does not match the layout: missing {report.missing[:5]}"
            f"{' ...' if len(report.missing) > 5 else ''}, unexpected {report.unexpected[:5]}"
            f"{' ...' if len(report.unexpected) > 5 else ''}"
        )
    return c.out, report


# ---------------------------------------------------------------------------------------------------
# configs


def dit_config_from_diffusers(config: dict) -> dict:
    """diffusers ``DiTTransformer2DModel`` config -> kwargs of ``dcdit.models.dit.DiT``.

    Keys the config omits take diffusers' defaults. ``timestep_freq_shift=1.0`` (diffusers'
    convention) and ``class_dropout_prob=0.1`` (hard-coded in diffusers) are set so the weights load
    and the outputs match. Raises ValueError for architectures our DiT cannot express; warns when
    ``norm_eps`` is not 1e-6 (our pre-MLP LayerNorm uses 1e-6, see the module docstring).
    """
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in dict(config).items() if not k.startswith("_")}}
    if cfg["norm_type"] != "ada_norm_zero":
        raise ValueError(f"only norm_type='ada_norm_zero' (DiT's adaLN-Zero) converts, got {cfg['norm_type']!r}")
    if cfg["activation_fn"] != "gelu-approximate":
        raise ValueError(f"our DiT's MLP uses tanh-GELU ('gelu-approximate'), got {cfg['activation_fn']!r}")
    if not cfg["attention_bias"]:
        raise ValueError("our DiT's qkv projection has a bias; attention_bias=False does not convert")
    if cfg["norm_elementwise_affine"]:
        raise ValueError("our DiT's LayerNorms have no affine parameters; norm_elementwise_affine=True does not convert")
    if cfg["num_embeds_ada_norm"] is None:
        raise ValueError("num_embeds_ada_norm (the number of classes) is required")
    if cfg.get("dropout", 0.0):
        warnings.warn(f"diffusers dropout={cfg['dropout']} is dropped: our DiT has no dropout", stacklevel=2)
    if cfg["norm_eps"] != _OUR_EPS:
        warnings.warn(
            f"diffusers norm_eps={cfg['norm_eps']} sets the eps of its pre-MLP LayerNorm (norm3); our DiT "
            f"uses {_OUR_EPS} there (as the official DiT does), so outputs will differ slightly",
            stacklevel=2,
        )
    C = int(cfg["in_channels"])
    C_out = C if cfg["out_channels"] is None else int(cfg["out_channels"])
    if C_out == 2 * C:
        learn_sigma = True
    elif C_out == C:
        learn_sigma = False
    else:
        raise ValueError(f"out_channels={C_out} must be in_channels ({C}) or 2·in_channels (learned sigma)")
    size = cfg["sample_size"]
    return {
        "input_size": size if isinstance(size, int) else tuple(size),
        "patch_size": int(cfg["patch_size"]),
        "in_channels": C,
        "hidden_size": int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"]),
        "depth": int(cfg["num_layers"]),
        "num_heads": int(cfg["num_attention_heads"]),
        "mlp_ratio": 4.0,
        "class_dropout_prob": _DIFFUSERS_CLASS_DROPOUT,
        "num_classes": int(cfg["num_embeds_ada_norm"]),
        "learn_sigma": learn_sigma,
        "timestep_freq_shift": 1.0,
    }


def _dit_defaults() -> dict:
    from .models.dit import DiT

    return {
        name: p.default
        for name, p in inspect.signature(DiT.__init__).parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }


def diffusers_config_from_dit(kwargs: dict) -> dict:
    """kwargs of our ``DiT`` (omitted ones take DiT's defaults) -> a ``DiTTransformer2DModel`` config.

    ``norm_eps=1e-6`` is set so diffusers' pre-MLP LayerNorm matches ours exactly (diffusers' default
    is 1e-5). diffusers always computes timestep frequencies with shift 1: if ``timestep_freq_shift``
    is not 1 (the official convention is 0), a UserWarning reminds you to call
    :func:`set_diffusers_timestep_freq_shift` on the built model. Raises ValueError for what
    diffusers cannot express: non-square grids, mlp_ratio != 4, class_dropout_prob == 0 (no null row).
    """
    defaults = _dit_defaults()
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise ValueError(f"unknown DiT kwargs: {sorted(unknown)}")
    kw = {**defaults, **kwargs}
    size = kw["input_size"]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h != w:
        raise ValueError(f"diffusers' DiTTransformer2DModel only supports square inputs, got input_size={(h, w)}")
    if float(kw["mlp_ratio"]) != 4.0:
        raise ValueError(f"diffusers' DiT MLP is fixed at 4× width, got mlp_ratio={kw['mlp_ratio']}")
    if not kw["class_dropout_prob"] > 0:
        raise ValueError(
            "class_dropout_prob=0 gives a label table without the null row; diffusers always has num_classes+1 rows"
        )
    D, H = int(kw["hidden_size"]), int(kw["num_heads"])
    if D % H:
        raise ValueError(f"hidden_size {D} is not divisible by num_heads {H}")
    if float(kw["timestep_freq_shift"]) != 1.0:
        warnings.warn(
            f"timestep_freq_shift={kw['timestep_freq_shift']}: diffusers' DiT uses shift 1; call "
            f"set_diffusers_timestep_freq_shift(model, {kw['timestep_freq_shift']}) on the built model "
            "for identical outputs",
            stacklevel=2,
        )
    C = int(kw["in_channels"])
    return {
        "num_attention_heads": H,
        "attention_head_dim": D // H,
        "in_channels": C,
        "out_channels": 2 * C if kw["learn_sigma"] else C,
        "num_layers": int(kw["depth"]),
        "dropout": 0.0,
        "attention_bias": True,
        "sample_size": h,
        "patch_size": int(kw["patch_size"]),
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": int(kw["num_classes"]),
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": _OUR_EPS,
    }


def set_diffusers_timestep_freq_shift(model, shift: float) -> int:
    """Set ``downscale_freq_shift`` of every block's ``norm1.emb.time_proj`` of a diffusers DiT model
    (0 = the official DiT convention, 1 = diffusers' default). Returns the number of blocks changed."""
    n = 0
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift
        n += 1
    return n
