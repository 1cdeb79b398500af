"""DiT: the fixed-patch Diffusion Transformer baseline (Peebles & Xie 2023).

Architecture and state-dict layout are those of the official release, so ``DiT-XL-2-256x256.pt``
loads with ``strict=True``. Differences that do not change a single parameter name: non-square
grids (``input_size=(h, w)``), an optional diffusers-style timestep-frequency convention
(``timestep_freq_shift=1``), and guidance on all ε channels by default.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .dit_block import DiTBlock, FinalLayer
from .embedders import LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed
from .guidance import guide
from ..diffusion.schedules import check_noise_schedule
from .input_checks import as_grid, check_inputs


def xavier_init_linears(model: nn.Module) -> None:
    """Every Linear: Xavier-uniform weight, zero bias (DiT's ``_basic_init``)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)


def init_conditioning_and_gates(model: nn.Module, label_embed_std: float = 0.02, zero_blocks: bool = True) -> None:
    """DiT's embedder init (N(0, 0.02)) and adaLN-Zero: every block's modulation and the final layer
    start at zero, so each block is the identity and the output is 0. Shared by DiT and DC-DiT.

    ``label_embed_std`` scales the class-embedding table. DiT's 0.02 is made for 400k-step runs: the
    timestep embedding grows to a norm of ~20 within a few hundred steps while the class rows stay
    < 1, so in a short run the label moves the adaLN modulation by < 1% and is ignored (measured on
    the MNIST default, docs/demo-checkpoint.md). 1.0 (``nn.Embedding``'s default) starts the label
    at the timestep's scale."""
    if label_embed_std <= 0:
        raise ValueError(f"label_embed_std must be > 0, got {label_embed_std}")
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=label_embed_std)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    for block in model.blocks if zero_blocks else ():  # zero_blocks=False: the DC-DiT release's init
        nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        nn.init.constant_(layer.weight, 0)
        nn.init.constant_(layer.bias, 0)


class DiT(nn.Module):
    """x (B, C, H, W), t (B,), y (B,) -> (B, 2C, H, W) when ``learn_sigma`` (ε and variance), else (B, C, H, W).

    ``input_size`` is the latent grid (an int or (h, w)); both sides must be divisible by ``patch_size``.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        timestep_freq_shift: float = 0.0,
        noise_schedule: str = "linear",
        label_embed_std: float = 0.02,
    ):
        super().__init__()
        self.grid = as_grid(input_size)
        if self.grid[0] % patch_size or self.grid[1] % patch_size:
            raise ValueError(f"input_size {self.grid} is not divisible by patch_size {patch_size}")
        self.learn_sigma = learn_sigma
        self.noise_schedule = check_noise_schedule(noise_schedule)  # read by training and sampling
        self.label_embed_std = label_embed_std
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.token_grid = (self.grid[0] // patch_size, self.grid[1] // patch_size)

        self.x_embedder = PatchEmbed(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, downscale_freq_shift=timestep_freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.token_grid[0] * self.token_grid[1]
        # A parameter (not a buffer) that never trains: this is where the official checkpoint keeps it.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier Linears, fixed sin-cos positions, zero adaLN gates and output."""
        xavier_init_linears(self)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.token_grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        init_conditioning_and_gates(self, self.label_embed_std)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h·w, P²·C) -> (B, C, h·P, w·P); non-square grids keep h and w apart."""
        c, p = self.out_channels, self.patch_size
        h, w = self.token_grid
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``force_drop_ids`` (B,): 1 where the label is replaced by the null class; when given, it
        replaces the random label dropout of training mode (DiT's ``LabelEmbedder`` argument)."""
        check_inputs(
            x, t, y, in_channels=self.in_channels, grid=self.grid,
            num_classes=self.num_classes, allow_null=self.class_dropout_prob > 0,
        )
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)  # (B, T, P²·C_out)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guidance_channels: int | None = None):
        """Batch [cond; uncond] of size 2B (the uncond half's y = num_classes). The first half of x is
        fed to both branches; both output halves hold the guided ε (the DiT sampling convention)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        return guide(out, cfg_scale, self.in_channels, guidance_channels)
