"""The shipped MNIST demo checkpoint draws the digit it is asked for (docs/demo-checkpoint.md).

Checked against things that do not come from the model: held-out MNIST digits (its x̂0 estimate with
the right label beats a wrong label and the mean training image) and the separately trained MNIST
classifier (it recognises the asked digit in the demo's own samples; ~1 min on one thread).
"""

from __future__ import annotations

import pytest
import torch

from dcdit.checkpoint import load_model
from dcdit.cli import DEMO_CHECKPOINT
from dcdit.config import load_run_config
from dcdit.data.mnist import load_mnist_tensors
from dcdit.evaluation.denoiser import denoiser_error_by_timestep
from dcdit.evaluation.mnist_classifier import BACKGROUND_WARN_LEVEL, background_level, classify
from dcdit.sampling import generate


@pytest.fixture(scope="module")
def demo_model():
    model, cfg, step = load_model(DEMO_CHECKPOINT)
    return model.eval(), cfg, step


def test_demo_config_is_the_mnist_config(demo_model):
    _, cfg, step = demo_model
    mnist = load_run_config("mnist", [])
    assert cfg.model.noise_schedule == mnist.model.noise_schedule == "cosine"
    assert cfg.model.label_embed_std == mnist.model.label_embed_std
    assert step == mnist.train.steps


def test_demo_model_uses_the_label_at_high_noise(demo_model):
    """Where a sampler decides which digit to draw (t = 700-900 of 1000) the right label must give a
    clearly better clean-image estimate than a wrong one, and a better one than the mean training
    image. Right / wrong / mean image on these 100 digits (`scripts/denoiser_by_timestep.py --num-images
    100 --timesteps 700 900`): this checkpoint 0.059 / 0.087 / 0.224 at t = 700 and 0.165 / 0.225 / 0.224
    at t = 900; the linear-schedule one that shipped before fails both checks (0.254 / 0.263, 0.732 / 0.800)."""
    model, _, _ = demo_model
    x_train, _ = load_mnist_tensors("train")
    x, y = load_mnist_tensors("test")
    x, y = x[:100], y[:100]
    mean_image_mse = ((x_train.mean(0) - x) ** 2).mean().item()
    for r in denoiser_error_by_timestep(model, x, y, [700, 900], seed=0):
        assert r.x0_mse_right < 0.85 * r.x0_mse_wrong, r
        assert r.x0_mse_right < 0.9 * mean_image_mse, (r, mean_image_mse)


def test_demo_samples_are_the_asked_digits(demo_model):
    """The demo's own sampler settings, two samples per digit: the MNIST classifier reads the asked
    digit in most of them, on a black background."""
    model, _, _ = demo_model
    demo = load_run_config("mnist", []).sample  # what `dcdit demo` samples with
    labels = torch.arange(10).repeat_interleave(2)
    result = generate(model, labels, sampler=demo.sampler, num_sampling_steps=demo.num_sampling_steps,
                      cfg_scale=demo.cfg_scale, seed=1, clip_denoised=True)
    predicted = classify(result.samples)
    assert (predicted == labels.numpy()).mean() >= 0.8, predicted
    assert background_level(result.samples) < BACKGROUND_WARN_LEVEL
