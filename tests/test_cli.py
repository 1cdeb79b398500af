"""The `dcdit` command end to end on CPU with tiny configs: presets, train → resume → sample,
sample-ddp, extract-features → train on latents → sample through the VAE, the demo, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dcdit.cli import DEMO_CHECKPOINT, main
from dcdit.config import load_run_config

TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.encoder_width=16",
        "train.global_batch_size=4", "train.ratio_batch_size=4", "train.log_every=1", "train.ckpt_every=2",
        "train.tensorboard=false"]


def test_presets_table(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("DiT-S/2", "DiT-XL/8", "DC-DiT-B/N4", "DC-DiT-XL/N16"):
        assert name in out
    row = next(line for line in out.splitlines() if line.startswith("DC-DiT-B/N4 "))
    params, paper = float(row.split()[-3]), float(row.split()[-2])
    assert abs(params - paper) / paper < 0.02
    row = next(line for line in out.splitlines() if line.startswith("DiT-XL/2 "))
    assert float(row.split()[-3]) == pytest.approx(675.1, abs=0.05)


def test_flops_command(capsys):
    assert main(["flops", "DiT-XL-2"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total"))
    assert float(total.split()[1]) == pytest.approx(118.6, rel=0.01)  # DiT paper, Table 4
    assert main(["flops", "DC-DiT-B-N4", "--kept-tokens", "128"]) == 0
    assert "M = 128" in capsys.readouterr().out


def test_train_resume_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "mnist", *TINY, "train.steps=2", "--out", str(run), "--no-progress"]) == 0
    assert main(["train", "mnist", *TINY, "train.steps=4", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000004"
    rows = (run / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # the resumed run appended steps 3, 4

    out = tmp_path / "samples"
    args = ["sample", "--ckpt", str(run), "--out", str(out), "--steps", "4", "--per-class", "1",
            "--classes", "3", "7", "--cfg-scale", "2.0", "--seed", "5", "--no-progress"]
    assert main(args) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["labels"] == [3, 7] and settings["ckpt_step"] == 4 and settings["weights"] == "ema"
    assert settings["sampler"] == "ddpm" and settings["num_sampling_steps"] == 4 and settings["cfg_scale"] == 2.0
    assert settings["model"]["arch"] == "dcdit"
    assert settings["flops"]["forward_passes_per_image"] == 8  # 4 steps × 2 (CFG)
    assert settings["flops"]["tflops_per_image"] == pytest.approx(2 * settings["flops"]["macs_per_image"] / 1e12)
    grid = Image.open(out / "samples.png")
    assert grid.size[0] >= 2 * 32 and grid.size[1] >= 32
    for f in ("chunking_viz.png", "compression_vs_timestep.png"):
        assert Image.open(out / f).size[0] > 100
    # same seed, same images: the run is reproducible from its settings
    out2 = tmp_path / "samples2"
    assert main([*args[:4], str(out2), *args[5:]]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "samples.png")), np.asarray(Image.open(out2 / "samples.png")))


def test_sample_ddp_writes_pngs_and_adm_npz(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "mnist", *TINY, "train.steps=2", "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "fid"
    assert main(["sample-ddp", "--ckpt", str(run), "--out", str(out), "--num-samples", "5", "--batch-size", "2",
                 "--steps", "3", "--no-progress"]) == 0
    npz = np.load(out / "samples.npz")
    arr = npz["arr_0"]
    assert npz["arr_1"].tolist() == json.loads((out / "settings.json").read_text())["labels"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8
    pngs = sorted(p.name for p in (out / "images").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000003.png").convert("RGB")), arr[3])
    assert json.loads((out / "settings.json").read_text())["num_samples"] == 5
    # `dcdit evaluate` on the output folder reads the .npz and its labels
    from dcdit.evaluation.mnist_classifier import classify, uint8_to_mnist

    assert main(["evaluate", str(out), "--no-progress"]) == 0
    mnist = json.loads((out / "evaluation.json").read_text())["metrics"]["mnist"]
    expected = (classify(uint8_to_mnist(arr)) == npz["arr_1"]).mean()
    assert mnist["num_samples"] == 5 and mnist["class_accuracy"] == pytest.approx(expected)


def test_eta_reaches_the_ddim_step(tmp_path, capsys):
    """`--eta` is DDIM's noise scale: sample-ddp with it equals `generate(..., eta=...)` and differs from eta = 0."""
    from dcdit.checkpoint import load_model
    from dcdit.sampling import generate, to_uint8_images

    model, _, _ = load_model(DEMO_CHECKPOINT)
    arrays = {}
    for eta in ("0", "1"):
        out = tmp_path / f"eta{eta}"
        assert main(["sample-ddp", "--ckpt", str(DEMO_CHECKPOINT), "--out", str(out), "--num-samples", "2",
                     "--batch-size", "2", "--sampler", "ddim", "--eta", eta, "--steps", "3", "--cfg-scale", "4",
                     "--no-progress"]) == 0
        npz = np.load(out / "samples.npz")
        arrays[eta] = npz["arr_0"]
        assert json.loads((out / "settings.json").read_text())["eta"] == float(eta)
    ref = generate(model, torch.as_tensor(npz["arr_1"]), sampler="ddim", eta=1.0, num_sampling_steps=3,
                   cfg_scale=4.0, seed=0, clip_denoised=True).samples
    assert np.abs(to_uint8_images(ref).astype(int) - arrays["1"].astype(int)).max() <= 1
    assert not np.array_equal(arrays["0"], arrays["1"])
    for bad in (["--sampler", "ddpm", "--eta", "1"], ["--sampler", "ddim", "--eta", "-0.5"]):
        assert main(["sample", "--ckpt", str(DEMO_CHECKPOINT), "--out", str(tmp_path / "x"), "--steps", "2",
                     "--no-progress", *bad]) == 2
        assert "eta is DDIM's noise scale" in capsys.readouterr().err


def test_latent_pipeline_extract_train_sample(tmp_path):
    """extract-features with a tiny local AutoencoderKL → train on the shards → sample through the VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    vae_dir = tmp_path / "vae"
    vae.save_pretrained(vae_dir)
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (images / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 36, 3), dtype=np.uint8)).save(images / c / f"{i}.png")
    feats = tmp_path / "feats"
    assert main(["extract-features", "--images", str(images), "--out", str(feats), "--vae", str(vae_dir),
                 "--image-size", "32", "--batch-size", "2", "--shard-size", "4", "--no-progress"]) == 0
    meta = json.loads((feats / "meta.json").read_text())
    assert meta["num_images"] == 6 and meta["latent_shape"] == [4, 16, 16] and meta["vae_id"] == str(vae_dir)

    run = tmp_path / "run"
    latent = ["data.name=latents", f"data.root={feats}", f"data.vae={vae_dir}", "data.latent_scale=0.18215",
              "model.in_channels=4", "model.input_size=16", "model.num_classes=2"]
    assert main(["train", "mnist", *TINY, *latent, "train.steps=2", "--out", str(run), "--no-progress"]) == 0
    # the wrong VAE is refused, both at training and at sampling time
    assert main(["train", "mnist", *TINY, *latent, "data.vae=other/vae", "train.steps=2", "--out", str(tmp_path / "r2"),
                 "--no-progress"]) == 2
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(run), "--out", str(out), "--steps", "2", "--per-class", "1", "--classes", "0", "1",
                 "--vae", "other/vae", "--no-progress"]) == 2
    assert main(["sample", "--ckpt", str(run), "--out", str(out), "--steps", "2", "--per-class", "1", "--classes", "0", "1",
                 "--no-progress"]) == 0
    assert Image.open(out / "samples.png").size[0] >= 2 * 32  # decoded to 32 px images, not 16 px latents


def test_demo_with_the_shipped_checkpoint(tmp_path):
    assert DEMO_CHECKPOINT.exists(), "the demo checkpoint must ship with the package"
    assert DEMO_CHECKPOINT.stat().st_size < 20 * 2**20
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--per-class", "1", "--sampling-steps", "3", "--no-progress"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["labels"] == list(range(10))
    demo = load_run_config("mnist", []).sample  # the demo samples with the mnist config's settings
    assert (settings["sampler"], settings["cfg_scale"], settings["num_sampling_steps"]) == (demo.sampler, demo.cfg_scale, 3)
    for f in ("samples.png", "chunking_viz.png", "compression_vs_timestep.png"):
        assert (out / f).stat().st_size > 1000


def test_demo_train_retrains_from_scratch_and_samples_the_new_run(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--train", "--steps", "2", "--out", str(out), "--per-class", "1", "--sampling-steps", "2",
                 "--no-progress"]) == 0
    run = out / "train"
    assert (run / "checkpoints" / "latest").read_text().strip() == "0000002"
    assert [r.split(",")[0] for r in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2"]  # from step 1
    settings = json.loads((out / "settings.json").read_text())
    assert settings["ckpt"] == str(run) and settings["ckpt_step"] == 2 and settings["labels"] == list(range(10))
    assert settings["model"] == load_run_config("mnist", []).model.__dict__  # the mnist config's model


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.learning_rate=1e-4"], "valid keys in train"),
        (["model.widht=64"], "valid keys"),
        (["optim.lr=1"], "top-level"),
        (["train.steps=many"], "expected int"),
        (["model.router=magic"], "model.router is 'magic'; it must be one of cosine"),
        (["data.name=imagenet"], "data.name is 'imagenet'; it must be one of latents, mnist"),
    ],
)
def test_bad_configs_are_explained(tmp_path, capsys, overrides, message):
    assert main(["train", "mnist", *TINY, "train.steps=1", *overrides, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_unknown_config_file(capsys):
    assert main(["train", "no-such-config"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "mnist" in err  # lists the packaged configs


def test_missing_and_mismatched_checkpoints(tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["sample", "--ckpt", str(tmp_path / "empty"), "--out", str(tmp_path / "s")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    assert main(["sample", "--ckpt", str(tmp_path / "foreign.safetensors"), "--out", str(tmp_path / "s")]) == 2
    assert "not written by dcdit" in capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["train", "mnist", *TINY, "train.steps=2", "--out", str(run), "--no-progress"]) == 0
    ema = run / "checkpoints" / "0000002" / "ema.safetensors"
    from safetensors import safe_open

    with safe_open(str(ema), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(ema))
    state.pop("router.q_proj.weight")
    state["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "broken.safetensors"), metadata=meta)
    assert main(["sample", "--ckpt", str(tmp_path / "broken.safetensors"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "missing keys [router.q_proj.weight]" in err and "blocks.0.attn.qkv.weight" in err and "(3, 3)" in err


def test_sample_flags_override_the_run_configs_sample_section(tmp_path):
    """Flags not given keep the checkpoint's `sample:` section (the shipped model's: DDPM, CFG 4);
    --lite-cfg without a fraction means 0.9 for the unconditional half."""
    out = tmp_path / "s"
    assert main(["sample", "--ckpt", str(DEMO_CHECKPOINT), "--out", str(out), "--steps", "2", "--classes", "4",
                 "--per-class", "1", "--lite-cfg", "--tail-dropping-fraction", "0.1", "--no-progress"]) == 0
    s = json.loads((out / "settings.json").read_text())
    assert (s["sampler"], s["cfg_scale"], s["num_sampling_steps"], s["eta"]) == ("ddpm", 4.0, 2, 0.0)
    assert (s["lite_cfg"], s["tail_dropping_fraction"], s["uncond_tail_dropping_fraction"]) == (True, 0.1, 0.9)
    assert s["weights"] == "ema" and s["seed"] == 0
