"""Tests of the compiled ops (knnclip._C, csrc/) and their Python face, knnclip.engine.ops."""
