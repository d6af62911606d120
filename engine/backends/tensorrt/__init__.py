"""The TensorRT backend: building an engine from an ONNX artefact (:mod:`.builder`), the cache of
built engines (:mod:`.cache`) and the session that runs one (:mod:`.session`). TensorRT and pycuda
are imported only when a function here runs."""
