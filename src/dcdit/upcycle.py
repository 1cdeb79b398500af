"""Upcycling a pretrained DiT into DC-DiT (arXiv 2603.06351 §4.4; docs/upcycling.md).

1. :func:`load_pretrained_dit` reads a DiT from the official release format (``.pt`` with a bare state
   dict or one under ``ema`` / ``model``, read with ``torch.load(weights_only=True)``) or diffusers'
   ``DiTTransformer2DModel`` format (a folder with ``config.json``, or a ``.safetensors`` file), and
   reports the mapped, missing and unexpected keys. A diffusers model keeps diffusers' timestep
   frequencies (``timestep_freq_shift=1``) so that it reproduces its source exactly.
2. :func:`upcycle` builds a DC-DiT whose inner blocks are the pretrained blocks, whose timestep and
   class embedders are copied (and frozen by the trainer), with a trainable LayerNorm adaptor on the
   condition inside the encoder and decoder; everything else is newly initialised.
3. :func:`distillation_loss` is the activation-distillation warm-up: a frozen copy of the DiT (the
   teacher) sees the same (x_t, t, y); the MSE between student and teacher block outputs.

**Positions.** A DiT/P knows a (H/P)×(W/P) grid of patches: patch (i, j) carries the sin-cos code of
the integer coordinate (i, j) and stands for the P×P pixels it covers, whose centre is pixel
(P·i + (P−1)/2, P·j + (P−1)/2). An upcycled DC-DiT token at latent pixel (r, c) is therefore placed
at ((r − (P−1)/2)/P, (c − (P−1)/2)/P) in the DiT's coordinates (``pos_offset = (P−1)/2``,
``pos_scale = 1/P``): the P² pixels of a patch average exactly to the patch's own coordinate, and a
token in the middle of a flat region gets the code the pretrained blocks saw there. The plain
(r/P, c/P) would shift every token by (P−1)/(2P) of a patch toward the bottom-right.

**Distillation pairs.** After inner block k the student holds its kept tokens (packed (T, D), or
padded (B, M, D) with ``model.execution=padded``); the teacher holds its (H/P)·(W/P) patch tokens
(B, N, D). Each real kept token at latent pixel (r, c) is paired with the teacher token of the patch
that contains it, (r // P, c // P); padding slots are ignored. The loss is the mean over blocks of
the mean squared error over the paired tokens (of the whole batch) and channels.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import load_foreign_state_dict, load_state_dict_checked
from .config import DCDiTConfig, RunConfig
from .models.dcdit import DCDiT
from .models.dit import DiT

# Heads of the official DiT sizes (head width is 64 except for XL's 72): the state dict cannot tell.
_DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


@dataclass
class LoadReport:
    source: str
    format: str
    config: dict
    mapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.source} ({self.format}): {len(self.mapped)} keys mapped, {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected"]
        if self.missing:
            lines.append(f"  missing: {', '.join(self.missing[:8])}")
        if self.unexpected:
            lines.append(f"  unexpected (ignored): {', '.join(self.unexpected[:8])}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def dit_config_from_state_dict(sd: dict, num_heads: int | None = None) -> dict:
    """Infer the DiT constructor arguments from an official-layout state dict."""
    try:
        D, C, P, _ = sd["x_embedder.proj.weight"].shape
        T = sd["pos_embed"].shape[1]
        out = sd["final_layer.linear.weight"].shape[0]
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an official DiT state dict: key {e} is missing") from None
    side = round(T**0.5)
    if side * side != T:
        raise ValueError(f"pos_embed has {T} tokens, not a square grid: pass input_size explicitly")
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    return dict(
        input_size=side * P, patch_size=P, in_channels=C, hidden_size=D, depth=depth,
        num_heads=num_heads or _DIT_HEADS.get(D, max(1, D // 64)), num_classes=rows - 1, class_dropout_prob=0.1,
        learn_sigma=out == P * P * 2 * C, timestep_freq_shift=0.0,
    )


def _dcdit_dit_weights(path: Path):
    """(DiT, its config, step) when ``path`` is a DiT written by ``dcdit train`` (run / checkpoint folder or its
    ``.safetensors``); None for anything else."""
    from .checkpoint import CONFIG_KEY, find_checkpoint, load_model

    try:
        weights = find_checkpoint(path) / "ema.safetensors" if path.is_dir() else path
    except FileNotFoundError:
        return None
    if weights.suffix != ".safetensors" or not weights.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        if CONFIG_KEY not in (f.metadata() or {}):
            return None
    model, cfg, step = load_model(weights)
    if cfg.model.arch != "dit":
        raise ValueError(f"{path} is a dcdit {cfg.model.arch!r} checkpoint; upcycling starts from a DiT")
    return model, cfg.model, step


def load_pretrained_dit(path: str | Path, num_heads: int | None = None, input_size=None) -> tuple[DiT, LoadReport]:
    """An official DiT ``.pt`` or a diffusers DiT (folder / ``.safetensors``) -> (our DiT, report)."""
    from .diffusers_convert import diffusers_to_dit_state_dict, dit_config_from_diffusers

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained DiT {path} does not exist (nothing is downloaded: pass a local path)")
    own_run = _dcdit_dit_weights(path)
    if own_run is not None:
        dit, dit_cfg, step = own_run
        config = {k: v for k, v in dataclasses.asdict(dit_cfg).items() if k != "arch"}
        report = LoadReport(str(path), "dcdit run", config, sorted(dit.state_dict()),
                            notes=[f"a DiT trained by `dcdit train` (EMA weights, step {step})"])
        return dit, report
    if path.is_dir() or path.suffix == ".safetensors":
        from safetensors.torch import load_file

        folder = path if path.is_dir() else path.parent
        weights = path if path.suffix == ".safetensors" else next(iter(sorted(folder.glob("*.safetensors"))), None)
        config_file = folder / "config.json"
        if weights is None or not config_file.exists():
            raise FileNotFoundError(f"{path}: a diffusers DiT needs config.json and a .safetensors file in {folder}")
        cfg = dit_config_from_diffusers(json.loads(config_file.read_text()))
        if num_heads:
            cfg["num_heads"] = num_heads
        sd, conv = diffusers_to_dit_state_dict(load_file(str(weights)), input_size=input_size or cfg["input_size"], strict=False)
        report = LoadReport(str(path), "diffusers", cfg, sorted(conv.mapped), conv.missing, conv.unexpected,
                            ["diffusers timestep frequencies kept (timestep_freq_shift=1): the model reproduces the source"])
    else:
        sd = load_foreign_state_dict(path)
        cfg = dit_config_from_state_dict(sd, num_heads)
        report = LoadReport(str(path), "official DiT", cfg)
    model = DiT(**cfg)
    own = model.state_dict()
    if report.format == "official DiT":
        report.mapped, report.unexpected = sorted(set(own) & set(sd)), sorted(set(sd) - set(own))
    report.missing += sorted(set(own) - set(sd))
    if set(own) - set(sd):
        raise ValueError(f"cannot build a DiT from {path}: " + report.summary())
    load_state_dict_checked(model, {k: sd[k] for k in own}, str(path))
    return model, report


def upcycled_config(dit: DiT, dc: DCDiTConfig) -> DCDiTConfig:
    """Check that ``dc`` can host ``dit``'s blocks and return it with the upcycling settings."""
    if not all(dc.inner_mlp or ()):
        raise ValueError("model.inner_mlp has blocks without MLP, but upcycling copies every DiT block's MLP: set model.inner_mlp null")
    D = dit.pos_embed.shape[-1]
    wrong = [f"{name}: DC-DiT {ours} vs DiT {theirs}" for name, ours, theirs in (
        ("hidden_size", dc.hidden_size, D), ("depth", dc.depth, len(dit.blocks)), ("num_heads", dc.num_heads, dit.num_heads),
        ("MLP width", int(dc.mlp_ratio * dc.hidden_size), dit.blocks[0].mlp.fc1.out_features), ("num_classes", dc.num_classes, dit.num_classes),
        ("in_channels", dc.in_channels, dit.in_channels), ("learn_sigma", dc.learn_sigma, dit.learn_sigma),
    ) if ours != theirs]
    if wrong:
        raise ValueError("the pretrained DiT does not fit this DC-DiT config: " + "; ".join(wrong))
    P = dit.patch_size
    return dataclasses.replace(dc, cond_adaptor=True, timestep_freq_shift=dit.t_embedder.downscale_freq_shift,
                               pos_scale=1.0 / P, pos_offset=(P - 1) / 2, class_dropout_prob=dit.class_dropout_prob,
                               noise_schedule=dit.noise_schedule)  # the DiT's diffusion, too


def upcycle(dit: DiT, dc: DCDiTConfig) -> tuple[DCDiT, DCDiTConfig]:
    """A DC-DiT with ``dit``'s inner blocks and embedders (everything else newly initialised)."""
    from .config import build_model

    cfg = upcycled_config(dit, dc)
    model = build_model(cfg)
    src = dit.state_dict()
    copied = {k: v for k, v in src.items() if k.startswith(("blocks.", "t_embedder.", "y_embedder."))}
    missing, unexpected = model.load_state_dict(copied, strict=False)
    assert not unexpected, unexpected
    return model, cfg


@dataclass
class UpcycledRun:
    """What :func:`upcycle_run_config` made: the model (embedders frozen), the run config that
    describes it (upcycled model section, ``train.upcycle.from_dit`` set), the DiT's load report,
    the frozen parameter names and the number of block tensors copied."""

    model: DCDiT
    cfg: RunConfig
    report: LoadReport
    frozen: list[str]
    copied_block_tensors: int


def upcycle_run_config(cfg: RunConfig, dit_path: str | Path, num_heads: int | None = None) -> UpcycledRun:
    """``dcdit upcycle``: load the DiT at ``dit_path``, upcycle it into ``cfg.model``, freeze the
    embedders; ``cfg`` itself is not changed (the returned config is a new one)."""
    dit, report = load_pretrained_dit(dit_path, num_heads=num_heads)
    model, model_cfg = upcycle(dit, cfg.model)
    up = dataclasses.replace(cfg.train.upcycle, from_dit=str(dit_path))
    new_cfg = dataclasses.replace(cfg, model=model_cfg, train=dataclasses.replace(cfg.train, upcycle=up))
    frozen = freeze_embedders(model)
    copied = sum(k.startswith("blocks.") for k in model.state_dict())
    return UpcycledRun(model, new_cfg, report, frozen, copied)


def freeze_embedders(model: nn.Module) -> list[str]:
    """Freeze the pretrained timestep and class embedders (they drift otherwise, paper §4.4)."""
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(("t_embedder.", "y_embedder.")):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def patch_index_of_tokens(kept_idx: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, M) latent-pixel raster indices -> (B, M) raster index of the DiT patch containing them."""
    W = grid[1]
    r, c = torch.div(kept_idx, W, rounding_mode="floor"), kept_idx % W
    return torch.div(r, patch, rounding_mode="floor") * (W // patch) + torch.div(c, patch, rounding_mode="floor")


def _capture_block_outputs(blocks: nn.ModuleList) -> tuple[list[torch.Tensor], list]:
    outputs = []
    handles = [b.register_forward_hook(lambda mod, args, out: outputs.append(out)) for b in blocks]
    return outputs, handles


def distillation_loss(student, teacher: DiT, x_t, t, y, tail_dropping_fraction=0.0, student_blocks=None, force_drop_ids=None):
    """Mean over inner blocks of MSE(student block output, teacher block output) over paired tokens.

    Returns (loss, routing record). The teacher runs without gradient; the student's prediction
    head is not needed but runs (the forward is one piece); its output is discarded.
    ``student`` may be a DDP wrapper; then pass the wrapped model's ``blocks`` as ``student_blocks``.
    ``force_drop_ids`` (B,) nulls the same labels for both (else a training-mode student would drop
    labels at random and see a different condition from the teacher).
    """
    s_out, s_handles = _capture_block_outputs(student_blocks if student_blocks is not None else student.blocks)
    t_out, t_handles = _capture_block_outputs(teacher.blocks)
    try:
        with torch.no_grad():
            teacher(x_t, t, y, force_drop_ids=force_drop_ids)
        _, record = student(x_t, t, y, tail_dropping_fraction, force_drop_ids=force_drop_ids)
    finally:
        for h in s_handles + t_handles:
            h.remove()
    # Pairs in the packed order (sample after sample, raster order): student block outputs are packed
    # (T, D), or padded (B, M, D) with the real tokens in the first kept_count slots of each sample.
    cells = record.packed_index  # (T,) flat b·L + l
    L = record.p.shape[1]
    sample = torch.div(cells, L, rounding_mode="floor")
    pair = patch_index_of_tokens(cells % L, record.grid, teacher.patch_size)  # (T,) the teacher patch of each token
    losses = []
    for zs, zt in zip(s_out, t_out):
        zs = zs[record.slot_mask] if zs.dim() == 3 else zs  # (T, D)
        losses.append(((zs.float() - zt.detach()[sample, pair].float()) ** 2).mean())
    return torch.stack(losses).mean(), record
