"""Tests of knnclip.engine.serve."""
