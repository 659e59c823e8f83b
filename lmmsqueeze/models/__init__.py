"""Model families, one file each, registered by ``model_type`` (see :mod:`.base`).

Adding a family is one file here: a :class:`Family` subclass decorated with
:func:`register_family`, imported below, and a row in the tests' family table.
"""

# each module registers its family and presets on import
from . import internvl, llava, llava_next, llava_onevision, qwen2_vl, qwen3_vl  # noqa: F401
from .base import (
    FAMILIES,
    PRESETS,
    Family,
    PackedImage,
    family_class,
    family_for,
    geometry_from_config,
    geometry_from_path,
    geometry_of,
    preset,
    register_family,
    register_preset,
    supported_models,
)

__all__ = [
    "FAMILIES",
    "PRESETS",
    "Family",
    "PackedImage",
    "family_class",
    "family_for",
    "geometry_from_config",
    "geometry_from_path",
    "geometry_of",
    "preset",
    "register_family",
    "register_preset",
    "supported_models",
]
