"""The export contract, in one place: graph names, opset, the ``itae`` domain, bounds, file
suffixes and validation tolerances. docs/onnx-contract.md is the prose of this module."""

ITAE_DOMAIN = "itae"
ITAE_DOMAIN_VERSION = 1
ONNX_OPSET = 18  # the opset of the main graph and of the function bodies

# graph names (inputs and outputs of every exported encoder)
INPUT_NAME = "pixel_values"
OUTPUT_EMBEDDING = "embedding"
OUTPUT_MASK = "artifact_mask"
OUTPUT_CLS_ATTENTION = "cls_attention"

# the manifest, stored in metadata_props under METADATA_KEY and beside the graph as <stem>.json
METADATA_KEY = "itae.manifest"
MANIFEST_SCHEMA = 1
MANIFEST_SUFFIX = ".json"

PRECISIONS = ("fp32", "fp16")
QUANTIZATIONS = ("int8", "int8-static")  # dynamic; static QDQ calibrated on real images
MAX_BATCH = 4096  # the dynamic batch axis of the exported graph: 1..MAX_BATCH
# weights above this many bytes go to an external data file (protobuf's hard limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data

# fp32 validation: max |onnx - torch| / max |torch| of the embedding, and mask agreement.
FP32_REL_TOL = 1e-4
# fp16: documented in docs/onnx-contract.md ("Validation"); NaN or inf always fails.
FP16_REL_TOL = 2e-2
FP16_MIN_COSINE = 0.999
FP16_MAX_MASK_MISMATCH = 0.005  # share of tokens whose artifact flag may flip near theta
# int8 (--quantize int8): the K-Means assignments of real images, fp32 against int8, must agree
INT8_MIN_ARI = 0.95


def external_data_name(onnx_name: str) -> str:
    """The external data file beside ``onnx_name`` (a file name, not a path)."""
    return onnx_name + EXTERNAL_DATA_SUFFIX
