"""Tests of knnclip.engine.bench."""
