"""``knnclip serve``: the segmentation service (docs/serving.md), embedded or on Ray Serve."""

from __future__ import annotations

import argparse
from pathlib import Path


def _settings(args: argparse.Namespace):
    from knnclip.engine.cli.common import retrieval_config
    from knnclip.engine.serve.service import ServeSettings

    return ServeSettings(
        models=Path(args.models),
        db=Path(args.db),
        backend=args.backend,
        device=args.device,
        search=args.search,
        host=args.host,
        port=args.port,
        token_file=Path(args.token_file) if args.token_file else None,
        auth_reads=args.auth_reads,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        workers=args.workers,
        request_timeout_s=args.request_timeout,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_pixels=args.max_pixels,
        snapshot_dir=Path(args.snapshot_dir) if args.snapshot_dir else None,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        config=retrieval_config(args),
        ship_database=args.ship_database,
    )


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.ray:
        from knnclip.engine.serve.ray_app import serve_on_ray

        serve_on_ray(settings, replicas=args.replicas, address=args.ray_address)
        return 0
    from knnclip.engine.serve.server import configure_logging, serve

    configure_logging()
    serve(settings, graceful_s=args.graceful_timeout)
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    from knnclip.engine.cli.common import backend_options, search_option

    p = commands.add_parser(
        "serve",
        help="serve segmentation over HTTP (FastAPI + uvicorn; --ray for Ray Serve replicas)",
        description="Serve POST /v1/segment, the vocabulary endpoints, /healthz, /readyz and /metrics "
        "(docs/serving.md). Binds 127.0.0.1 unless --host says otherwise.",
    )
    backend_options(p)
    search_option(p)
    p.add_argument("--db", required=True, help="database directory (created when missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one and prints it)")
    p.add_argument("--token-file", help="file holding the bearer token that changes need (else $KNNCLIP_SERVE_TOKEN)")
    p.add_argument("--auth-reads", action="store_true", help="also require the token for segment, classes, health")
    p.add_argument("--max-batch", type=int, default=4, help="images per segment_batch call (default 4)")
    p.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill while another runs (default 10)"
    )
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting before 503s (default 32)")
    p.add_argument("--workers", type=int, default=1, help="batches run at once, in threads (default 1)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a request gets 504")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40e6)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers (else 408)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request's body (else 408)")
    p.add_argument("--max-connections", type=int, default=512, help="open connections before 503s (default 512)")
    p.add_argument("--snapshot-dir", help="where POST /v1/snapshot writes copies of the database")
    p.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests in flight")
    p.add_argument("--config", help="retrieval settings JSON (knnclip eval sweep --write-config)")
    ray = p.add_argument_group("Ray Serve (the 'ray' extra: pip install \".[ray]\")")
    ray.add_argument("--ray", action="store_true", help="deploy on Ray Serve instead of the embedded server")
    ray.add_argument("--replicas", type=int, default=1, help="segmenter replicas (default 1)")
    ray.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one, on 127.0.0.1)")
    replicas_db = ray.add_mutually_exclusive_group()
    replicas_db.add_argument(
        "--ship-database",
        dest="ship_database",
        action="store_const",
        const=True,
        help="replicas keep their own copy of the database, shipped from the owner through Ray's object store and "
        "kept current by its log records: no file system shared with the owner (the default with --ray-address)",
    )
    replicas_db.add_argument(
        "--shared-database",
        dest="ship_database",
        action="store_const",
        const=False,
        help="replicas follow the database's files (the default on a local instance; on a cluster, the directory "
        "must be on a file system every node shares)",
    )
    p.set_defaults(run=_serve)
