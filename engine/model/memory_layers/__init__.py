"""Memory layers that replace a transformer's MLPs: featural and associative memories."""

from engine.model.memory_layers.config import AssociativeConfig, FeaturalConfig
from engine.model.memory_layers.featural import FeaturalMemory
from engine.model.memory_layers.product_keys import ProductKeys
from engine.model.memory_layers.ste import StraightThrough, straight_through

__all__ = [
    "AssociativeConfig",
    "FeaturalConfig",
    "FeaturalMemory",
    "ProductKeys",
    "StraightThrough",
    "straight_through",
]
