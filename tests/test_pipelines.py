"""dcdit.pipelines: sampling, sharded sampling and the demo as library functions.

Independent references: ``generate`` called directly with the settings a pipeline claims it used,
``load_model`` for the weights it claims it loaded, and one process for the sharded run's images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dcdit.checkpoint import load_model
from dcdit.config import DataConfig, RunConfig, SampleConfig, load_run_config
from dcdit.pipelines import DEMO_CHECKPOINT, image_decoder, sample_sharded, sample_to_folder, sampling_options
from dcdit.sampling import generate, to_uint8_images
from dcdit.train import train
from dcdit.viz import make_grid

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
        "train.global_batch_size=4", "train.ratio_batch_size=4", "train.log_every=1", "train.ckpt_every=1",
        "train.tensorboard=false", "train.steps=1", "train.lr=1e-2"]


def test_sampling_options_replace_only_what_is_given():
    base = SampleConfig(sampler="ddim", cfg_scale=2.0, seed=4)
    got = sampling_options(base, cfg_scale=None, num_sampling_steps=7, use_ema=False)
    assert got == SampleConfig(sampler="ddim", cfg_scale=2.0, seed=4, num_sampling_steps=7, use_ema=False)
    with pytest.raises(ValueError, match="steps.*valid:.*num_sampling_steps"):
        sampling_options(base, steps=7)


def test_the_demo_checkpoint_samples_with_its_measured_settings(tmp_path):
    """The shipped file stores configs/mnist.yaml's sample section (DDPM, CFG 4; docs/demo-checkpoint.md);
    a flag (steps) overrides one field. The written grid equals generate() with exactly those settings."""
    model, cfg, _ = load_model(DEMO_CHECKPOINT)
    want = load_run_config("mnist").sample
    assert cfg.sample == want and (want.sampler, want.cfg_scale) == ("ddpm", 4.0)  # what the file holds
    settings = sample_to_folder(DEMO_CHECKPOINT, tmp_path, classes=[1, 7], per_class=1, progress=False, num_sampling_steps=2)
    assert (settings["sampler"], settings["cfg_scale"], settings["num_sampling_steps"]) == ("ddpm", 4.0, 2)
    ref = generate(model, [1, 7], sampler="ddpm", num_sampling_steps=2, cfg_scale=4.0, clip_denoised=True, seed=0).samples
    grid = np.asarray(Image.open(tmp_path / "samples.png").convert("RGB"))
    assert np.array_equal(grid, make_grid(to_uint8_images(ref), nrow=10))
    assert json.loads((tmp_path / "settings.json").read_text())["labels"] == [1, 7]


def test_use_ema_comes_from_the_config_or_the_override(tmp_path):
    """A run trained with sample.use_ema=false samples its raw weights unless told otherwise; the
    samples are generate() on load_model(use_ema=...) of the same folder."""
    run = tmp_path / "run"
    train(load_run_config("mnist", TINY + ["sample.use_ema=false", "sample.num_sampling_steps=2", "sample.cfg_scale=1.0"]),
          run, progress=False)
    kw = dict(classes=[3], per_class=1, progress=False)
    raw = sample_to_folder(run, tmp_path / "raw", **kw)
    ema = sample_to_folder(run, tmp_path / "ema", use_ema=True, **kw)
    assert (raw["weights"], ema["weights"]) == ("raw", "ema")
    for name, use_ema in (("raw", False), ("ema", True)):
        model = load_model(run, use_ema=use_ema)[0]
        ref = generate(model, [3], num_sampling_steps=2, cfg_scale=1.0, clip_denoised=True).samples
        grid = np.asarray(Image.open(tmp_path / name / "samples.png").convert("RGB"))
        assert np.array_equal(grid, make_grid(to_uint8_images(ref), nrow=10)), name
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "raw" / "samples.png")),
                              np.asarray(Image.open(tmp_path / "ema" / "samples.png")))


def test_image_decoder_for_pixels_and_refusals_for_latents():
    x = torch.randn(2, 1, 4, 4)
    assert image_decoder(RunConfig(data=DataConfig(name="mnist")))(x) is x
    with pytest.raises(ValueError, match="--vae"):
        image_decoder(RunConfig(data=DataConfig(name="latents")))
    with pytest.raises(ValueError, match="differs"):
        image_decoder(RunConfig(data=DataConfig(name="latents", vae="a/vae")), vae="b/vae")


def test_sharded_sampling_on_two_processes_equals_one_process(tmp_path):
    """Every batch is seeded by its first image's index, so 2 gloo ranks (batches 0, 2 and 1 of
    size 2 over 5 images) must write the same .npz as one process; rank 0 assembles rank 1's images
    from its .npy part, which is removed afterwards."""
    common = dict(num_samples=5, batch_size=2, progress=False, sampler="ddim", num_sampling_steps=2, cfg_scale=1.0)
    single = sample_sharded(DEMO_CHECKPOINT, tmp_path / "one", **common)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dcdit.cli",
           "sample-ddp", "--ckpt", str(DEMO_CHECKPOINT), "--out", str(tmp_path / "two"), "--num-samples", "5",
           "--batch-size", "2", "--sampler", "ddim", "--steps", "2", "--cfg-scale", "1", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert single["labels"] == one["arr_1"].tolist()
    assert json.loads((tmp_path / "two" / "settings.json").read_text())["world_size"] == 2
    assert not (tmp_path / "two" / ".parts").exists()
    png = np.asarray(Image.open(tmp_path / "two" / "images" / "000002.png").convert("RGB"))  # written by rank 1
    assert np.array_equal(png, two["arr_0"][2])
