"""The miniature world: procedural captioned images and a small SD-format teacher trained on them.

Every pipeline stage can run on it offline:
``build_world(preset("default"), data_dir, teacher_dir)``.
"""

from components.world.build import build_world
from components.world.config import WorldConfig
from components.world.presets import PRESETS, preset
from components.world.render import attribute_accuracy, chance_levels, parse_caption

__all__ = [
    "PRESETS",
    "WorldConfig",
    "attribute_accuracy",
    "build_world",
    "chance_levels",
    "parse_caption",
    "preset",
]
