"""Tests of knnclip.engine.text."""
