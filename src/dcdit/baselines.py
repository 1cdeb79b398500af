"""The DiT baselines the paper compares DC-DiT with (arXiv 2603.06351 §4.1).

* isoparam: a fixed-patch DiT with the DC-DiT's width, heads and input, patch P = √N (N = 4 → DiT/2,
  N = 16 → DiT/4), and the depth whose parameter count is closest to the DC-DiT's;
* isoflop: the same DiT with extra blocks — the smallest depth whose MACs per forward pass reach the
  DC-DiT's *measured* average (tokens actually kept along sampling runs of a checkpoint), or its
  nominal budget L/N when no checkpoint is given.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from .config import DCDiTConfig, DiTConfig, ModelConfigBase, RunConfig, build_model, count_parameters, save_run_config
from .flops import dit_depth_for_flops, dit_macs, model_macs, sampling_flops


def _dit_like(dc: DCDiTConfig, depth: int) -> DiTConfig:
    """A DiT with every field the two configs share taken from ``dc``, patch √N and ``depth`` blocks."""
    patch = round(math.sqrt(dc.target_ratio))
    if patch * patch != round(dc.target_ratio):
        raise ValueError(f"target_ratio {dc.target_ratio} is not a square: no fixed patch size matches it")
    shared = {f.name: getattr(dc, f.name) for f in dataclasses.fields(ModelConfigBase) if f.name != "arch"}
    return DiTConfig(**{**shared, "depth": depth, "patch_size": patch})


def params_of(cfg) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(cfg))


def isoparam_dit(dc: DCDiTConfig) -> DiTConfig:
    """The depth whose parameter count is closest to the DC-DiT's (params are linear in depth)."""
    target = params_of(dc)
    p1, p2 = params_of(_dit_like(dc, 1)), params_of(_dit_like(dc, 2))
    per_block, base = p2 - p1, 2 * p1 - p2
    depth = max(1, round((target - base) / per_block))
    return _dit_like(dc, depth)


def isoflop_dit(dc: DCDiTConfig, target_macs: float) -> DiTConfig:
    return _dit_like(dc, dit_depth_for_flops(_dit_like(dc, 1), target_macs))


@torch.no_grad()
def measured_macs(model, dc: DCDiTConfig, num_samples: int = 8, sampling_steps: int = 50, cfg_scale: float = 1.0, seed: int = 0) -> float:
    """Mean MACs per forward pass over a sampling run (DDIM) of the checkpoint: its real token budget."""
    from .sampling import generate

    labels = torch.arange(num_samples) % dc.num_classes
    result = generate(model, labels, sampler="ddim", num_sampling_steps=sampling_steps, cfg_scale=cfg_scale,
                      seed=seed, num_snapshots=0)
    return sampling_flops(dc, result.trace)["mean_macs_per_forward"]


def build_baselines(run_cfg: RunConfig, model=None, **measure_kwargs) -> dict:
    """{'dcdit': ..., 'isoparam': ..., 'isoflop': ...} each with config, params and MACs per forward."""
    dc = run_cfg.model
    if dc.arch != "dcdit":
        raise ValueError(f"baselines are derived from a DC-DiT config, got arch {dc.arch!r}")
    macs = measured_macs(model, dc, **measure_kwargs) if model is not None else model_macs(dc).total
    iso_p, iso_f = isoparam_dit(dc), isoflop_dit(dc, macs)
    return {
        "dcdit": {"config": dc, "params": params_of(dc), "macs": macs, "macs_source": "measured" if model is not None else "nominal L/N"},
        "isoparam": {"config": iso_p, "params": params_of(iso_p), "macs": dit_macs(iso_p).total},
        "isoflop": {"config": iso_f, "params": params_of(iso_f), "macs": dit_macs(iso_f).total},
    }


def write_baseline_configs(run_cfg: RunConfig, baselines: dict, out_dir: str | Path) -> dict[str, Path]:
    """Save ``isoparam.yaml`` and ``isoflop.yaml``: the DC-DiT run config with the model replaced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("isoparam", "isoflop"):
        cfg = dataclasses.replace(run_cfg, model=baselines[name]["config"])
        paths[name] = out / f"{name}.yaml"
        save_run_config(cfg, paths[name])
    return paths
