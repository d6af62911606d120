"""Tests of knnclip.export: the models against the official code's fixtures, and their ONNX export."""
