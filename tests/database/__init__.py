"""Tests of knnclip.engine.database."""
