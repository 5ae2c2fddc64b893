"""The ``itae`` ONNX domain and the export settings, in one place."""

ITAE_DOMAIN = "itae"
ITAE_DOMAIN_VERSION = 1
ONNX_OPSET = 18  # the opset of the main graph and of the function bodies

# fp32 validation: max |onnx - torch| / max |torch| of the embedding, and mask agreement.
FP32_REL_TOL = 1e-4
# fp16: documented in docs/onnx-contract.md ("Validation"); NaN or inf always fails.
FP16_REL_TOL = 2e-2
FP16_MIN_COSINE = 0.999
FP16_MAX_MASK_MISMATCH = 0.005  # share of tokens whose artifact flag may flip near theta
# int8 (--quantize int8): the K-Means assignments of real images, fp32 against int8, must agree
INT8_MIN_ARI = 0.95
