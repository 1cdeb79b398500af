"""Gaussian diffusion for DC-DiT, with the interface of the DiT release.

Typical use (as in DiT, Peebles & Xie 2023)::

    from dcdit.diffusion import create_diffusion

    train_diffusion = create_diffusion(timestep_respacing="")  # all 1000 steps
    t = torch.randint(0, train_diffusion.num_timesteps, (x.shape[0],), device=x.device)
    loss = train_diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean()

    sample_diffusion = create_diffusion("250")
    z = sample_diffusion.p_sample_loop(model, (n, 4, 32, 32), model_kwargs={"y": y})
"""

from __future__ import annotations

from typing import Optional

from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    mean_flat,
    unpack_model_output,
)
from .likelihoods import discretized_gaussian_log_likelihood, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .schedules import get_named_beta_schedule

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "unpack_model_output",
    "mean_flat",
]


def create_diffusion(
    timestep_respacing: Optional[str],
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Build the diffusion used by DiT (defaults: linear schedule, T = 1000, eps prediction,
    learned-range variance, loss = MSE + unscaled VLB term).

    Args:
        timestep_respacing: ``None`` / ``""`` for all steps, ``"250"``, ``"10,15,20"`` or
            ``"ddim50"`` (see :func:`space_timesteps`); a list of section counts also works.
        noise_schedule: ``"linear"`` or ``"squaredcos_cap_v2"``.
        use_kl: train on the rescaled VLB only (``LossType.RESCALED_KL``).
        sigma_small: with ``learn_sigma=False``, use ``beta~_t`` (else ``beta_t``).
        predict_xstart: the network predicts ``x_0`` instead of ``eps``.
        learn_sigma: the network outputs 2C channels, the second C being the
            learned-range interpolation values.
        rescale_learned_sigmas: ``LossType.RESCALED_MSE`` (VLB term times ``T / 1000``).
        diffusion_steps: ``T`` of the base process.

    Returns:
        a :class:`SpacedDiffusion` (identity spacing when no respacing is asked for).
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )
