"""Everything ONNX: the contract (names, opset, bounds, tolerances), the ``itae`` functions, export,
validation against PyTorch, optimisation and quantisation, and the manifest."""
