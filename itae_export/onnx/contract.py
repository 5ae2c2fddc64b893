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
# the in-graph preprocessing variant (itae_export.onnx.preprocess_graph): uint8 [batch, h, w, 3] RGB
IMAGE_INPUT_NAME = "image"
IN_GRAPH_SUFFIX = "_image"  # model.onnx -> model_image.onnx

# the CLIP text tower (itae-search export-text): token ids in, the joint-space embedding out
TEXT_INPUT_NAME = "input_ids"  # int64 [batch, TEXT_CONTEXT_LENGTH]
TEXT_OUTPUT_EMBEDDING = "text_embedding"  # float32 [batch, E], not normalised
TEXT_CONTEXT_LENGTH = 77
TEXT_ONNX_NAME, TEXT_MANIFEST_NAME = "text.onnx", "text.json"  # in the export folder, beside vocab.json, merges.txt

# the manifest, stored in metadata_props under METADATA_KEY and beside the graph as <stem>.json
METADATA_KEY = "itae.manifest"
MANIFEST_SCHEMA = 1
MANIFEST_SUFFIX = ".json"

PRECISIONS = ("fp32", "fp16")
QUANTIZATIONS = ("int8",)
MAX_BATCH = 4096  # the dynamic batch axis of the exported graph: 1..MAX_BATCH
# weights above this many bytes go to an external data file (protobuf's hard limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data
# an export is staged in a hidden folder .<stem>.<random>.tmp beside the output, then moved into place
STAGING_SUFFIX = ".tmp"
STAGING_OWNER = "owner.pid"  # inside a staging folder: the exporting process; gone -> the folder is stale

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
