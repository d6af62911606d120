"""Tests of knnclip.engine.video."""
