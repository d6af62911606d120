"""Tests of knnclip.engine.backends."""
