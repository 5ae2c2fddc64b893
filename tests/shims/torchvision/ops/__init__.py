"""Test-only shim: torchvision.ops (placeholders)."""
from torchvision._placeholder import module_getattr

__getattr__ = module_getattr("ops")
