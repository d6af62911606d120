"""Tests of knnclip.engine.eval."""
