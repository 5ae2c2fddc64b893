"""Test-only shim: torchvision.datasets (placeholders)."""
from torchvision._placeholder import module_getattr

__getattr__ = module_getattr("datasets")
