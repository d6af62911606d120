"""knnclip export side: model definitions, checkpoint loaders and the ONNX export.

Imports torch. ``knnclip.engine`` reaches it only lazily: ``knnclip export`` and the torch backend
import it when they run (``tests/test_hygiene.py`` checks that importing the run time does not).
The TensorRT builder needs no torch and lives with its session in
``knnclip.engine.backends.tensorrt``.
"""
