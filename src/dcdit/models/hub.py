"""``save_pretrained`` / ``from_pretrained`` in the Hugging Face layout, for :class:`DiT` and :class:`DCDiT`.

A saved model is a folder with ``config.json`` (the constructor arguments) and ``model.safetensors``
(the state dict), written by ``huggingface_hub``'s ``PyTorchModelHubMixin``; a local folder loads
without any network access, a hub id downloads through ``huggingface_hub``::

    model.save_pretrained("dcdit-mnist")
    model = DCDiT.from_pretrained("dcdit-mnist")          # strict: every tensor must fit the config

Run folders keep their own layout (``dcdit.checkpoint``: weights with the whole run config, optimizer
state, EMA); this is the layout for sharing a single model.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import PyTorchModelHubMixin, constants


class HubMixin(
    PyTorchModelHubMixin,
    library_name="dcdit",
    paper_url="https://arxiv.org/abs/2603.06351",
    license="apache-2.0",
    tags=["diffusion", "class-conditional-image-generation"],
):
    """The mixin with a strict load: a missing, unexpected or mis-shaped tensor is an error (the
    mixin's own default silently skips missing ones); local folders are read directly."""

    @classmethod
    def _from_pretrained(cls, *, model_id: str, map_location: str = "cpu", strict: bool = True, **kwargs):
        if not os.path.isdir(model_id):  # a hub id: huggingface_hub downloads (or finds it in its cache)
            return super()._from_pretrained(model_id=model_id, map_location=map_location, strict=strict, **kwargs)
        from safetensors.torch import load_model

        weights = Path(model_id) / constants.SAFETENSORS_SINGLE_FILE
        if not weights.exists():
            raise FileNotFoundError(f"{weights} does not exist: a folder written by save_pretrained holds config.json "
                                    f"and {constants.SAFETENSORS_SINGLE_FILE}")
        model_kwargs = {k: v for k, v in kwargs.items() if k not in ("revision", "cache_dir", "force_download",
                                                                      "local_files_only", "token")}
        model = cls(**model_kwargs)
        load_model(model, str(weights), strict=strict, device=map_location)
        return model.eval()
