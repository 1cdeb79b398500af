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
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import find_checkpoint, load_state_dict_checked, read_weights, save_checkpoint, set_rng_state
from .config import RunConfig, build_model, model_config_to_dict, save_run_config
from .data import build_dataset, check_latent_meta, read_latent_meta
from .diffusion import create_diffusion
from .models.embedders import LabelEmbedder
from .models.dydit import dydit_flops_loss, dydit_flops_ratio, flops_target, is_dydit_router
from .ratio_loss import curriculum_target_ratio, ratio_loss
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


def build_or_upcycle(cfg: RunConfig, fresh: bool):
    """The model to train, and the frozen teacher when upcycling (``train.upcycle.from_dit``).

    Upcycling rewrites ``cfg.model`` with the upcycling settings (condition adaptor, the DiT's
    timestep convention, positions in the DiT's patch coordinates) so that checkpoints describe the
    model exactly; on resume the weights come from the checkpoint instead of the DiT."""
    up = cfg.train.upcycle
    if not up.from_dit:
        return build_model(cfg.model), None
    if cfg.model.arch != "dcdit":
        raise ValueError("train.upcycle.from_dit upcycles into a DC-DiT: set model.arch to dcdit")
    dit, report = load_pretrained_dit(up.from_dit, num_heads=up.num_heads)
    print(report.summary())
    if fresh:
        model, cfg.model = upcycle(dit, cfg.model)
    else:
        cfg.model = upcycled_config(dit, cfg.model)
        model = build_model(cfg.model)
    if up.freeze_embedders:
        freeze_embedders(model)
    return model, dit.eval().requires_grad_(False)


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


@dataclass
class _Interval:
    """Running sums between two log lines (local to a rank)."""

    steps: int = 0
    loss: float = 0.0
    diffusion: float = 0.0
    mse: float = 0.0
    vb: float = 0.0
    ratio: float = 0.0
    distill: float = 0.0
    dydit_loss: float = 0.0
    dydit_ratio: float = 0.0
    grad_norm: float = 0.0
    skipped: int = 0
    t0: float = 0.0


class CSVLog:
    """``log.csv``: one row per logged step. Rewrites (resume, new columns) go through a temporary
    file and an atomic rename, and work on raw rows, so a malformed row never costs the log."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():  # drop rows logged after the checkpoint we resume from
            rows = self._raw_rows()
            if rows:
                keep = [r for r in rows[1:] if r and (not r[0].isdigit() or int(r[0]) <= resume_step)]
                self._replace([rows[0], *keep])

    def _raw_rows(self) -> list[list[str]]:
        with open(self.path, newline="") as f:
            return list(csv.reader(f))

    def _replace(self, rows: list[list[str]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        header = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), None)
        if header is not None and header != list(row):  # columns changed (e.g. a newer dcdit resumed the run)
            fields = header + [k for k in row if k not in header]
            old = self._raw_rows()[1:]  # old rows keep their values in the old columns, empty in the new
            self._replace([fields, *(r + [""] * (len(fields) - len(r)) for r in old)])
            header = fields
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header or list(row), restval="")
            if header is None:
                w.writeheader()
            w.writerow(row)


def _open_tensorboard(run_dir: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _open_wandb(cfg: RunConfig, run_dir: Path, enabled: bool):
    if not enabled:
        return None
    import wandb  # optional dependency; a clear ImportError names it

    return wandb.init(project="dcdit", dir=str(run_dir), config=json.loads(json.dumps(cfg, default=vars)))


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


def train(cfg: RunConfig, run_dir: str | os.PathLike, resume: bool = False, device: str | None = None, progress: bool = True) -> dict:
    """Train ``cfg`` into ``run_dir``; ``resume=True`` continues from its latest checkpoint."""
    dist_info = D.setup(device)
    dev, rank, world = dist_info.device, dist_info.rank, dist_info.world_size
    tc = cfg.train
    run_dir = Path(run_dir)
    G = tc.global_batch_size
    micro = tc.micro_batch_size or G // world
    if micro < 1 or G % (world * micro):
        raise ValueError(
            f"train.global_batch_size ({G}) must equal world size ({world}) × micro_batch_size ({micro}) × "
            f"gradient-accumulation steps; choose micro_batch_size dividing {G // max(world, 1)}"
        )
    accum = G // (world * micro)

    torch.manual_seed(tc.seed)  # identical initialisation on every rank
    model, teacher = build_or_upcycle(cfg, fresh=not resume)
    model = model.to(dev)
    for m in model.modules():  # label dropout is drawn by the loop from the global stream (see module doc)
        if isinstance(m, LabelEmbedder):
            m.dropout_prob = 0.0
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(parameter_groups(model, tc), lr=tc.lr, weight_decay=tc.weight_decay)
    dataset = build_train_dataset(cfg)
    check_data_matches_model(dataset[0][0], model)
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=model.noise_schedule, learn_sigma=model.learn_sigma)
    is_dcdit = cfg.model.arch == "dcdit"
    label_drop_p = cfg.model.class_dropout_prob

    step, skipped_total, wall_before = 0, 0, 0.0
    if resume:
        ckpt = find_checkpoint(run_dir)
        state, saved_cfg, _ = read_weights(ckpt / "model.safetensors")
        saved, now = model_config_to_dict(saved_cfg.model), model_config_to_dict(cfg.model)
        if saved != now:
            diff = ", ".join(f"model.{k}: {saved.get(k)!r} in the run, {now.get(k)!r} now"
                             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
            raise ValueError(f"cannot resume {ckpt}: its model config differs from this run's ({diff}); "
                             f"resume with the run's own config: dcdit train {run_dir / 'config.yaml'} --out {run_dir} --resume")
        load_state_dict_checked(model, state, str(ckpt / "model.safetensors"))
        load_state_dict_checked(ema, read_weights(ckpt / "ema.safetensors")[0], str(ckpt / "ema.safetensors"))
        ts = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(ts["optimizer"])
        step, skipped_total, wall_before = ts["step"], ts.get("skipped_steps", 0), ts.get("wall_time", 0.0)
        set_rng_state(ts["rng"])
    elif (run_dir / "checkpoints" / "latest").exists():
        raise ValueError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose a new --out")
    elif tc.init_from:
        init_weights_from(model, tc.init_from)
        ema.load_state_dict(model.state_dict())
    if teacher is not None:
        teacher = teacher.to(dev) if step < tc.upcycle.distill_steps else None
    # while distilling, the decoder receives no gradient: DDP must tolerate unused parameters
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=teacher is not None) if world > 1 else model
    order = EpochOrder(len(dataset), tc.seed)
    T = diffusion.num_timesteps
    C, H, W = dataset[0][0].shape

    csv_log = tb = wb = None
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, run_dir / "config.yaml")
        csv_log = CSVLog(run_dir / "log.csv", resume_step=step if resume else None)
        tb = _open_tensorboard(run_dir, tc.tensorboard)
        wb = _open_wandb(cfg, run_dir, tc.wandb)
    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and dist_info.is_main), desc="train", dynamic_ncols=True)
    acc = _Interval(t0=time.time())
    ratios_nat, ratios_eff, fractions = [], [], []
    t_start, last = time.time(), {}
    kill_at = int(os.environ.get("DCDIT_KILL_AT_STEP", "-1"))  # test hook: die abruptly after this step

    model.train()
    while step < tc.steps:
        # --- the step's global random stream -------------------------------------------------
        g = step_generator(tc.seed, step)
        idx_all = order.indices(step * G, G)
        t_all = torch.randint(0, T, (G,), generator=g)
        noise_all = torch.randn(G, C, H, W, generator=g)
        drop_all = torch.rand(G, generator=g) < label_drop_p
        mb = tc.multi_budget
        fraction = 0.0
        if mb.fractions and step >= mb.start_step:
            fraction = float(mb.fractions[int(torch.randint(len(mb.fractions), (1,), generator=g))])

        loss_ok = torch.ones((), device=dev)
        for a in range(accum):
            lo = (rank * accum + a) * micro
            sl = slice(lo, lo + micro)
            xs, ys = [], []
            for j, i in zip(range(lo, lo + micro), idx_all[sl].tolist()):
                torch.manual_seed(tc.seed * _MIX + step * 7919 + j)  # per-sample augmentation stream
                x_j, y_j = dataset[i]
                xs.append(x_j)
                ys.append(int(y_j))
            x = torch.stack(xs).to(dev)
            # Label dropout for CFG is drawn from the step's stream; the model must not drop again.
            y, drop = torch.tensor(ys).to(dev), drop_all[sl].long().to(dev)
            kwargs = {"y": y, "force_drop_ids": drop}
            if is_dcdit:
                kwargs["tail_dropping_fraction"] = fraction
            sync = (a == accum - 1) or world == 1
            ctx = ddp.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                torch.manual_seed(tc.seed * _MIX + step * 7919 + G + rank * accum + a)  # model-internal randomness
                t, noise = t_all[sl].to(dev), noise_all[sl].to(dev)
                with autocast_for(dev, tc.mixed_precision):
                    if teacher is not None and step < tc.upcycle.distill_steps:  # upcycling warm-up (§4.4)
                        x_t = diffusion.q_sample(x, t, noise=noise)
                        d_loss, record = distillation_loss(ddp, teacher, x_t, t, y, fraction, student_blocks=model.blocks, force_drop_ids=drop)
                        terms = {"loss": d_loss[None], "mse": torch.zeros(1), "aux": record}
                    else:
                        d_loss = torch.zeros((), device=dev)
                        terms = diffusion.training_losses(ddp, x, t, model_kwargs=kwargs, noise=noise)
                diff_loss = terms["loss"].mean()
                loss = diff_loss
                r_loss = torch.zeros((), device=dev)
                record = terms.get("aux")
                if record is not None:
                    target_n = curriculum_target_ratio(step, cfg.model.target_ratio, tc.target_ratio_start, tc.target_ratio_warmup_steps)
                    r_loss = ratio_loss(record, target_n, tc.ratio_batch_size)
                    loss = loss + tc.ratio_loss_weight * r_loss
                    if record.dydit is not None:  # DyDiT: inner-block FLOPs toward the target λ
                        target = flops_target(step, tc.dydit_warmup_steps, tc.dydit_target)
                        f_loss = dydit_flops_loss(record, cfg.model, target)
                        loss = loss + tc.dydit_loss_weight * f_loss
                        acc.dydit_loss += float(f_loss.detach()) / accum
                        acc.dydit_ratio += float(dydit_flops_ratio(record, cfg.model).detach().mean()) / accum
                    ratios_nat.append(record.natural_compression_ratio.detach().cpu())
                    ratios_eff.append(record.compression_ratio.detach().cpu())
                loss_ok = loss_ok * torch.isfinite(loss.detach()).float()
                (loss / accum).backward()
            acc.loss += float(loss.detach()) / accum
            acc.diffusion += float(diff_loss.detach()) / accum
            acc.mse += float(terms["mse"].detach().mean()) / accum
            acc.vb += float(terms["vb"].detach().mean()) / accum if "vb" in terms else 0.0
            acc.ratio += float(r_loss.detach()) / accum
            acc.distill += float(d_loss.detach()) / accum

        D.all_reduce_(loss_ok, op=torch.distributed.ReduceOp.MIN if world > 1 else None)
        clip = tc.grad_clip if tc.grad_clip and tc.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if bool(loss_ok) and math.isfinite(float(grad_norm)):
            optimizer.step()
            decay = min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
            update_ema(ema, model, decay)
        else:
            acc.skipped += 1
            skipped_total += 1
            bar.write(f"step {step + 1}: non-finite loss or gradient norm ({float(grad_norm)}); step skipped")
        optimizer.zero_grad(set_to_none=True)
        acc.grad_norm += float(grad_norm) if math.isfinite(float(grad_norm)) else 0.0
        fractions.append(fraction)
        acc.steps += 1
        step += 1
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.steps or step == 1:
            last = _log(step, acc, ratios_nat, ratios_eff, fractions, skipped_total, csv_log, tb, wb, bar, dist_info, dev)
            acc, ratios_nat, ratios_eff, fractions = _Interval(t0=time.time()), [], [], []
        if step % tc.ckpt_every == 0 or step == tc.steps:
            if dist_info.is_main:
                extra = {"skipped_steps": skipped_total, "wall_time": wall_before + time.time() - t_start}
                save_checkpoint(run_dir, step, model, ema, optimizer, cfg, extra, keep_last=tc.keep_last)
            D.barrier()
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    bar.close()
    summary = {"step": step, "skipped_steps": skipped_total, "wall_time_s": wall_before + time.time() - t_start,
               "rank_param_max_abs_diff": rank_divergence(model), **last}
    if dist_info.is_main:
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if tb is not None:
            tb.close()
        if wb is not None:
            wb.finish()
    D.barrier()  # every rank done before the group goes away (a rank tearing down early can abort gloo)
    D.teardown()
    return summary


def _log(step, acc: _Interval, ratios_nat, ratios_eff, fractions, skipped_total, csv_log, tb, wb, bar, dist_info, dev) -> dict:
    n = max(acc.steps, 1)
    means = torch.tensor([acc.loss, acc.diffusion, acc.mse, acc.vb, acc.ratio, acc.grad_norm, acc.distill,
                          acc.dydit_loss, acc.dydit_ratio], device=dev) / n
    D.all_reduce_(means)
    means /= dist_info.world_size
    row = {
        "step": step,
        "loss": float(means[0]), "diffusion_loss": float(means[1]), "mse": float(means[2]), "vb": float(means[3]),
        "ratio_loss": float(means[4]), "grad_norm": float(means[5]), "distill_loss": float(means[6]),
        "dydit_flops_loss": float(means[7]), "dydit_flops_ratio": float(means[8]),
        "steps_per_s": acc.steps / max(time.time() - acc.t0, 1e-9),
        "skipped_steps": skipped_total,
        "tail_fraction": sum(fractions) / max(len(fractions), 1),
    }
    if ratios_nat:
        nat = D.all_gather_cat(torch.cat(ratios_nat).to(dev)).float()
        eff = D.all_gather_cat(torch.cat(ratios_eff).to(dev)).float()
        row.update({
            "compression_mean": float(nat.mean()), "compression_std": float(nat.std()) if nat.numel() > 1 else 0.0,
            "compression_min": float(nat.min()), "compression_max": float(nat.max()),
            "effective_compression_mean": float(eff.mean()),
        })
    if dist_info.is_main:
        csv_log.write(row)
        if tb is not None:
            for k, v in row.items():
                if k != "step":
                    tb.add_scalar(f"train/{k}", v, step)
        if wb is not None:
            wb.log(row, step=step)
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        bar.write(msg)
    return row
