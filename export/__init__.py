"""edgead export: a training checkpoint -> one ONNX graph (preprocessing, quantile
normalization and the PUAD score fused in) + sidecar, and TensorRT engines from it."""
