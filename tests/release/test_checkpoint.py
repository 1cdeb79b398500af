"""Official checkpoints: read safely (weights_only, stand-ins for the config classes, CUDA tags on a CPU),
refused when they pickle anything else, and converted into dcdit runs whose outputs are the release's."""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dcdit.checkpoint import load_model
from dcdit.cli import main
from dcdit.release import convert_release_checkpoint, model_from_release, read_release_checkpoint
from dcdit.release.checkpoint import model_section

CHECKPOINT = Path(__file__).parent.parent / "fixtures" / "release" / "amd_checkpoint_small.pt"


def test_the_fixture_needs_stand_ins_and_a_cpu_mapping():
    """The file is what a real training run writes: plain weights_only loading fails on the CUDA tags
    and then on the pickled config dataclass."""
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(CHECKPOINT, weights_only=True)
    with pytest.raises(pickle.UnpicklingError, match="config.Config"):
        torch.load(CHECKPOINT, weights_only=True, map_location="cpu")


def test_read_release_checkpoint(expected):
    ckpt = read_release_checkpoint(CHECKPOINT)
    assert ckpt.config == expected["config"]  # the pickled dataclass tree as plain dicts, values untouched
    assert list(ckpt.model) == expected["param_names"] and list(ckpt.ema) == expected["param_names"]
    assert all(t.device.type == "cpu" for t in (*ckpt.model.values(), *ckpt.ema.values()))
    assert sorted(ckpt.opt["state"]) == [1, 2, 83, 84, 87, 88] and ckpt.extra_keys == [] and ckpt.step is None


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_with_another_global_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "0001000.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": _Payload()}, bad)
    with pytest.raises(ValueError, match=r"refusing to unpickle (posix|os|nt)\.system") as err:
        read_release_checkpoint(bad)
    assert "\n" not in str(err.value) and not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        read_release_checkpoint(tmp_path / "junk.pt")


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_converted_run_reproduces_the_release(tmp_path, ref, expected, close, weights):
    """EMA weights by default (the release's sampler); the release's 'model' weights are the parity fixture's."""
    report = convert_release_checkpoint(CHECKPOINT, tmp_path / "run", weights=weights)
    assert len(report.key_map) == 90 and report.step == 0
    sampled, cfg, _ = load_model(tmp_path / "run")  # ema.safetensors: what `dcdit sample` uses
    raw, _, _ = load_model(tmp_path / "run", use_ema=False)
    for f in ("0.0", "0.3"):
        with torch.no_grad():
            out, record = sampled(expected["x"], expected["t"], expected["y"], tail_dropping_fraction=float(f))
            raw_out, _ = raw(ref["x"], ref["t"], ref["y"], tail_dropping_fraction=float(f))
        want = expected[f"ema/fwd_{f}/out"] if weights == "ema" else ref[f"fwd_{f}/out"]
        assert close(out, want) and close(raw_out, ref[f"fwd_{f}/out"])
        if weights == "ema":
            assert torch.equal(record.kept_count, expected[f"ema/fwd_{f}/n_boundaries"])
    # the run config carries the release's training recipe (its shipped DCDiT-B-N4.yaml) in our keys
    assert (cfg.train.multi_budget.fractions, cfg.train.multi_budget.start_step) == ([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 50000)
    assert (cfg.model.target_ratio, cfg.train.ratio_loss_weight, cfg.train.ratio_batch_size, cfg.train.lr) == (4.0, 0.03, 16, 1e-4)
    assert json.loads((tmp_path / "run" / "conversion.json").read_text())["weights"] == weights
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert_release_checkpoint(CHECKPOINT, tmp_path / "run")


def _tiny_latents(tmp_path):
    """A tiny local AutoencoderKL (downsampling 2) and 16 px images -> 4x8x8 latents, the fixture's grid."""
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for c in ("3", "7"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / c / f"{i}.png")
    assert main(["extract-features", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "feats"), "--vae",
                 str(tmp_path / "vae"), "--image-size", "16", "--batch-size", "2", "--no-progress"]) == 0
    return tmp_path / "vae", tmp_path / "feats"


def test_convert_release_command_feeds_sample_analysis_and_fine_tuning(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["convert-release", str(CHECKPOINT), "--out", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "hnet.routing_module.context_predictor" in printed and "router.predict" in printed
    vae, feats = _tiny_latents(tmp_path)
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(run), "--out", str(out), "--steps", "2", "--classes", "3", "7", "--vae", str(vae),
                 "--cfg-scale", "1.5", "--lite-cfg", "--tail-dropping-fraction", "0.2", "--no-progress"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["lite_cfg"] and settings["model"]["router"] == "predictability"
    assert main(["sample-ddp", "--ckpt", str(run), "--out", str(tmp_path / "fid"), "--num-samples", "2", "--steps", "2",
                 "--vae", str(vae), "--no-progress"]) == 0
    assert np.load(tmp_path / "fid" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    g = torch.Generator().manual_seed(0)
    np.savez(tmp_path / "latents.npz", images=torch.randn(3, 4, 8, 8, generator=g).numpy(), labels=np.array([1, 2, 3]),
             masks=(torch.rand(3, 8, 8, generator=g) > 0.5).numpy())
    assert main(["analyze-router", "--ckpt", str(run), "--images", str(tmp_path / "latents.npz"), "--timesteps", "500",
                 "--out", str(tmp_path / "router")]) == 0
    # fine-tuning starts from the run's own config (the release's model and recipe) and its EMA weights
    tune = ["train", str(run / "config.yaml"), f"data.root={feats}", f"data.vae={vae}", "train.global_batch_size=2",
            "train.ratio_batch_size=2", "train.steps=2", "train.tensorboard=false", f"train.init_from={run}",
            "--out", str(tmp_path / "tuned"), "--no-progress"]
    assert main(tune) == 0
    assert "initialised from" in capsys.readouterr().out


def test_a_checkpoint_with_d_blocks_converts_and_reloads(tmp_path, expected, close):
    """The fixture checkpoint rewritten as ``["c2", ["D1d1"], "c2"]`` (layer 1's MLP weights removed):
    conversion writes ``model.inner_mlp: [true, false]``, the run reloads through its saved config, and
    its outputs equal the original weights with layer 1's MLP silenced (fc2 = 0)."""
    ckpt = read_release_checkpoint(CHECKPOINT)
    config = copy.deepcopy(ckpt.config)
    config["model"]["hnet"]["arch_layout"] = ["c2", ["D1d1"], "c2"]
    mlp = "hnet.main_network.main_network.layers.1.mlp."
    ema = {k: v for k, v in ckpt.ema.items() if not k.startswith(mlp)}
    assert len(ckpt.ema) - len(ema) == 4
    torch.save({"model": ema, "ema": ema, "config": config}, tmp_path / "0000100.pt")
    report = convert_release_checkpoint(tmp_path / "0000100.pt", tmp_path / "run")
    model, cfg, _ = load_model(tmp_path / "run")
    assert cfg.model.inner_mlp == [True, False] and report.step == 100 and len(report.key_map) == 90 - 4
    silenced = dict(ckpt.ema)
    silenced[mlp + "fc2.weight"] = torch.zeros_like(silenced[mlp + "fc2.weight"])
    silenced[mlp + "fc2.bias"] = torch.zeros_like(silenced[mlp + "fc2.bias"])
    reference = model_from_release(silenced, model_section(ckpt.config))
    with torch.no_grad():
        out, record = model(expected["x"], expected["t"], expected["y"], tail_dropping_fraction=0.3)
        want, want_record = reference(expected["x"], expected["t"], expected["y"], tail_dropping_fraction=0.3)
        original, _ = model_from_release(ckpt.ema, model_section(ckpt.config))(expected["x"], expected["t"], expected["y"],
                                                                               tail_dropping_fraction=0.3)
    assert torch.equal(record.kept_count, want_record.kept_count)
    assert close(out, want, 1e-6) and not close(out, original, 1e-4)
