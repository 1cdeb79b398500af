"""dcdit: the Dynamic Chunking Diffusion Transformer (arXiv 2603.06351) in plain PyTorch."""

__version__ = "0.1.0"
