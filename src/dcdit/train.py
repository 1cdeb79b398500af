"""The training loop: diffusion loss + λ·ratio loss, AdamW, EMA, clipping, DDP, exact resume.

Randomness is a function of (seed, step) only. Every step draws the *global* batch's data order,
timesteps, noise, label dropout and tail-drop fraction from a generator seeded with (seed, step),
and each rank takes its slice; a sample's data augmentation is seeded by (seed, step, its position
in the global batch). Hence

* a resumed run continues exactly where it stopped (the state is model, EMA, optimizer and step), and
* N processes with micro-batch B/N compute the same update as one process with batch B.

Label dropout is drawn here (not inside the model's label embedder, whose own dropout is switched
off) for the same reason. The ratio loss is computed per micro-batch in groups of
``ratio_batch_size`` samples, as the authors' release does per device.

Guards: a step with a non-finite loss or gradient norm is skipped, and ``train.max_nonfinite_steps``
of them in a row stop the run (:class:`TrainingDiverged`); weights are checked before every
checkpoint, so none holds a NaN or inf. SIGTERM / SIGINT finish the step, write a checkpoint and
stop (``dcdit.preemption``). ``--resume`` refuses settings that would change the trajectory
(:func:`changed_settings`) unless told ``allow_changed``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import distributed as D
from .checkpoint import (find_checkpoint, load_state_dict_checked, read_training_state, read_weights,
                         remove_stale_temporaries, save_checkpoint, set_rng_state)
from .config import ModelConfig, RunConfig, build_model, model_config_to_dict, run_config_to_dict
from .config_checks import check_batch_split
from .data import build_dataset, check_latent_meta, read_latent_meta
from .diffusion import create_diffusion
from .models.dydit import dydit_flops_loss, dydit_flops_ratio, flops_target, is_dydit_router
from .models.embedders import LabelEmbedder
from .models.interface import predict, routes_tokens
from .preemption import StopSignals, TrainingInterrupted
from .ratio_loss import curriculum_target_ratio, ratio_loss
from .run_lock import run_lock
from .train_log import TrainLogger
from .upcycle import distillation_loss, freeze_embedders, load_pretrained_dit, upcycle, upcycled_config

_MIX = 1_000_003  # spreads (seed, step, index) over seed space


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * _MIX + step)


class EpochOrder:
    """Global sample order: epoch e is a permutation seeded by (seed, e); position k = step·G + j."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def indices(self, start: int, count: int) -> torch.Tensor:
        out = []
        for k in range(start, start + count):
            epoch, pos = divmod(k, self.n)
            if epoch not in self._cache:
                self._cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * _MIX + 7919 * epoch))}
            out.append(int(self._cache[epoch][pos]))
        return torch.tensor(out)


def build_train_dataset(cfg: RunConfig):
    data = cfg.data
    if data.name == "mnist":
        kwargs = {"split": "train"}
        if data.flip is not None:
            kwargs["flip"] = data.flip
        return build_dataset("mnist", **kwargs)
    if data.name == "latents":
        if not data.root:
            raise ValueError("data.root must name the folder written by `dcdit extract-features`")
        check_latent_meta(read_latent_meta(data.root), vae_id=data.vae, latent_scale=data.latent_scale)
        return build_dataset("latents", root=data.root, flip=True if data.flip is None else data.flip)
    return build_dataset(data.name)  # raises with the list of valid names


def build_or_upcycle(cfg: RunConfig, fresh: bool) -> tuple[torch.nn.Module, torch.nn.Module | None, ModelConfig]:
    """(model to train, frozen teacher or None, the model's config).

    Upcycling (``train.upcycle.from_dit``) returns a new model config with the upcycling settings
    (condition adaptor, the DiT's timestep convention, positions in the DiT's patch coordinates), so
    that checkpoints describe the model exactly; ``cfg`` is not changed. On resume (``fresh=False``)
    the weights come from the checkpoint instead of the DiT."""
    up = cfg.train.upcycle
    if not up.from_dit:
        return build_model(cfg.model), None, cfg.model
    if cfg.model.arch != "dcdit":
        raise ValueError("train.upcycle.from_dit upcycles into a DC-DiT: set model.arch to dcdit")
    dit, report = load_pretrained_dit(up.from_dit, num_heads=up.num_heads)
    print(report.summary())
    if fresh:
        model, model_cfg = upcycle(dit, cfg.model)
    else:
        model_cfg = upcycled_config(dit, cfg.model)
        model = build_model(model_cfg)
    if up.freeze_embedders:
        freeze_embedders(model)
    return model, dit.eval().requires_grad_(False), model_cfg


def init_weights_from(model: torch.nn.Module, path: str) -> None:
    """Fine-tuning start: copy the weights of a dcdit checkpoint (EMA weights of a run / checkpoint
    folder, or a .safetensors file). Parameters the checkpoint lacks (e.g. newly added DyDiT routers)
    keep their initialisation and are listed; unexpected or mis-shaped keys are errors."""
    p = Path(path)
    file = find_checkpoint(p) / "ema.safetensors" if p.is_dir() else p
    state, _, step = read_weights(file)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if unexpected or shapes:
        raise ValueError(f"train.init_from={path}: the checkpoint does not fit the model: unexpected keys {unexpected[:5]}, "
                         f"shape mismatches {sorted(shapes)[:5]}; check the model section of the config")
    model.load_state_dict(state, strict=False)
    new = sorted(set(own) - set(state))
    print(f"initialised from {file} (step {step}): {len(state)} tensors loaded" + (f", new: {', '.join(new[:6])}" if new else ""))


def check_data_matches_model(sample: torch.Tensor, model) -> None:
    C, H, W = sample.shape
    if C != model.in_channels or (H, W) != tuple(model.grid):
        raise ValueError(
            f"the data set yields {C}×{H}×{W} samples but the model expects "
            f"{model.in_channels}×{model.grid[0]}×{model.grid[1]}: set model.in_channels={C} and model.input_size=[{H}, {W}]"
        )


def check_labels_fit(dataset, cfg: RunConfig) -> None:
    """The data's labels must be classes of the model: label ``num_classes`` is the null class of
    classifier-free guidance, so a real class there would silently become unconditional."""
    labels = getattr(dataset, "labels", None)
    if labels is None or len(labels) == 0:
        return
    lo, hi, k = int(labels.min()), int(labels.max()), cfg.model.num_classes
    if lo < 0 or hi >= k:
        raise ValueError(
            f"the {cfg.data.name} data set has labels {lo}..{hi} but model.num_classes={k} (classes 0..{k - 1}; "
            f"{k} is the null label of guidance): set model.num_classes={hi + 1}" + (" or more" if lo >= 0 else "")
        )


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@torch.no_grad()
def rank_divergence(model: torch.nn.Module) -> float:
    """Max over parameter tensors of |checksum(rank r) − checksum(rank 0)|: 0.0 when DDP kept the ranks identical."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    gathered = D.all_gather_cat(sums[None])  # (world, n_tensors)
    return float((gathered - gathered[:1]).abs().max())


def autocast_for(device: torch.device, mixed_precision: str):
    if mixed_precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.mixed_precision must be auto, bf16 or fp32, got {mixed_precision!r}")
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def parameter_groups(model: torch.nn.Module, tc) -> list[dict]:
    """AdamW groups: every trainable parameter at ``train.lr``; with ``train.dydit_router_lr`` set,
    the DyDiT routers in a second group at that rate (their all-on initialisation needs large moves,
    see docs/dydit.md, while the pretrained weights should move little)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if tc.dydit_router_lr is None:
        return [{"params": [p for _, p in named], "lr": tc.lr}]
    is_router = [is_dydit_router(n) for n, _ in named]
    if not any(is_router):
        raise ValueError("train.dydit_router_lr is set but the model has no DyDiT routers: set model.dydit=true "
                         "or remove train.dydit_router_lr")
    return [{"params": [p for (_, p), r in zip(named, is_router) if not r], "lr": tc.lr},
            {"params": [p for (_, p), r in zip(named, is_router) if r], "lr": tc.dydit_router_lr}]


# ------------------------------------------------------------------------------------ setup and resume


@dataclass
class TrainingRun:
    """Everything the steps of a run share, built once by :func:`setup_run`.

    ``cfg`` is the run's resolved config (with an upcycled model's settings); ``ddp`` is the model
    behind DistributedDataParallel under torchrun (the model itself in one process); ``step`` counts
    the completed optimizer steps."""

    cfg: RunConfig
    run_dir: Path
    dist: D.DistInfo
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataset: Any
    diffusion: Any
    order: EpochOrder
    sample_shape: tuple[int, int, int]  # (C, H, W) of one training sample
    teacher: torch.nn.Module | None = None
    ddp: torch.nn.Module | None = None
    micro: int = 1
    accum: int = 1
    step: int = 0
    skipped_total: int = 0
    nonfinite_streak: int = 0  # consecutive skipped steps up to now
    wall_before: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def distilling(self) -> bool:
        return self.teacher is not None and self.step < self.cfg.train.upcycle.distill_steps


def setup_run(cfg: RunConfig, run_dir, resume: bool, device: str | None, allow_changed: bool = False) -> TrainingRun:
    """The process group, model, EMA, optimizer and data of a run; resumed from its latest checkpoint
    or started fresh (optionally from ``train.init_from``). A straight sequence kept whole: its order
    fixes what the seeded global random stream initialises."""
    dist_info = D.setup(device)
    tc, run_dir = cfg.train, Path(run_dir)
    micro, accum = check_batch_split(cfg, dist_info.world_size)
    if dist_info.is_main:  # a killed earlier run's half-written checkpoint folders (before resume reads the run)
        remove_stale_temporaries(run_dir)
    torch.manual_seed(tc.seed)  # identical initialisation on every rank
    model, teacher, model_cfg = build_or_upcycle(cfg, fresh=not resume)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    model = model.to(dist_info.device)
    for m in model.modules():  # label dropout is drawn by the loop from the global stream (see module doc)
        if isinstance(m, LabelEmbedder):
            m.dropout_prob = 0.0
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(parameter_groups(model, tc), lr=tc.lr, weight_decay=tc.weight_decay)
    dataset = build_train_dataset(cfg)
    check_data_matches_model(dataset[0][0], model)
    check_labels_fit(dataset, cfg)
    if tc.multi_budget.fractions and not routes_tokens(model):
        raise ValueError("train.multi_budget draws tail-drop fractions, which only a DC-DiT has: remove "
                         "train.multi_budget.fractions or set model.arch to dcdit")
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=model.noise_schedule, learn_sigma=model.learn_sigma)
    run = TrainingRun(cfg, run_dir, dist_info, model, ema, optimizer, dataset, diffusion, EpochOrder(len(dataset), tc.seed),
                      tuple(dataset[0][0].shape), teacher, model, micro, accum)
    if resume:
        resume_from_checkpoint(run, allow_changed)
    elif (run_dir / "checkpoints" / "latest").exists():
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose a new --out")
    elif tc.init_from:
        init_weights_from(model, tc.init_from)
        ema.load_state_dict(model.state_dict())
    run.teacher = teacher.to(dist_info.device) if run.distilling else None
    if dist_info.world_size > 1:  # while distilling, the decoder gets no gradient: DDP must tolerate unused parameters
        run.ddp = DDP(model, device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
                      find_unused_parameters=run.teacher is not None)
    return run


def check_same_model(saved: RunConfig, now: RunConfig, ckpt: Path, run_dir: Path) -> None:
    """A run resumes only with the model it was trained with (the weights would not fit otherwise)."""
    a, b = model_config_to_dict(saved.model), model_config_to_dict(now.model)
    if a != b:
        diff = ", ".join(f"model.{k}: {a.get(k)!r} in the run, {b.get(k)!r} now"
                         for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
        raise ValueError(f"cannot resume {ckpt}: its model config differs from this run's ({diff}); "
                         f"resume with the run's own config: dcdit train {run_dir / 'config.yaml'} --out {run_dir} --resume")


# Settings that do not change what a step computes: a run may resume with other values of these.
RESUME_FREE = {"train.steps", "train.log_every", "train.ckpt_every", "train.keep_last", "train.tensorboard",
               "train.wandb", "train.max_nonfinite_steps", "train.init_from"}


def _flat(section: str, d: dict) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(f"{section}.{k}", v) if isinstance(v, dict) else {f"{section}.{k}": v})
    return out


def changed_settings(saved: RunConfig, now: RunConfig, saved_layout: dict, now_layout: dict) -> list[str]:
    """What differs between a run and the settings it is resumed with, among everything that changes
    the training trajectory: the data and train sections (except :data:`RESUME_FREE`) and the batch
    layout (processes × micro-batch; older checkpoints did not record it). One line per change."""
    old, new = ({k: v for s in ("data", "train") for k, v in _flat(s, run_config_to_dict(c)[s]).items()} for c in (saved, now))
    changes = [f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
               if k not in RESUME_FREE and old.get(k) != new.get(k)]
    if saved_layout and saved_layout != now_layout:
        changes.append(f"batch layout: {saved_layout['world_size']} process(es) × micro-batch {saved_layout['micro_batch_size']} "
                       f"in the run, {now_layout['world_size']} × {now_layout['micro_batch_size']} now")
    return changes


def resume_from_checkpoint(run: TrainingRun, allow_changed: bool = False) -> None:
    """Weights, EMA, optimizer, counters and RNG state of the run folder's latest checkpoint. The
    model must be the run's; other settings that change the trajectory are refused unless
    ``allow_changed`` (then listed)."""
    ckpt = find_checkpoint(run.run_dir)
    state, saved_cfg, _ = read_weights(ckpt / "model.safetensors")
    check_same_model(saved_cfg, run.cfg, ckpt, run.run_dir)
    ts = read_training_state(ckpt)
    changes = changed_settings(saved_cfg, run.cfg, ts.get("batch_layout", {}), batch_layout(run))
    if changes and not allow_changed:
        raise ValueError(f"cannot resume {ckpt} exactly, these settings differ from the run's: {'; '.join(changes)}. "
                         f"Resume with the run's settings ({run.run_dir / 'config.yaml'}), or pass --allow-changed "
                         f"to continue with the new ones")
    if changes and run.dist.is_main:
        print(f"resuming {ckpt} with changed settings (the run no longer continues exactly): {'; '.join(changes)}")
    load_state_dict_checked(run.model, state, str(ckpt / "model.safetensors"))
    load_state_dict_checked(run.ema, read_weights(ckpt / "ema.safetensors")[0], str(ckpt / "ema.safetensors"))
    run.optimizer.load_state_dict(ts["optimizer"])
    run.step, run.skipped_total, run.wall_before = ts["step"], ts.get("skipped_steps", 0), ts.get("wall_time", 0.0)
    run.nonfinite_streak = ts.get("nonfinite_streak", 0)
    set_rng_state(ts["rng"])


def batch_layout(run: TrainingRun) -> dict:
    return {"world_size": run.dist.world_size, "micro_batch_size": run.micro}


# ------------------------------------------------------------------------------------ one step


@dataclass
class StepDraws:
    """A step's draws for the whole global batch G from the stream seeded by (seed, step): data
    indices (G,), timesteps (G,), noise (G, C, H, W), label drops (G,) bool, the tail-drop fraction."""

    indices: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor
    fraction: float


def draw_step(run: TrainingRun) -> StepDraws:
    tc, G = run.cfg.train, run.cfg.train.global_batch_size
    g = step_generator(tc.seed, run.step)
    indices = run.order.indices(run.step * G, G)
    t = torch.randint(0, run.diffusion.num_timesteps, (G,), generator=g)
    noise = torch.randn(G, *run.sample_shape, generator=g)
    drop = torch.rand(G, generator=g) < run.cfg.model.class_dropout_prob
    mb, fraction = tc.multi_budget, 0.0
    if mb.fractions and run.step >= mb.start_step:
        fraction = float(mb.fractions[int(torch.randint(len(mb.fractions), (1,), generator=g))])
    return StepDraws(indices, t, noise, drop, fraction)


@dataclass
class MicroBatch:
    """One process's share of the global batch for one forward pass (tensors on the device)."""

    x: torch.Tensor
    y: torch.Tensor
    drop: torch.Tensor  # (B,) long, 1 where the label becomes the null class
    t: torch.Tensor
    noise: torch.Tensor


def load_micro_batch(run: TrainingRun, draws: StepDraws, a: int) -> MicroBatch:
    """Micro-batch ``a`` of this rank: global positions [(rank·accum + a)·micro, ... + micro). Each
    sample's augmentation is seeded by (seed, step, its global position)."""
    seed, dev = run.cfg.train.seed, run.device
    lo = (run.dist.rank * run.accum + a) * run.micro
    sl = slice(lo, lo + run.micro)
    xs, ys = [], []
    for j, i in zip(range(lo, lo + run.micro), draws.indices[sl].tolist()):
        torch.manual_seed(seed * _MIX + run.step * 7919 + j)  # per-sample augmentation stream
        x_j, y_j = run.dataset[i]
        xs.append(x_j)
        ys.append(int(y_j))
    return MicroBatch(torch.stack(xs).to(dev), torch.tensor(ys).to(dev), draws.drop[sl].long().to(dev),
                      draws.t[sl].to(dev), draws.noise[sl].to(dev))


def model_terms(run: TrainingRun, batch: MicroBatch, fraction: float) -> tuple[dict, torch.Tensor]:
    """The model's part of the loss under autocast: (the diffusion's terms — ``loss`` (B,), ``mse``,
    ``vb``, ``aux`` the routing record —, the distillation loss). While upcycling distils (paper
    §4.4) the terms' ``loss`` is the distillation loss."""
    with autocast_for(run.device, run.cfg.train.mixed_precision):
        if run.distilling:
            x_t = run.diffusion.q_sample(batch.x, batch.t, noise=batch.noise)
            d_loss, record = distillation_loss(run.ddp, run.teacher, x_t, batch.t, batch.y, fraction,
                                               student_blocks=run.model.blocks, force_drop_ids=batch.drop)
            return {"loss": d_loss[None], "mse": torch.zeros(1), "aux": record}, d_loss
        # Label dropout for CFG was drawn from the step's stream; the model must not drop again.
        kwargs = {"y": batch.y, "force_drop_ids": batch.drop, "tail_dropping_fraction": fraction}
        terms = run.diffusion.training_losses(functools.partial(predict, run.ddp), batch.x, batch.t, model_kwargs=kwargs,
                                              noise=batch.noise)
        return terms, torch.zeros((), device=run.device)


def loss_terms(run: TrainingRun, batch: MicroBatch, fraction: float) -> dict:
    """One micro-batch's loss = diffusion (or distillation) + λ·ratio (DC-DiT, paper §3.3; N follows the
    release's curriculum when set, docs/release.md) + the DyDiT FLOPs term (paper §4.5, docs/dydit.md).
    Returns ``loss`` (0-d tensor) and its parts."""
    tc, model_cfg = run.cfg.train, run.cfg.model
    terms, d_loss = model_terms(run, batch, fraction)
    diff_loss = terms["loss"].mean()
    out = {"diffusion": diff_loss.detach(), "mse": terms["mse"].detach().mean(), "distill": d_loss.detach(),
           "vb": terms["vb"].detach().mean() if "vb" in terms else None, "record": terms.get("aux")}
    loss, record = diff_loss, terms.get("aux")
    if record is not None:
        target_n = curriculum_target_ratio(run.step, model_cfg.target_ratio, tc.target_ratio_start, tc.target_ratio_warmup_steps)
        r_loss = ratio_loss(record, target_n, tc.ratio_batch_size)
        loss, out["ratio"] = loss + tc.ratio_loss_weight * r_loss, r_loss.detach()
        if record.dydit is not None:  # DyDiT: inner-block FLOPs toward the target λ
            f_loss = dydit_flops_loss(record, model_cfg, flops_target(run.step, tc.dydit_warmup_steps, tc.dydit_target))
            loss = loss + tc.dydit_loss_weight * f_loss
            out["dydit_loss"], out["dydit_ratio"] = f_loss.detach(), dydit_flops_ratio(record, model_cfg).detach().mean()
    out["loss"] = loss
    return out


def accumulate_gradients(run: TrainingRun, draws: StepDraws, logger: TrainLogger) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches (DDP syncs on the last one). Returns 1.0
    when every micro-batch's loss was finite, else 0.0 (a 0-d tensor on the device)."""
    tc, world = run.cfg.train, run.dist.world_size
    loss_ok = torch.ones((), device=run.device)
    for a in range(run.accum):
        batch = load_micro_batch(run, draws, a)
        sync = (a == run.accum - 1) or world == 1
        with run.ddp.no_sync() if not sync else contextlib.nullcontext():
            torch.manual_seed(tc.seed * _MIX + run.step * 7919 + tc.global_batch_size + run.dist.rank * run.accum + a)  # model-internal randomness
            terms = loss_terms(run, batch, draws.fraction)
            loss_ok = loss_ok * torch.isfinite(terms["loss"].detach()).float()
            (terms["loss"] / run.accum).backward()
        logger.add_micro_batch(terms, run.accum)
    return loss_ok


def optimizer_update(run: TrainingRun, loss_ok: torch.Tensor) -> tuple[bool, float]:
    """Clip, then AdamW and EMA when the loss was finite on every rank and the gradient norm is finite;
    otherwise the step is skipped. Returns (applied, gradient norm before clipping)."""
    tc = run.cfg.train
    D.all_reduce_(loss_ok, op=torch.distributed.ReduceOp.MIN if run.dist.world_size > 1 else None)
    clip = tc.grad_clip if tc.grad_clip and tc.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip))
    applied = bool(loss_ok) and math.isfinite(grad_norm)
    if applied:
        run.optimizer.step()
        decay = min(tc.ema_decay, (1 + run.step) / (10 + run.step)) if tc.ema_warmup else tc.ema_decay
        update_ema(run.ema, run.model, decay)
    run.optimizer.zero_grad(set_to_none=True)
    return applied, grad_norm


# ------------------------------------------------------------------------------------ checkpoints and the loop


class TrainingDiverged(ValueError):
    """The run stopped because its loss or weights stopped being finite. A ValueError: a setting
    (the learning rate, usually) causes it, and the message says which and what to do."""


def _last_checkpoint(run: TrainingRun) -> str:
    latest = run.run_dir / "checkpoints" / "latest"
    return str(run.run_dir / "checkpoints" / latest.read_text().strip()) if latest.exists() else "none yet"


def check_divergence(run: TrainingRun) -> None:
    """``train.max_nonfinite_steps`` skipped steps in a row end the run (the same on every rank: the
    skip decision is reduced over ranks)."""
    limit = run.cfg.train.max_nonfinite_steps
    if run.nonfinite_streak >= limit:
        raise TrainingDiverged(
            f"training diverged: steps {run.step - run.nonfinite_streak + 1}-{run.step} all had a non-finite loss or "
            f"gradient norm (train.max_nonfinite_steps={limit}); the newest checkpoint ({_last_checkpoint(run)}) holds "
            f"finite weights: resume it with a lower train.lr (now {run.cfg.train.lr:g}) and --allow-changed")


def nonfinite_weights(run: TrainingRun) -> list[str]:
    """Names of the model / EMA tensors holding a NaN or inf."""
    return [f"{prefix}{name}" for prefix, module in (("", run.model), ("ema: ", run.ema))
            for name, t in module.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def write_checkpoint(run: TrainingRun, seconds: float) -> Path:
    """Rank 0 writes ``checkpoints/<step>`` (atomically, see dcdit.checkpoint); every rank waits for it.
    Weights with a NaN or inf are never written: every rank checks its own (identical) copy first."""
    bad = nonfinite_weights(run)
    if bad:
        raise TrainingDiverged(
            f"step {run.step}: the weights hold non-finite values ({', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}), "
            f"so no checkpoint was written; the newest checkpoint ({_last_checkpoint(run)}) is intact: resume it with "
            f"a lower train.lr (now {run.cfg.train.lr:g}) and --allow-changed")
    final = run.run_dir / "checkpoints" / f"{run.step:07d}"
    if run.dist.is_main:
        extra = {"skipped_steps": run.skipped_total, "nonfinite_streak": run.nonfinite_streak,
                 "wall_time": run.wall_before + seconds, "batch_layout": batch_layout(run)}
        final = save_checkpoint(run.run_dir, run.step, run.model, run.ema, run.optimizer, run.cfg, extra,
                                keep_last=run.cfg.train.keep_last)
    D.barrier()
    return final


def run_steps(run: TrainingRun, logger: TrainLogger, stop: StopSignals, t_start: float) -> None:
    """Steps until ``train.steps``: the step's draws → forward/backward over the micro-batches →
    optimizer and EMA update → a log row and a checkpoint when due → stop on divergence or a signal."""
    tc = run.cfg.train
    while run.step < tc.steps:
        draws = draw_step(run)
        applied, grad_norm = optimizer_update(run, accumulate_gradients(run, draws, logger))
        run.skipped_total += not applied
        run.nonfinite_streak = 0 if applied else run.nonfinite_streak + 1
        logger.end_step(run.step, draws.fraction, grad_norm, applied)
        run.step += 1
        signum = stop.agreed(run.device)
        if run.step % tc.log_every == 0 or run.step == tc.steps or run.step == 1 or signum:
            logger.write(run.step, run.skipped_total, run.device)
        check_divergence(run)
        if run.step % tc.ckpt_every == 0 or run.step == tc.steps or signum:
            checkpoint = write_checkpoint(run, time.time() - t_start)
        if signum:
            raise TrainingInterrupted(signum, run.step, checkpoint)


def train(cfg: RunConfig, run_dir: str | os.PathLike, resume: bool = False, device: str | None = None, progress: bool = True,
          allow_changed: bool = False) -> dict:
    """Train ``cfg`` into ``run_dir``; ``resume=True`` continues from its latest checkpoint (with
    settings that change the trajectory only when ``allow_changed``).

    Returns the summary also written to ``train_summary.json``. Raises :class:`TrainingDiverged`
    when the loss or the weights stop being finite, and
    :class:`~dcdit.preemption.TrainingInterrupted` after the checkpoint a SIGTERM / SIGINT asked for."""
    with run_lock(run_dir, enabled=D.launch_rank() == 0):  # one process per run folder (dcdit.run_lock)
        return _train(cfg, run_dir, resume, device, progress, allow_changed)


def _train(cfg: RunConfig, run_dir, resume: bool, device: str | None, progress: bool, allow_changed: bool) -> dict:
    run = setup_run(cfg, run_dir, resume, device, allow_changed)
    tc = run.cfg.train
    logger = TrainLogger(run.cfg, run.run_dir, run.dist, total_steps=tc.steps, start_step=run.step,
                         resume_step=run.step if resume else None, progress=progress)
    t_start = time.time()
    run.model.train()
    try:
        with StopSignals() as stop:
            run_steps(run, logger, stop, t_start)
    except BaseException:
        logger.close()
        raise
    return finish(run, logger, time.time() - t_start)


def finish(run: TrainingRun, logger: TrainLogger, seconds: float) -> dict:
    """The summary (``train_summary.json``), closed logs, and the process group torn down."""
    logger.bar.close()
    summary = {"step": run.step, "skipped_steps": run.skipped_total, "wall_time_s": run.wall_before + seconds,
               "rank_param_max_abs_diff": rank_divergence(run.model), **logger.last}
    if run.dist.is_main:
        (run.run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    logger.close()
    D.barrier()  # every rank done before the group goes away (a rank tearing down early can abort gloo)
    D.teardown()
    return summary
