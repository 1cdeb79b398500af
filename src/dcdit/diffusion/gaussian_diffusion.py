"""Gaussian diffusion: forward process, training losses and DDPM / DDIM samplers.

This reproduces the diffusion used to train and sample DiT (Peebles & Xie 2023), which
follows improved DDPM (Nichol & Dhariwal 2021):

* forward process ``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` (Ho et al. 2020);
* the network predicts ``eps`` (or ``x_0``) and, optionally, an interpolation value
  ``v in [-1, 1]`` per element for the reverse variance ("learned range"):
  ``log sigma_t^2 = frac * log beta_t + (1 - frac) * log beta~_t``, ``frac = (v + 1) / 2``;
* hybrid loss ``L_simple + L_vlb``: the MSE on ``eps`` plus the VLB term in bits/dim, in
  which the predicted mean is detached so the VLB only trains the variance;
* ancestral DDPM sampling and DDIM sampling (Song et al. 2021, Eq. 12).

Timesteps are 0-based: ``t = 0`` is the first noising step, ``t = T - 1`` the last.
Schedule coefficients are kept in float64 numpy arrays and cast to the working dtype
(at least float32) when gathered.

Model-output protocol
---------------------
``model(x_t, t, **model_kwargs)`` may return a tensor or a tuple ``(tensor, aux)`` (the
DC-DiT model returns routing information as ``aux``). Every model call goes through
:func:`unpack_model_output`; ``aux`` is passed through under the key ``"aux"`` of the
returned / yielded dicts when present.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from .likelihoods import discretized_gaussian_log_likelihood, normal_kl

__all__ = [
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "GaussianDiffusion",
    "unpack_model_output",
    "mean_flat",
]

_LN2 = float(np.log(2.0))


class ModelMeanType(enum.Enum):
    """What the network's (first C) output channels predict."""

    EPSILON = enum.auto()  # the noise eps (DiT default)
    START_X = enum.auto()  # the clean sample x_0


class ModelVarType(enum.Enum):
    """How the reverse-process variance is obtained."""

    LEARNED = enum.auto()  # extra C channels are log sigma^2 directly
    LEARNED_RANGE = enum.auto()  # extra C channels v in [-1, 1] interpolate log beta~ .. log beta
    FIXED_SMALL = enum.auto()  # sigma^2 = beta~_t (posterior variance)
    FIXED_LARGE = enum.auto()  # sigma^2 = beta_t (beta~_1 at t = 0)


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE (+ unscaled VLB when the variance is learned): DiT default
    RESCALED_MSE = enum.auto()  # MSE + VLB * T / 1000
    KL = enum.auto()  # the VLB term only
    RESCALED_KL = enum.auto()  # VLB term * T (an estimate of the full bound)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def unpack_model_output(output: Any) -> tuple[torch.Tensor, Any]:
    """Split a model's return value into ``(prediction, aux)``.

    A model may return a tensor (``aux`` is then ``None``) or a tuple/list whose first
    element is the prediction tensor; the second element is ``aux`` (if there are more
    than two elements, ``aux`` is the tuple of all the rest).
    """
    if isinstance(output, (tuple, list)):
        if len(output) == 0:
            raise ValueError("model returned an empty tuple")
        pred = output[0]
        rest = tuple(output[1:])
        aux = None if not rest else (rest[0] if len(rest) == 1 else rest)
        return pred, aux
    return output, None


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: ``(B, ...) -> (B,)``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def _extract(arr: np.ndarray, t: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """Gather ``arr[t]`` and broadcast it to ``shape``.

    Args:
        arr: ``(T,)`` float64 numpy array of per-timestep coefficients.
        t: ``(B,)`` integer timestep indices.
        shape: target shape ``(B, ...)``.
        dtype: dtype of the tensor the result multiplies; the result is at least float32.

    Returns:
        ``shape``-shaped tensor (an expanded view) on ``t.device``.
    """
    out_dtype = torch.promote_types(dtype, torch.float32)
    vals = torch.from_numpy(arr).to(device=t.device, dtype=out_dtype)[t.long()]
    return vals.view(-1, *([1] * (len(shape) - 1))).expand(*shape)


class GaussianDiffusion:
    """Training and sampling utilities for a discrete-time Gaussian diffusion.

    Args:
        betas: ``(T,)`` beta schedule (converted to float64).
        model_mean_type: :class:`ModelMeanType`.
        model_var_type: :class:`ModelVarType`.
        loss_type: :class:`LossType`.

    Attributes (float64 numpy arrays of shape ``(T,)``): ``betas``, ``alphas_cumprod``,
    ``alphas_cumprod_prev``, ``alphas_cumprod_next``, ``posterior_variance``,
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1``, ``posterior_mean_coef2``
    and the square-root / log helpers below.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)   (Ho et al. 2020, Eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so its log is replaced by log beta~_1 (improved DDPM). With a single
        # step there is no beta~_1 and beta_0 is used instead.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # "fixed large": beta_t, but beta~_1 at t = 0 for a better decoder likelihood.
        self._fixed_large_variance = np.append(first, betas[1:])
        self._log_betas = np.log(betas)

    # ------------------------------------------------------------------ model calls

    def _model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps handed to the model for process indices ``t`` (identity here;
        :class:`~dcdit.diffusion.respace.SpacedDiffusion` maps to the original indices)."""
        return t

    def _run_model(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs=None):
        """Call ``model(x, t_model, **model_kwargs)`` and return ``(prediction, aux)``."""
        out = model(x, self._model_timesteps(t), **(model_kwargs or {}))
        return unpack_model_output(out)

    # ------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Moments of ``q(x_t | x_0)``.

        Args:
            x_start: ``(B, C, ...)`` clean data.
            t: ``(B,)`` timestep indices (0 means one noising step).

        Returns:
            ``(mean, variance, log_variance)``, each of ``x_start``'s shape.
        """
        shape, dt = x_start.shape, x_start.dtype
        mean = _extract(self.sqrt_alphas_cumprod, t, shape, dt) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, shape, dt)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, shape, dt)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """Draw ``x_t ~ q(x_t | x_0)``: ``sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``.

        Args:
            x_start: ``(B, C, ...)``; t: ``(B,)``; noise: optional, shape of ``x_start``.

        Returns:
            ``(B, C, ...)`` noised data.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        shape, dt = x_start.shape, x_start.dtype
        return (
            _extract(self.sqrt_alphas_cumprod, t, shape, dt) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, shape, dt) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Moments of the forward posterior ``q(x_{t-1} | x_t, x_0)`` (Ho et al. 2020, Eq. 7).

        Returns:
            ``(mean, variance, log_variance_clipped)``, each of ``x_t``'s shape.
        """
        if x_start.shape != x_t.shape:
            raise ValueError("x_start and x_t must have the same shape")
        shape, dt = x_t.shape, x_t.dtype
        mean = (
            _extract(self.posterior_mean_coef1, t, shape, dt) * x_start
            + _extract(self.posterior_mean_coef2, t, shape, dt) * x_t
        )
        variance = _extract(self.posterior_variance, t, shape, dt)
        log_variance = _extract(self.posterior_log_variance_clipped, t, shape, dt)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
        """``x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``."""
        shape, dt = x_t.shape, x_t.dtype
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, shape, dt) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, shape, dt) * eps
        )

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor):
        """Inverse of :meth:`_predict_xstart_from_eps`."""
        shape, dt = x_t.shape, x_t.dtype
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, shape, dt) * x_t - pred_xstart
        ) / _extract(self.sqrt_recipm1_alphas_cumprod, t, shape, dt)

    # ------------------------------------------------------------ reverse process

    def _p_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
    ) -> dict:
        """Turn a raw network output into the moments of ``p(x_{t-1} | x_t)``.

        Args:
            model_output: ``(B, C, ...)``, or ``(B, 2C, ...)`` for learned variances.
            x: ``(B, C, ...)`` current sample ``x_t``.
            t: ``(B,)`` process timestep indices.

        Returns:
            dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` (all ``x``'s
            shape) and ``model_output`` (the C prediction channels).
        """
        B, C = x.shape[:2]
        shape, dt = x.shape, x.dtype
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, 2 * C, *x.shape[2:]):
                raise ValueError(
                    f"learned variance needs a (B, 2C, ...) = {(B, 2 * C, *x.shape[2:])} model output, "
                    f"got {tuple(model_output.shape)}"
                )
            model_output, var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = _extract(self.posterior_log_variance_clipped, t, shape, dt)
                max_log = _extract(self._log_betas, t, shape, dt)
                frac = (var_values + 1) / 2  # v = -1 -> beta~_t, v = +1 -> beta_t
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if model_output.shape != x.shape:
                raise ValueError(f"model output {tuple(model_output.shape)} != x shape {tuple(x.shape)}")
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var_arr, log_var_arr = self._fixed_large_variance, np.log(self._fixed_large_variance)
            else:
                var_arr, log_var_arr = self.posterior_variance, self.posterior_log_variance_clipped
            variance = _extract(var_arr, t, shape, dt)
            log_variance = _extract(log_var_arr, t, shape, dt)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)

        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "model_output": model_output,
        }

    def p_mean_variance(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
    ) -> dict:
        """Apply the model and return the moments of ``p(x_{t-1} | x_t)``.

        Args:
            model: ``model(x, t, **model_kwargs)`` -> tensor or ``(tensor, aux)``.
            x: ``(B, C, ...)`` samples at step ``t``.
            t: ``(B,)`` integer process timestep indices.
            clip_denoised: clamp the ``x_0`` prediction to ``[-1, 1]``.
            denoised_fn: optional function applied to the ``x_0`` prediction (before clipping).
            model_kwargs: extra keyword arguments for the model (e.g. class labels ``y``).

        Returns:
            dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` (each of
            ``x``'s shape), plus ``aux`` when the model returned one.
        """
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        output, aux = self._run_model(model, x, t, model_kwargs)
        out = self._p_from_output(output, x, t, clip_denoised, denoised_fn)
        del out["model_output"]
        if aux is not None:
            out["aux"] = aux
        return out

    def condition_mean(self, cond_fn: Callable, p_mean_var: dict, x, t, model_kwargs=None):
        """Classifier guidance on the mean (Sohl-Dickstein et al. 2015; Dhariwal & Nichol 2021):
        ``mean + variance * grad log p(y | x_t)`` with the gradient from ``cond_fn(x, t, **kw)``."""
        grad = cond_fn(x, self._model_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * grad.float()

    def condition_score(self, cond_fn: Callable, p_mean_var: dict, x, t, model_kwargs=None) -> dict:
        """Classifier guidance on the score (Song et al. 2021): ``eps -= sqrt(1 - abar) grad``."""
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape, x.dtype)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._model_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    @staticmethod
    def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, ...)`` mask that is 0 where ``t == 0`` (no noise on the last step)."""
        return (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def p_sample(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        cond_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict:
        """One ancestral DDPM step ``x_t -> x_{t-1}`` (Ho et al. 2020, Alg. 2).

        Args:
            x: ``(B, C, ...)``; t: ``(B,)`` process indices; noise: optional fixed standard
                normal noise of ``x``'s shape (drawn with ``randn_like`` otherwise).

        Returns:
            dict with ``sample`` and ``pred_xstart`` (``x``'s shape), plus ``aux`` if any.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + self._nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        result = {"sample": sample, "pred_xstart": out["pred_xstart"]}
        if "aux" in out:
            result["aux"] = out["aux"]
        return result

    def ddim_sample(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        cond_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
        noise: Optional[torch.Tensor] = None,
    ) -> dict:
        """One DDIM step ``x_t -> x_{t-1}`` (Song et al. 2021, Eq. 12).

        ``eps`` is re-derived from the (possibly clipped) ``x_0`` prediction, and
        ``sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev)``.

        Returns:
            dict with ``sample`` and ``pred_xstart`` (``x``'s shape), plus ``aux`` if any.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape, x.dtype)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape, x.dtype)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        mean_pred = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        )
        if noise is None:
            noise = torch.randn_like(x)
        sample = mean_pred + self._nonzero_mask(t, x) * sigma * noise
        result = {"sample": sample, "pred_xstart": out["pred_xstart"]}
        if "aux" in out:
            result["aux"] = out["aux"]
        return result

    def ddim_reverse_sample(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        cond_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        eta: float = 0.0,
    ) -> dict:
        """Deterministic DDIM inversion step ``x_t -> x_{t+1}`` (``eta`` must be 0)."""
        if eta != 0.0:
            raise ValueError("the reverse DDIM ODE is deterministic: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract(self.alphas_cumprod_next, t, x.shape, x.dtype)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        result = {"sample": sample, "pred_xstart": out["pred_xstart"]}
        if "aux" in out:
            result["aux"] = out["aux"]
        return result

    # ---------------------------------------------------------------- sample loops

    @staticmethod
    def _resolve_device(model, device, noise):
        if device is not None:
            return torch.device(device)
        if noise is not None:
            return noise.device
        params = getattr(model, "parameters", None)
        if callable(params):
            first = next(iter(params()), None)
            if first is not None:
                return first.device
        return torch.device("cpu")

    def _sample_loop_progressive(
        self, step_fn, model, shape, noise, device, progress, **step_kwargs
    ) -> Iterator[dict]:
        if not isinstance(shape, (tuple, list)):
            raise TypeError("shape must be a tuple or list, e.g. (N, C, H, W)")
        device = self._resolve_device(model, device, noise)
        img = noise.to(device) if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():
                out = step_fn(model, img, t, **step_kwargs)
            out["t"] = t
            out["model_t"] = self._model_timesteps(t)
            yield out
            img = out["sample"]

    def p_sample_loop_progressive(
        self,
        model: Callable,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        cond_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
    ) -> Iterator[dict]:
        """Ancestral sampling from ``x_{T-1} ~ N(0, I)`` (or ``noise``), yielding per step.

        Yields:
            dicts with ``sample`` (``x_{t-1}``, of ``shape``), ``pred_xstart``, ``t`` (``(N,)``
            process indices of the step just taken), ``model_t`` (timesteps the model saw)
            and ``aux`` when the model returns one. Computed under ``torch.no_grad()``.
        """
        yield from self._sample_loop_progressive(
            self.p_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs,
        )

    def p_sample_loop(
        self,
        model: Callable,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        cond_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Generate samples of ``shape`` (e.g. ``(N, C, H, W)``) with ancestral DDPM sampling."""
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Callable,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        cond_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> Iterator[dict]:
        """DDIM sampling, yielding per step; same dict keys as :meth:`p_sample_loop_progressive`."""
        yield from self._sample_loop_progressive(
            self.ddim_sample, model, shape, noise, device, progress,
            clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, eta=eta,
        )

    def ddim_sample_loop(
        self,
        model: Callable,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[Callable] = None,
        cond_fn: Optional[Callable] = None,
        model_kwargs: Optional[dict] = None,
        device=None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """Generate samples of ``shape`` with DDIM (``eta = 0``: deterministic)."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
        ):
            pass
        return final["sample"]

    # ------------------------------------------------------------- losses / VLB

    def _vb_from_p(self, p: dict, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """VLB term in bits/dim for given reverse moments ``p``: ``(B,)``.

        ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the
        discretised decoder NLL ``-log p(x_0 | x_1)`` at ``t = 0`` (Ho et al. 2020, Eq. 5).
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / _LN2
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=p["mean"], log_scales=0.5 * p["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2
        return torch.where(t == 0, decoder_nll, kl)

    def _vb_terms_bpd(
        self,
        model: Callable,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
    ) -> dict:
        """One VLB term in bits per dimension.

        Returns:
            dict with ``output`` (``(B,)`` KLs, or decoder NLLs where ``t == 0``),
            ``pred_xstart`` and ``aux`` when present.
        """
        p = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        out = {"output": self._vb_from_p(p, x_start, x_t, t), "pred_xstart": p["pred_xstart"]}
        if "aux" in p:
            out["aux"] = p["aux"]
        return out

    def training_losses(
        self,
        model: Callable,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> dict:
        """Per-sample training losses at timesteps ``t``.

        With ``LossType.MSE`` (DiT): ``loss = mse + vb`` where ``mse`` is the mean squared
        error of the ``eps`` (or ``x_0``) prediction and ``vb`` (present only for learned
        variances) is the VLB term in bits/dim computed with the predicted mean detached,
        so it only trains the variance channels (Nichol & Dhariwal 2021, Sec. 3.1).
        ``RESCALED_MSE`` multiplies ``vb`` by ``T / 1000``; ``KL`` / ``RESCALED_KL`` use the VLB
        term alone (times ``T`` for the rescaled variant).

        Args:
            x_start: ``(B, C, ...)`` clean data; t: ``(B,)`` process timestep indices;
            noise: optional ``(B, C, ...)`` noise used for ``q_sample``.

        Returns:
            dict of ``(B,)`` tensors: ``loss``, and ``mse`` / ``vb`` as applicable; plus
            ``aux`` when the model returns one.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict = {}

        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs)
            terms["loss"] = vb["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            aux = vb.get("aux")
        else:
            output, aux = self._run_model(model, x_t, t, model_kwargs)
            C = x_t.shape[1]
            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                if output.shape != (x_t.shape[0], 2 * C, *x_t.shape[2:]):
                    raise ValueError(f"learned variance needs a (B, 2C, ...) output, got {tuple(output.shape)}")
                pred, var_values = torch.split(output, C, dim=1)
                frozen = torch.cat([pred.detach(), var_values], dim=1)
                p = self._p_from_output(frozen, x_t, t, clip_denoised=False)
                terms["vb"] = self._vb_from_p(p, x_start, x_t, t)
                if self.loss_type == LossType.RESCALED_MSE:
                    terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            else:
                pred = output
            target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
            if pred.shape != target.shape:
                raise ValueError(f"prediction {tuple(pred.shape)} != target {tuple(target.shape)}")
            terms["mse"] = mean_flat((target - pred) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]

        if aux is not None:
            terms["aux"] = aux
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """Prior term ``KL(q(x_{T-1} | x_0) || N(0, I))`` in bits/dim: ``(B,)``."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_var = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / _LN2

    def calc_bpd_loop(
        self,
        model: Callable,
        x_start: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: Optional[dict] = None,
    ) -> dict:
        """Full VLB in bits/dim (one noise draw per timestep).

        Returns:
            dict with ``total_bpd`` / ``prior_bpd`` (``(B,)``) and ``vb``, ``xstart_mse``,
            ``mse`` (``(B, T)``, column ``j`` is timestep ``T - 1 - j``).
        """
        B = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((B,), i, device=x_start.device, dtype=torch.long)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb, dim=1)
        prior = self._prior_bpd(x_start)
        return {
            "total_bpd": vb_t.sum(dim=1) + prior,
            "prior_bpd": prior,
            "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse, dim=1),
            "mse": torch.stack(mse, dim=1),
        }
