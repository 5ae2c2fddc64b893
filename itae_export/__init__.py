"""itae-export: ITAE-patched vision transformers, exported to ONNX.

Importing this package is cheap: torch and onnxruntime load only when a
function that needs them is called.
"""

from itae_export.errors import (
    CheckpointError,
    DownloadError,
    InputError,
    ITAEError,
    ToleranceError,
    UnknownModelError,
)
from itae_export.registry import ITAEOptions, ModelSpec, get_model_spec, list_models

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "CheckpointError",
    "DownloadError",
    "ITAEError",
    "ITAEOptions",
    "InputError",
    "OptionError",
    "OutputError",
    "ModelSpec",
    "ToleranceError",
    "UnknownModelError",
    "get_model_spec",
    "list_models",
]
