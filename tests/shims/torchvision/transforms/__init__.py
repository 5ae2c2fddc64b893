"""Test-only shim: torchvision.transforms (placeholder classes; InterpolationMode is a real enum)."""
from enum import Enum

from torchvision._placeholder import module_getattr


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


__getattr__ = module_getattr("transforms")
