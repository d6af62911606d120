"""The segmentation service: ``knnclip serve`` (FastAPI + uvicorn, one process) and the same HTTP
application on Ray Serve for more replicas and machines (``docs/serving.md`` is the contract).

- ``app.py``: the FastAPI application (routes, limits, errors, OpenAPI), over a ``Service``;
- ``service.py``: ``LocalService``, the engine behind the embedded server (segmenter, dynamic
  batching, the reader/writer discipline between segmentation and mutations);
- ``batcher.py``: gathers concurrent requests into ``segment_batch`` calls behind a bounded queue;
- ``encoding.py``: request decoding (images, masks) and response encoding (label-map RLE, PNG,
  COCO), and the HTTP status of each library error;
- ``auth.py``: bearer tokens; ``metrics.py``: the Prometheus metrics;
- ``server.py``: uvicorn, signals and draining; ``ray_app.py``: the Ray Serve deployments;
- ``client.py``: ``Client``, the Python client.

Nothing here is imported by ``knnclip.engine``; FastAPI, uvicorn, prometheus-client and Ray are
the ``serve`` and ``ray`` extras.
"""
