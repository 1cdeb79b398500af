"""dcdit.cli_evaluation through ``dcdit.cli.main``: ``dcdit evaluate`` / ``train-classifier`` /
``analyze-router`` parse their flags into the library call, print its results, and end a user error
in one line. (Here, next to the library they call, rather than in tests/test_cli.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dcdit.cli import main
from dcdit.sampling import to_uint8_images, write_npz


def test_evaluate_mnist_folder_with_labels_file(tmp_path, test_split, capsys, ev):
    x, y = test_split
    ev.write_folder(to_uint8_images(x[:30]), tmp_path / "out" / "images")
    (tmp_path / "out" / "settings.json").write_text(json.dumps({"sampler": "ddim", "num_samples": 30}))
    (tmp_path / "labels.json").write_text(json.dumps(y[:30].tolist()))
    assert main(["evaluate", str(tmp_path / "out" / "images"), "--labels", str(tmp_path / "labels.json"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "out" / "evaluation.json").read_text())  # next to settings.json
    mm = res["metrics"]["mnist"]
    assert mm["labels_source"] == str(tmp_path / "labels.json") and mm["num_samples"] == 30
    assert mm["class_accuracy"] >= 0.9 and res["sampling_settings"]["sampler"] == "ddim"
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["mnist_fid:", f"{mm['mnist_fid']:.4f}"]
    assert out[2].split() == ["class_accuracy:", f"{mm['class_accuracy']:.4f}"]
    assert out[-1] == f"wrote {tmp_path / 'out' / 'evaluation.json'}"


def test_evaluate_flags_reach_the_library(tmp_path, torchscript_nets, capsys):
    """--metrics / --is-split-size / --max-samples / --out / --save-ref-stats end up in the results."""
    tiny, _ = torchscript_nets
    rng = np.random.default_rng(0)
    write_npz(rng.integers(0, 256, size=(20, 16, 16, 3), dtype=np.uint8), tmp_path / "s.npz")
    assert main(["evaluate", str(tmp_path / "s.npz"), "--feature-extractor", str(tiny), "--metrics", "is",
                 "--is-split-size", "5", "--max-samples", "15", "--out", str(tmp_path / "r" / "e.json"),
                 "--save-ref-stats", str(tmp_path / "st"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "r" / "e.json").read_text())
    assert res["metrics"]["inception_score_splits"] == 3 and res["samples"]["num_images"] == 15
    assert res["saved_reference_stats"] == str(tmp_path / "st.npz") and (tmp_path / "st.npz").exists()
    assert "inception_score:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "{tmp}/nope.npz"], "dcdit evaluate: error: {tmp}/nope.npz does not exist"),
    (["evaluate", "{tmp}/s.npz", "--metrics", "fid,xx"],
     "dcdit evaluate: error: unknown metrics ['xx']; choose from fid, is, pr, mnist (or auto)"),
    (["evaluate", "{tmp}/s.npz", "--feature-extractor", "https://x/inception.pt"],
     "dcdit evaluate: error: https://x/inception.pt: feature extractors are loaded from local files only"),
    (["analyze-router", "--ckpt", "{tmp}/nope"], "dcdit analyze-router: error: checkpoint {tmp}/nope does not exist"),
])
def test_user_errors_end_in_one_line(tmp_path, capsys, argv, message):
    write_npz(np.zeros((3, 8, 8, 3), dtype=np.uint8), tmp_path / "s.npz")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message.format(tmp=tmp_path))


def test_train_classifier_flags_reach_the_library(monkeypatch, capsys):
    """The flags are wired to train_classifier's parameters (the training itself: test_mnist_training)."""
    import dcdit.cli_evaluation as C

    seen = {}

    def fake(out, **kw):
        seen.update(out=out, **kw)
        return {"path": str(out), "test_accuracy": 0.5, "train_accuracy": 0.6, "test_errors": 250, "seconds": 1.0}

    monkeypatch.setattr(C, "train_classifier", fake)
    assert main(["train-classifier", "--out", "c.safetensors", "--epochs", "2", "--seed", "7", "--batch-size", "32",
                 "--lr", "0.001", "--max-shift", "1", "--threads", "1", "--no-progress"]) == 0
    assert seen["out"] == "c.safetensors" and (seen["epochs"], seen["seed"], seen["batch_size"]) == (2, 7, 32)
    assert (seen["lr"], seen["max_shift"], seen["threads"], seen["progress"]) == (0.001, 1, 1, False)
    assert json.loads(capsys.readouterr().out)["test_errors"] == 250


def test_analyze_router_on_a_tiny_mnist_checkpoint(tmp_path, capsys):
    from dcdit.checkpoint import save_weights
    from dcdit.config import build_model, load_run_config

    cfg = load_run_config("mnist", ["model.hidden_size=32", "model.depth=1", "model.num_heads=2",
                                    "model.encoder_width=8"])
    torch.manual_seed(0)
    save_weights(tmp_path / "ema.safetensors", build_model(cfg.model).state_dict(), cfg, 0)
    assert main(["analyze-router", "--ckpt", str(tmp_path / "ema.safetensors"), "--out", str(tmp_path / "out"),
                 "--timesteps", "800", "50", "--num-images", "6", "--sampling-steps", "2"]) == 0
    data = json.loads((tmp_path / "out" / "router_analysis.json").read_text())
    assert len(data["retention"]) == 2 and data["retention"][0]["num_samples"] == 6
    assert len(data["compression_vs_timestep"]["t"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("t= 800: fg kept") and lines[1].startswith("t=  50: fg kept")
