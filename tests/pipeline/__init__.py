"""Tests of knnclip.engine.pipeline."""
