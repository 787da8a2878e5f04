"""edgead runtime: score camera frames with an exported model.

Needs only numpy, OpenCV and an inference engine (ONNX Runtime or TensorRT);
never imports torch, so it installs alone on a Jetson or a line PC.
"""
__version__ = "0.1.0"
