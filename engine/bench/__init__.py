"""Benchmarks: ``knnclip bench`` (:mod:`.end_to_end`, the engine against the torch reference of
:mod:`.reference` on the models and database of :mod:`.build`) and the harness (:mod:`.harness`)
that it shares with the scripts in ``benchmarks/``."""
