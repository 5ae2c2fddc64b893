"""Engines of the sharded embed stage: the local one (threads + one ONNX Runtime session) and Ray Data."""
