"""knnclip export side: model definitions, checkpoint loaders, ONNX export, TensorRT build.

Imports torch; never imported by knnclip.engine.
"""
