"""A TEST-ONLY stand-in for torchvision, so that timm and open_clip can be imported.

torchvision cannot work with this project's torch build (its C++ ops fail to register), and
timm / open_clip import it at module level for data pipelines and FrozenBatchNorm2d, which the
parity tests never use. This package provides only those import-time names, as placeholders
that raise when used. ``tests/refimpl.py::import_timm`` / ``import_open_clip`` put it on
``sys.path`` only when the real torchvision is not importable. It is never installed and
never used by the library.
"""

__version__ = "0.0.0+itae-test-shim"
IS_ITAE_TEST_SHIM = True
