"""Stand-ins for the feature networks of the evaluation tests (nothing downloads), and small writers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image


class TinyNet(nn.Module):
    """A fixed random conv net standing in for Inception: uint8-range input -> (features (B, 8), logits (B, 5))."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor):
        f = torch.tanh(self.conv(x / 127.5 - 1.0)).mean((2, 3))
        return f, self.fc(f)


class NVLabsStub(nn.Module):
    """The calling convention of StyleGAN's inception-2015-12-05.pt."""

    def __init__(self):
        super().__init__()
        self.net = TinyNet()

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False):
        f, logits = self.net(x.to(torch.float32))
        if return_features:
            return f
        return torch.softmax(logits, dim=1)


def write_folder(u8: np.ndarray, folder) -> None:
    """uint8 (N, H, W, 3) images -> 000000.png, 000001.png, ... in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(u8):
        Image.fromarray(im).save(folder / f"{i:06d}.png")


@pytest.fixture
def ev():
    """The stand-ins above (test modules do not import conftest by name)."""
    from dcdit.evaluation import ModuleExtractor

    return SimpleNamespace(
        TinyNet=TinyNet, NVLabsStub=NVLabsStub, write_folder=write_folder,
        tiny_extractor=lambda: ModuleExtractor(TinyNet(), input_range="0-255", name="tiny"),
    )


@pytest.fixture
def torchscript_nets(tmp_path):
    """(generic TinyNet, nvlabs-convention stub) saved as TorchScript files."""
    torch.jit.script(TinyNet()).save(str(tmp_path / "tiny.pt"))
    torch.jit.script(NVLabsStub()).save(str(tmp_path / "nv.pt"))
    return tmp_path / "tiny.pt", tmp_path / "nv.pt"


@pytest.fixture(scope="module")
def test_split():
    """The 500 held-out MNIST digits (1×32×32 in [-1, 1]) and their labels."""
    from dcdit.data.mnist import load_mnist_tensors

    return load_mnist_tensors("test")
