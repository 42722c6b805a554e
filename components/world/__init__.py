"""The miniature world: procedural captioned images and a small SD-format teacher trained on them.

Every pipeline stage can run on it offline: ``build_world(world_config, data_dir, teacher_dir)``
with the ``world`` section of a params file (``params.yaml``, ``pipeline/presets/*.yaml``).
"""

from components.world.build import build_world
from components.world.config import WorldConfig
from components.world.render import attribute_accuracy, chance_levels, parse_caption

__all__ = ["WorldConfig", "attribute_accuracy", "build_world", "chance_levels", "parse_caption"]
