"""The release's model configuration (``model.hnet`` of AMD-AGI/DynamicChunkingDiT) as a DCDiTConfig.

The release describes a model by an H-Net ``arch_layout`` such as ``["c2", ["D12"], "c2"]``: an encoder
of 2 conv blocks, one inner stage of 12 DiT blocks, a decoder of 2 conv blocks (``c``/``C`` build the
same conv block; ``D`` is a DiT block, ``d`` one without its MLP: ``model.inner_mlp``). ``d_model`` and ``num_heads`` are
per stage, ``enc_dec_dim_factor[0]`` divides the width of the encoder/decoder. What the release's own
code can build *and run* is one chunking stage with conv blocks outside and DiT blocks inside; a
nested layout builds but its forward pass fails in the release (docs/release.md), so it is refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import RELEASE_MODEL_OPTIONS, DCDiTConfig

_BLOCKS = re.compile(r"([tTdDcC])(\d+)")


@dataclass
class ReleaseLayout:
    """One chunking stage: conv blocks in the encoder and decoder, DiT blocks (with/without MLP) inside."""

    encoder_blocks: int
    decoder_blocks: int
    inner_mlp: list[bool]  # one entry per inner block: True for ``D``, False for ``d``


def _blocks(spec, where: str) -> list[str]:
    """``"c1C1"`` -> ["c", "C"]; every character must belong to a block token (the release's parser
    silently skips anything else, so a typo would change the model without a word)."""
    if not isinstance(spec, str) or not spec or _BLOCKS.sub("", spec):
        raise ValueError(f"model.hnet.arch_layout: {where} must be a string of blocks such as 'c2' or 'D12', got {spec!r}")
    return [kind for kind, n in _BLOCKS.findall(spec) for _ in range(int(n))]


def parse_layout(layout) -> ReleaseLayout:
    """``["c2", ["D12"], "c2"]`` -> ReleaseLayout(2, 2, [True] * 12), or a one-line error."""
    if not (isinstance(layout, (list, tuple)) and len(layout) == 3 and isinstance(layout[1], (list, tuple))):
        raise ValueError(
            f"model.hnet.arch_layout must be [encoder, [inner], decoder] such as ['c2', ['D12'], 'c2'], got {layout!r}"
        )
    if len(layout[1]) != 1 or not isinstance(layout[1][0], str):
        raise ValueError(
            f"model.hnet.arch_layout {layout!r} nests a second chunking stage: the release builds such models but "
            "cannot run them (its inner router needs num_rows/num_cols, which the outer stage removes); "
            "dcdit supports the one-stage layouts the release runs, e.g. ['c2', ['D12'], 'c2']"
        )
    enc, dec, inner = _blocks(layout[0], "the encoder"), _blocks(layout[2], "the decoder"), _blocks(layout[1][0], "the inner stage")
    if any(k not in "cC" for k in enc + dec):
        raise ValueError(f"model.hnet.arch_layout {layout!r}: the encoder and decoder must be conv blocks (c/C); "
                         "DiT blocks at full resolution are not supported")
    if any(k not in "dD" for k in inner):
        raise ValueError(f"model.hnet.arch_layout {layout!r}: the inner stage must be DiT blocks (d/D); the release "
                         "would run conv blocks there across the packed batch")
    return ReleaseLayout(len(enc), len(dec), [k == "D" for k in inner])


def _pair(value, key: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"model.hnet.{key} must list two stages (outer, inner) for a one-stage layout, got {value!r}")
    return list(value)


def release_model_config(config: dict, target_ratio: float = 4.0, noise_schedule: str = "linear") -> DCDiTConfig:
    """The release's configuration as a nested dict (``model.hnet.arch_layout``, ``d_model``, ``num_heads``,
    ``enc_dec_dim_factor``, ``dechunk_kernel_sigma``, ``model.mlp_ratio``, ``input_size``, ``in_channels``,
    ``num_classes``, ``class_dropout_prob``, ``learn_sigma``) -> the release-exact DCDiTConfig.

    ``target_ratio`` and ``noise_schedule`` are training settings the model section does not hold
    (``training.downsample_factor``, ``diffusion.noise_schedule``)."""
    model = config.get("model") or {}
    hnet = model.get("hnet") or {}
    layout = parse_layout(hnet.get("arch_layout"))
    d_model = _pair(hnet.get("d_model"), "d_model")
    heads = _pair(hnet.get("num_heads"), "num_heads")
    if d_model[0] != d_model[1]:
        raise ValueError(f"model.hnet.d_model must be equal at both stages (every block is conditioned at width "
                         f"d_model[0]), got {d_model}")
    D = int(d_model[0])
    factors = hnet.get("enc_dec_dim_factor") or [None, None]
    factors = _pair(factors, "enc_dec_dim_factor")
    if factors[1] not in (None, 1):
        raise ValueError(f"model.hnet.enc_dec_dim_factor[1] must be null: the inner stage runs at d_model, got {factors[1]}")
    width = D // int(factors[0]) if factors[0] else D
    if width % 32 or D % 32:
        raise ValueError(f"encoder/decoder width {width} and d_model {D} must be multiples of 32 "
                         "(the release's GroupNorm(32)); change model.hnet.enc_dec_dim_factor or d_model")
    return DCDiTConfig(
        input_size=int(config["input_size"]), in_channels=int(config["in_channels"]),
        num_classes=int(config["num_classes"]), class_dropout_prob=float(config["class_dropout_prob"]),
        learn_sigma=bool(config["learn_sigma"]), hidden_size=D, depth=len(layout.inner_mlp), num_heads=int(heads[1]),
        mlp_ratio=float(model.get("mlp_ratio", 4.0)), encoder_width=width, encoder_blocks=layout.encoder_blocks,
        decoder_blocks=layout.decoder_blocks, dechunk_sigma=float(hnet.get("dechunk_kernel_sigma", 1.0)),
        target_ratio=float(target_ratio), noise_schedule=noise_schedule, **RELEASE_MODEL_OPTIONS,
        inner_mlp=None if all(layout.inner_mlp) else layout.inner_mlp,  # 'd' blocks have no MLP
    )
