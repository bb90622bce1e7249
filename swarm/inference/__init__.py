"""Running a variant: the manifest, ONNX Runtime, micro-batching, images, choice."""
