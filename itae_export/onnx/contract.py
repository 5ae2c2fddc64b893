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
OUTPUT_EMBEDDING_UNPATCHED = "embedding_unpatched"  # optional: the CLS embedding without the ITAE edit
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
QUANTIZATIONS = ("int8", "int8-static")  # dynamic; static QDQ calibrated on real images
MAX_BATCH = 4096  # the dynamic batch axis of the exported graph: 1..MAX_BATCH
# weights above this many bytes go to an external data file (protobuf's hard limit is 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data
# an export is staged in a hidden folder .<stem>.<random>.tmp beside the output, then moved into place
STAGING_SUFFIX = ".tmp"
STAGING_OWNER = "owner.pid"  # inside a staging folder: the exporting process; gone -> the folder is stale

# Validation (docs/onnx-contract.md, "Validation"): the graph is judged against a float64 PyTorch
# run of the same model on the same inputs, and float32 PyTorch's own distance from that run sets
# how much of a distance float32 can be asked for.
#   embedding: max|onnx - torch64| / max|torch64| <= max(FP32_REL_TOL, FLOAT32_REACH * e32), where e32
#   is the same measure for float32 PyTorch (fp16: FP16_REL_TOL in place of FP32_REL_TOL).
FP32_REL_TOL = 1e-4
FLOAT32_REACH = 4.0  # the graph may be this many times as far from float64 as float32 PyTorch is
#   artifact mask: a token may land on the other side of theta than in float64 only if its float64
#   norm is within margin = theta * max(MIN_REL, FLOAT32_REACH * r32) of theta, r32 the largest
#   relative norm error of float32 PyTorch; an input's mask must be what Eq. 3-4 give for some such
#   choice of sides (a minority swap included). Every such flip is reported.
MASK_MARGIN_MIN_REL = 2.0**-18  # 64 float32 ulps: ONNX Runtime's norms differ from PyTorch's by a few
FP16_MASK_MARGIN_REL = 2e-2  # fp16: a norm may be as far off as the fp16 embedding may be (FP16_REL_TOL)
# fp16 embedding: FP16_REL_TOL as above, and cosine >= min(FP16_MIN_COSINE, 1 - FLOAT32_REACH * (1 - c32));
# NaN or inf always fails.
FP16_REL_TOL = 2e-2
FP16_MIN_COSINE = 0.999
# int8 (--quantize int8): the K-Means assignments of real images, fp32 against int8, must agree
INT8_MIN_ARI = 0.95


def external_data_name(onnx_name: str) -> str:
    """The external data file beside ``onnx_name`` (a file name, not a path)."""
    return onnx_name + EXTERNAL_DATA_SUFFIX
