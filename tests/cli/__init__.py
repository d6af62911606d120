"""Tests of knnclip.engine.cli."""
