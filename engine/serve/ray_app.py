"""The same HTTP application on Ray Serve: ``knnclip serve --ray [--replicas N]``.

Three deployments:

- ``Segmenters`` (``--replicas``, one GPU each where the cluster has GPUs): each opens the models and
  the database *read-only* and gathers requests with ``@serve.batch`` into ``segment_batch``.
  Before each batch a replica follows the owner's log (``Database.follow``): it applies the
  records appended since its last batch, in place, reading only them, so a class added through
  any request is used by the next batch of every replica, at a cost proportional to the change
  (a checkpoint does not make it reload). Backpressure is Ray's: ``max_ongoing_requests`` per
  replica and ``max_queued_requests`` (``--max-queue``) in front of them; past those the ingress
  answers 503 with ``Retry-After``.
- ``DatabaseOwner`` (one replica): the only writer; applies every mutation and returns after the
  database made it durable.
- ``Api``: the FastAPI application of :mod:`knnclip.engine.serve.app` behind ``@serve.ingress``,
  its routes calling the two others through a :class:`RayService`.

Ray is imported only here (the ``ray`` extra).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from knnclip.engine.errors import KnnclipError, ServiceError
from knnclip.engine.serve import encoding, mutations
from knnclip.engine.serve.service import (
    SegmentRequest,
    ServeSettings,
    class_list,
    segment_requests,
    snapshot_database,
)

log = logging.getLogger("knnclip.serve")


def _owner_call(owner: Any, method: str, *args: Any, timeout_s: float) -> Any:
    """A call to the DatabaseOwner deployment from a replica's worker thread; OwnerUnavailableError
    when it does not answer in ``timeout_s`` (it died and Ray Serve restarts it, or the network is
    down)."""
    from knnclip.engine.serve.replication import OwnerUnavailableError

    try:
        return getattr(owner, method).remote(*args).result(timeout_s=timeout_s)
    except KnnclipError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Ray raises for an unreachable owner
        raise OwnerUnavailableError(f"{type(exc).__name__}: {exc}") from None


def _error_marker(exc: BaseException) -> dict[str, Any]:
    """Errors cross Ray as data: library exceptions with their own constructors do not all pickle."""
    return encoding.error_body(exc)


def _raise_marked(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"error"}:
        e = value["error"]
        raise ServiceError(int(e["status"]), str(e["type"]), str(e["message"]))
    return value


class SegmenterReplica:
    """One segmenter over the database opened read-only, following the owner's log: on the
    shared file system, or (``ship_database``) in a copy of its own kept current through the
    owner's calls (:mod:`knnclip.engine.serve.replication`)."""

    def __init__(self, settings: ServeSettings, owner: Any = None) -> None:
        from ray import serve

        self.settings = settings
        self._shipped: Any = None
        self._segmenter: Any = None
        self._lock = threading.Lock()
        context = serve.get_replica_context()
        self.name = str(getattr(context.replica_id, "unique_id", context.replica_id))
        if not settings.ship_database:
            self._segmenter = self._open(settings.db, settings.search)
            return
        # The copy comes from the owner through a handle call, which must not block the event
        # loop that runs this constructor: it is fetched on a thread, and batches wait for it.
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        threading.Thread(target=self._start_shipped, args=(owner,), name="knnclip-bootstrap", daemon=True).start()

    def _open(self, database: Any, search: str) -> Any:
        from knnclip.engine.pipeline.segmenter import Segmenter

        s = self.settings
        return Segmenter.from_dir(
            s.models,
            database,
            backend=s.backend,
            device=s.device,
            config=s.config,
            read_only=True,
            text_cache=s.text_cache,
            search=search,
        )

    def _start_shipped(self, owner: Any) -> None:
        import tempfile

        from knnclip.engine.serve.replication import ShippedReplica

        try:
            shipped = ShippedReplica(
                tempfile.mkdtemp(prefix="knnclip-replica-"),
                lambda: _owner_call(owner, "database_copy", timeout_s=600),  # may be gigabytes
                lambda lsn: _owner_call(owner, "records_since", lsn, timeout_s=2),  # before every batch
                search=self.settings.search,
            )
            self._segmenter = self._open(shipped.db, "fp32")
            self._shipped = shipped
        except BaseException as exc:  # noqa: BLE001 - reported by every batch
            self._start_error = exc
        finally:
            self._started.set()

    def __del__(self) -> None:  # Ray Serve's hook when a replica shuts down
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._segmenter is not None:
                self._segmenter.close()
            if self._shipped is not None:
                self._shipped.close()

    def _fresh(self) -> Any:
        """The segmenter, its database brought up to the owner's last logged change."""
        if not self.settings.ship_database:
            self._segmenter.db.follow()
            return self._segmenter
        self._started.wait()
        if self._start_error is not None:
            raise ServiceError(503, "ReplicaStartFailed", f"the replica's copy of the database: {self._start_error}")
        before = self._shipped.db
        self._shipped.refresh()
        if self._shipped.db is not before:  # a fresh copy of the owner's checkpoint, swapped in whole
            self._segmenter = self._segmenter.with_database(self._shipped.db)
        return self._segmenter

    @property
    def stale(self) -> bool:
        """True while the owner could not be reached: the last state applied is served."""
        return self._shipped is not None and self._shipped.stale

    def _run(self, requests: list[SegmentRequest]) -> list[Any]:
        with self._lock:
            try:
                out = segment_requests(self._fresh(), requests, self.settings.max_batch)
            except KnnclipError as exc:
                out = [exc] * len(requests)
        payloads = []
        for item in out:
            if isinstance(item, BaseException):
                payloads.append(_error_marker(item))
            else:
                item["replica"] = self.name
                item["stale"] = self.stale
                payloads.append(item)
        return payloads

    async def segment(self, requests: list[SegmentRequest]) -> list[Any]:
        return await asyncio.to_thread(self._run, requests)


class DatabaseOwner:
    """The one writer: mutations, in order, acknowledged once durable."""

    def __init__(self, settings: ServeSettings) -> None:
        from knnclip.engine.pipeline.segmenter import Segmenter

        self.settings = settings
        self._seg = Segmenter.from_dir(
            settings.models,
            settings.db,
            backend=settings.backend,
            device="cpu",
            config=settings.config,
            text_cache=settings.text_cache,
        )
        self._lock = threading.Lock()

    def __del__(self) -> None:  # Ray Serve's hook when a replica shuts down: close the database cleanly
        with self._lock:
            self._seg.close()

    def _locked(self, change: Any) -> Any:
        with self._lock:
            try:
                return change()
            except KnnclipError as exc:
                return _error_marker(exc)

    def classes(self) -> Any:
        return self._locked(lambda: {"classes": class_list(self._seg.db), "entries": len(self._seg.db)})

    def add_class(self, name: str, synonyms: Sequence[str], thing: bool | None) -> Any:
        return self._locked(lambda: mutations.add_class(self._seg, name, synonyms, thing))

    def add_examples(self, image: bytes, masks: np.ndarray, names: list[str], things: dict | None) -> Any:
        return self._locked(lambda: mutations.add_examples(self._seg, image, masks, names, things))

    def add_concept(self, name: str, images: list[bytes], thing: bool | None, confidences: dict) -> Any:
        return self._locked(lambda: mutations.add_concept(self._seg, name, images, thing, confidences))

    def remove_class(self, name: str) -> Any:
        return self._locked(lambda: mutations.remove_class(self._seg, name))

    def entry_page(self, class_name: str | None, source: str | None, page: int, size: int) -> Any:
        return self._locked(lambda: mutations.entry_page(self._seg, class_name, source, page, size))

    def remove_source(self, source: str) -> Any:
        return self._locked(lambda: mutations.remove_source(self._seg, source))

    def remove_entry(self, entry_id: int) -> Any:
        return self._locked(lambda: mutations.remove_entry(self._seg, entry_id))

    def edit_class(self, name: str, new_name: str | None, merge_into: str | None) -> Any:
        return self._locked(lambda: mutations.edit_class(self._seg, name, new_name, merge_into))

    def snapshot(self) -> Any:
        return self._locked(lambda: snapshot_database(self._seg.db, self.settings.snapshot_dir))

    def database_copy(self) -> bytes:
        """The database's current state packed for a replica that shares no file system with it."""
        from knnclip.engine.database.shipping import pack_copy

        with self._lock:
            return pack_copy(self._seg.db)[0]

    def records_since(self, lsn: int) -> bytes | None:
        with self._lock:
            return self._seg.db.records_since(lsn)


class RayService:
    """The routes' :class:`~knnclip.engine.serve.routes.Service` over the two deployments' handles."""

    def __init__(self, segmenters: Any, owner: Any) -> None:
        self._segmenters, self._owner = segmenters, owner
        self._entries = 0
        self._stale: dict[str, bool] = {}  # by replica, as its last reply said

    ready = True
    load_error = None

    def queue_depth(self) -> int:
        return 0  # Ray Serve exports its own queue metrics

    def entries(self) -> int:
        return self._entries

    def stale_replicas(self) -> list[str]:
        return sorted(name for name, stale in self._stale.items() if stale)

    async def segment(self, request: SegmentRequest) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        from knnclip.engine.serve.batcher import Overloaded

        try:
            payload = await self._segmenters.segment.remote(request)
        except BackPressureError:
            raise Overloaded(None, 1) from None  # Ray's queue is full
        payload = _raise_marked(payload)
        self._stale[str(payload.get("replica"))] = bool(payload.pop("stale", False))
        return payload

    async def _owner_call(self, method: str, *args: Any) -> Any:
        reply = _raise_marked(await getattr(self._owner, method).remote(*args))
        if isinstance(reply, dict) and "entries" in reply:
            self._entries = int(reply["entries"])
        return reply

    async def classes(self) -> list[dict[str, Any]]:
        return (await self._owner_call("classes"))["classes"]

    async def add_class(self, name: str, synonyms: Sequence[str], thing: bool | None) -> dict[str, Any]:
        return await self._owner_call("add_class", name, list(synonyms), thing)

    async def add_examples(self, image: bytes, masks: np.ndarray, names: list[str], things: dict | None) -> Any:
        return await self._owner_call("add_examples", image, masks, names, things)

    async def add_concept(self, name: str, images: list[bytes], thing: bool | None, confidences: dict) -> Any:
        return await self._owner_call("add_concept", name, images, thing, confidences)

    async def remove_class(self, name: str) -> dict[str, Any]:
        return await self._owner_call("remove_class", name)

    async def entry_page(self, class_name: str | None, source: str | None, page: int, size: int) -> dict[str, Any]:
        return await self._owner_call("entry_page", class_name, source, page, size)

    async def remove_source(self, source: str) -> dict[str, Any]:
        return await self._owner_call("remove_source", source)

    async def remove_entry(self, entry_id: int) -> dict[str, Any]:
        return await self._owner_call("remove_entry", entry_id)

    async def edit_class(self, name: str, new_name: str | None, merge_into: str | None) -> dict[str, Any]:
        return await self._owner_call("edit_class", name, new_name, merge_into)

    async def snapshot(self) -> dict[str, Any]:
        return await self._owner_call("snapshot")


def build_application(settings: ServeSettings, *, replicas: int = 1, replica_gpus: float | None = None) -> Any:
    """The Ray Serve application (``serve.run`` it). ``replica_gpus`` defaults to one GPU per
    replica where the cluster has GPUs and the device is not ``cpu``."""
    import ray
    from ray import serve

    from knnclip.engine.serve.app import create_app
    from knnclip.engine.serve.auth import TokenAuth, load_token
    from knnclip.engine.serve.routes import attach_service

    if replica_gpus is None:
        has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
        replica_gpus = 1.0 if has_gpus and settings.device != "cpu" else 0.0
    auth = TokenAuth(load_token(settings.token_file), auth_reads=settings.auth_reads)
    app = create_app(
        None,
        auth=auth,
        max_body_bytes=settings.max_body_bytes,
        max_pixels=settings.max_pixels,
        body_timeout_s=settings.body_timeout_s,
    )

    shutdown = {"graceful_shutdown_timeout_s": 10.0, "graceful_shutdown_wait_loop_s": 0.5}
    segmenters = serve.deployment(
        name="Segmenters",
        num_replicas=replicas,
        max_ongoing_requests=2 * settings.max_batch,
        max_queued_requests=settings.max_queue,
        ray_actor_options={"num_cpus": 0 if replica_gpus else 1, "num_gpus": replica_gpus},
        **shutdown,
    )(_batched(SegmenterReplica, settings))
    owner = serve.deployment(name="DatabaseOwner", num_replicas=1, ray_actor_options={"num_cpus": 0}, **shutdown)(
        DatabaseOwner
    )

    @serve.deployment(name="Api", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}, **shutdown)
    @serve.ingress(app)
    class Api:
        def __init__(self, segmenters_handle: Any, owner_handle: Any) -> None:
            attach_service(app, RayService(segmenters_handle, owner_handle))

    owner_app = owner.bind(settings)
    return Api.bind(segmenters.bind(settings, owner_app), owner_app)  # type: ignore[attr-defined]  # Ray's decorator adds bind


def _batched(replica_class: type, settings: ServeSettings) -> type:
    """``replica_class`` with ``segment`` gathered by ``@serve.batch`` at the settings' sizes."""
    from ray import serve

    class Batched(replica_class):  # a subclass of a class given at run time
        @serve.batch(max_batch_size=settings.max_batch, batch_wait_timeout_s=settings.max_wait_ms / 1000.0)
        async def segment(self, requests: list[SegmentRequest]) -> list[Any]:
            return await replica_class.segment(self, requests)  # type: ignore[attr-defined]

    Batched.__name__ = Batched.__qualname__ = "SegmenterReplica"
    return Batched


# Ray turns a node address of 127.0.0.1 into the machine's interface address unless it runs
# single-machine: this switch (read when ray is imported) keeps every Ray port on loopback.
_LOCAL_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def serve_on_ray(settings: ServeSettings, *, replicas: int = 1, address: str | None = None) -> None:
    """Deploy on Ray Serve (a local Ray instance unless ``address``) and serve until SIGTERM/SIGINT.

    A local instance binds to 127.0.0.1: Ray's cluster ports are unauthenticated unless token
    authentication is on, and anyone who reaches them can run code (docs/serving.md)."""
    if address is None:
        os.environ[_LOCAL_RAY_ENV] = "0"
    try:
        import ray
        from ray import serve
    except ImportError:
        from knnclip.engine.errors import needs_extra

        raise needs_extra("knnclip serve --ray (Ray Serve)", "ray") from None
    _ensure_database(settings)
    if settings.ship_database is None:  # a cluster's nodes may share no file system with this one
        settings = dataclasses.replace(settings, ship_database=address is not None)
    ray.init(address=address, include_dashboard=False, log_to_driver=True, configure_logging=False)
    nodes = sorted({str(n["NodeManagerAddress"]) for n in ray.nodes()})
    if address is None and nodes != ["127.0.0.1"]:
        log.warning(
            "the local Ray instance runs on %s, not 127.0.0.1 (ray was imported before knnclip set %s=0)",
            nodes,
            _LOCAL_RAY_ENV,
        )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_application(settings, replicas=replicas), name="knnclip", route_prefix="/")
        print(
            f"knnclip serve: listening on http://{settings.host}:{settings.port} (Ray Serve; Ray nodes on "
            f"{', '.join(nodes)})",
            flush=True,
        )
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


def _ensure_database(settings: ServeSettings) -> None:
    """Create the database before the replicas open it read-only."""
    if os.path.exists(settings.db):
        return
    from knnclip.engine.pipeline.segmenter import Segmenter

    Segmenter.from_dir(settings.models, settings.db, backend=settings.backend, device="cpu", text_cache=None).close()
