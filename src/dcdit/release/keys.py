"""State-dict names of the release (AMD-AGI/DynamicChunkingDiT) and ours, and loading one into the other.

The release nests its modules as an H-Net: ``hnet.encoder.layers.i`` (conv blocks), ``hnet.routing_module``,
``hnet.main_network.main_network.layers.j`` (the inner DiT blocks), ``hnet.decoder.layers.i``, with
an ``rmsnorm`` at the end of each stack. Ours are flat: ``encoder.blocks.i``, ``router``, ``blocks.j``,
``inner_norm``, ``decoder.blocks.i``. The embedders, the residual projection and the final layer keep
DiT's names in both. ``pos_embed`` is a frozen parameter in the release and a fixed buffer here: it is
not copied but checked against ours.
"""

from __future__ import annotations

import torch

from ..config import build_model
from .layout import parse_layout, release_model_config

_CONV = ("norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias", "cond_proj.1.weight", "cond_proj.1.bias",
         "norm2.weight", "norm2.bias", "conv2.weight", "conv2.bias")
_DIT = ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "adaLN_modulation.1.weight",
        "adaLN_modulation.1.bias")
_MLP = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
_ROUTER = {"proj": "reduce", "context_predictor": "predict", "residual_scorer.0": "score.0",
           "residual_scorer.1": "score.1", "residual_scorer.3": "score.3"}
_SAME = ("x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
         "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
         "final_layer.linear.weight", "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
         "final_layer.adaLN_modulation.1.bias")


def _conv_stack(theirs: str, ours: str, n: int, projecting_block: int) -> dict[str, str]:
    out = {}
    for i in range(n):
        names = _CONV + (("skip_proj.weight", "skip_proj.bias") if i == projecting_block else ())
        out.update({f"{theirs}.layers.{i}.{k}": f"{ours}.blocks.{i}.{k.replace('skip_proj', 'skip')}" for k in names})
    out[f"{theirs}.rmsnorm.weight"] = f"{ours}.norm.weight"
    return out


def release_key_map(config: dict) -> dict[str, str]:
    """Every parameter name of the release's state dict for ``config`` (nested dict, as in
    :func:`release_model_config`) -> our parameter name. ``pos_embed`` is not in the map (see module doc).

    The encoder's last conv block projects d -> D and the decoder's first D -> d, so only those two carry
    a ``skip_proj`` (when d != D)."""
    layout = parse_layout(config["model"]["hnet"]["arch_layout"])
    cfg = release_model_config(config)
    project = cfg.encoder_width != cfg.hidden_size
    out = {k: k for k in _SAME}
    out.update(_conv_stack("hnet.encoder", "encoder", layout.encoder_blocks, layout.encoder_blocks - 1 if project else -1))
    out.update({f"hnet.routing_module.{a}.{w}": f"router.{b}.{w}" for a, b in _ROUTER.items() for w in ("weight", "bias")})
    out.update({f"hnet.residual_proj.{w}": f"residual_proj.{w}" for w in ("weight", "bias")})
    inner = "hnet.main_network.main_network"
    for j, has_mlp in enumerate(layout.inner_mlp):
        out.update({f"{inner}.layers.{j}.{k}": f"blocks.{j}.{k}" for k in _DIT + (_MLP if has_mlp else ())})
    out[f"{inner}.rmsnorm.weight"] = "inner_norm.weight"
    out.update(_conv_stack("hnet.decoder", "decoder", layout.decoder_blocks, 0 if project else -1))
    return out


def _head(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" … (+{len(names) - n} more)" if len(names) > n else "")


def map_release_state_dict(state_dict: dict, config: dict, source: str = "the state dict") -> dict[str, torch.Tensor]:
    """The release's state dict -> ours (float32 CPU tensors), or a one-line error naming the keys that
    are unknown or missing. ``pos_embed``, when present, is returned under its own name for checking."""
    key_map = release_key_map(config)
    unknown = sorted(set(state_dict) - set(key_map) - {"pos_embed"})
    missing = sorted(set(key_map) - set(state_dict))
    if unknown or missing:
        parts = [f"unknown keys [{_head(unknown)}]" if unknown else "", f"missing keys [{_head(missing)}]" if missing else ""]
        raise ValueError(f"{source} does not match the release model its config describes: "
                         + "; ".join(p for p in parts if p) + " — is it a checkpoint of AMD-AGI/DynamicChunkingDiT with this config?")
    out = {key_map[k]: v.detach().to("cpu", torch.float32) for k, v in state_dict.items() if k in key_map}
    if "pos_embed" in state_dict:
        out["pos_embed"] = state_dict["pos_embed"].detach().to("cpu", torch.float32)
    return out


def model_from_release(state_dict: dict, config: dict, target_ratio: float = 4.0, noise_schedule: str = "linear"):
    """A release state dict (``model`` or ``ema`` of an official checkpoint) and its configuration ->
    our DCDiT computing what the release computes (eval mode). Unknown, missing or mis-shaped keys and
    a ``pos_embed`` that is not the model's sin-cos table are one-line errors."""
    from ..checkpoint import load_state_dict_checked

    model = build_model(release_model_config(config, target_ratio, noise_schedule))
    state = map_release_state_dict(state_dict, config)
    pos = state.pop("pos_embed", None)
    if pos is not None and (pos.shape != model.pos_embed.shape or not torch.allclose(pos, model.pos_embed, atol=1e-5)):
        raise ValueError(f"the release's pos_embed {tuple(pos.shape)} is not the 2D sin-cos table of a "
                         f"{model.grid[0]}x{model.grid[1]} grid at width {model.pos_embed.shape[-1]}: check input_size")
    load_state_dict_checked(model, state, "the release state dict")
    return model.eval()
