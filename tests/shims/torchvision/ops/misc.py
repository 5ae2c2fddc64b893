"""Test-only shim: torchvision.ops.misc.FrozenBatchNorm2d (imported by timm and open_clip; unused by ViTs)."""
from torchvision._placeholder import module_getattr, placeholder

FrozenBatchNorm2d = placeholder("ops.misc.FrozenBatchNorm2d")
__getattr__ = module_getattr("ops.misc")
