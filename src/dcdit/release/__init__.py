"""The authors' release (AMD-AGI/DynamicChunkingDiT) in dcdit: its configuration, its state-dict names,
its checkpoints. A model built here from a release state dict computes what the release computes
(tests/release/ checks every stored output of the official fixtures); docs/release.md lists
each difference from our defaults and the release quirks users should know.
"""

from .checkpoint import ConversionReport, ReleaseCheckpoint, convert_release_checkpoint, read_release_checkpoint
from .keys import map_release_state_dict, model_from_release, release_key_map
from .layout import parse_layout, release_model_config

__all__ = ["model_from_release", "release_key_map", "release_model_config", "parse_layout", "map_release_state_dict",
           "read_release_checkpoint", "convert_release_checkpoint", "ReleaseCheckpoint", "ConversionReport"]
