"""Tests of knnclip.engine.demo."""
