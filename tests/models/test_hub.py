"""save_pretrained / from_pretrained (dcdit.models.hub): config.json + model.safetensors, offline, strict.

Round trips of DiT, DC-DiT and DC-DiT with DyDiT gates: the loaded model must hold the same tensors
and compute the same outputs; a socket that refuses to open proves that nothing goes to the network."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

from dcdit.models.dcdit import DCDiT
from dcdit.models.dit import DiT


@pytest.fixture
def offline(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("from_pretrained tried to open a network connection")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("arch", ["dit", "dcdit", "dcdit_dydit"])
def test_round_trip(tmp_path, helpers, offline, arch):
    config = helpers.TINY_DIT if arch == "dit" else {**helpers.TINY_DCDIT, "dydit": arch == "dcdit_dydit",
                                                      "input_size": (8, 8), "noise_schedule": "cosine"}
    cls = DiT if arch == "dit" else DCDiT
    model = helpers.randomize_(helpers.make_model(config)).eval()
    model.save_pretrained(tmp_path / "m")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "m").iterdir()}
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["hidden_size"] == 64 and saved.get("dydit", False) == (arch == "dcdit_dydit")
    on_disk = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert on_disk.keys() == model.state_dict().keys()

    loaded = cls.from_pretrained(tmp_path / "m")
    assert not loaded.training and loaded.grid == model.grid and loaded.noise_schedule == model.noise_schedule
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, t, y = helpers.tiny_inputs(3)
    with torch.no_grad():
        a, b = model(x, t, y), loaded(x, t, y)
    a, b = (a, b) if arch == "dit" else (a[0], b[0])
    assert torch.equal(a, b)


def test_loading_is_strict(tmp_path, helpers, offline):
    """A config that does not describe the weights (another depth) is an error, not a half-loaded model."""
    helpers.make_model(helpers.TINY_DCDIT).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "depth": 3}))
    with pytest.raises(RuntimeError, match="blocks.2"):
        DCDiT.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DCDiT.from_pretrained(tmp_path / "m")
