"""dcdit: the Dynamic Chunking Diffusion Transformer (arXiv 2603.06351) in plain PyTorch."""

from pathlib import Path

__version__ = "0.1.0"

#: The MNIST DC-DiT shipped with the package (how it was made: docs/demo-checkpoint.md).
DEMO_CHECKPOINT = Path(__file__).parent / "assets" / "mnist_dcdit.safetensors"
