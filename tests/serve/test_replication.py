"""Replicas that share no file system with the owner: each starts from the owner's checkpoint,
shipped as one blob, in a directory of its own, then applies the owner's log records by sequence
number. In process here with real files; across Ray actors with a SIGKILLed owner in the slow test."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from knnclip.engine import Database
from knnclip.engine.database.shipping import pack_copy, unpack_copy
from knnclip.engine.errors import DatabaseCorruptError
from knnclip.engine.serve.replication import OwnerUnavailableError, ShippedReplica

DIM = 16


class Owner:
    """The owner's side in process: a writer, and a switch that makes it unreachable."""

    def __init__(self, path: Path) -> None:
        self.db = Database.create(path, DIM)
        self.up = True
        self.copies = 0

    def fetch_copy(self) -> bytes:
        if not self.up:
            raise OwnerUnavailableError("the owner is down")
        self.copies += 1
        return pack_copy(self.db)[0]

    def fetch_records(self, lsn: int) -> bytes | None:
        if not self.up:
            raise OwnerUnavailableError("the owner is down")
        return self.db.records_since(lsn)


def same_state(replica: Database, owner: Database) -> None:
    queries = np.random.default_rng(5).normal(size=(6, DIM))
    assert replica.lsn == owner.lsn and replica.vocabulary == owner.vocabulary
    assert replica.entries() == owner.entries()
    np.testing.assert_array_equal(replica.search(queries, 4).ids, owner.search(queries, 4).ids)


@pytest.fixture
def owner(tmp_path: Path):
    o = Owner(tmp_path / "owner" / "db")
    o.db.add(np.random.default_rng(1).normal(size=(40, DIM)), ["a"] * 20 + ["b"] * 20, sources="first.png")
    yield o
    o.db.close()


def test_a_replica_starts_from_the_shipped_checkpoint_in_its_own_directory(owner: Owner, tmp_path: Path) -> None:
    replica = ShippedReplica(tmp_path / "replica", owner.fetch_copy, owner.fetch_records)
    try:
        assert replica.db.path.parent == tmp_path / "replica", "the copy lives in the replica's directory"
        same_state(replica.db, owner.db)
        owner.db.add(np.ones((3, DIM)), ["c"] * 3)
        owner.db.rename_class("a", "alpha")
        result = replica.refresh()
        assert result is not None and result.records == 2 and not result.reloaded
        same_state(replica.db, owner.db)
        assert owner.copies == 1, "records, not another copy"
    finally:
        replica.close()


def test_a_replica_behind_the_owners_log_starts_again_from_the_latest_checkpoint(owner: Owner, tmp_path: Path) -> None:
    replica = ShippedReplica(tmp_path / "replica", owner.fetch_copy, owner.fetch_records)
    first = replica.db.path
    try:
        owner.db.add(np.ones((2, DIM)), ["c"] * 2)
        owner.db.checkpoint()  # the records after the replica's position are gone from the log
        owner.db.add(np.full((2, DIM), 2.0), ["d"] * 2)
        result = replica.refresh()
        assert result is not None and result.reloaded and owner.copies == 2
        same_state(replica.db, owner.db)
        assert not first.exists(), "the old copy is removed once the new one is in use"
    finally:
        replica.close()


def test_an_unreachable_owner_leaves_the_replica_serving_its_last_state(owner: Owner, tmp_path: Path) -> None:
    replica = ShippedReplica(tmp_path / "replica", owner.fetch_copy, owner.fetch_records)
    try:
        before = replica.db.classes
        owner.up = False
        owner.db.add(np.ones((1, DIM)), ["late"])
        assert replica.refresh() is None and replica.stale and "down" in replica.last_error
        assert replica.db.classes == before
        owner.up = True
        assert replica.refresh() is not None and not replica.stale
        same_state(replica.db, owner.db)
    finally:
        replica.close()


def test_damaged_records_make_the_replica_start_again(owner: Owner, tmp_path: Path) -> None:
    damage = {"on": False}

    def fetch_records(lsn: int) -> bytes | None:
        data = owner.fetch_records(lsn)
        if damage["on"] and data:
            data = data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:]
        return data

    replica = ShippedReplica(tmp_path / "replica", owner.fetch_copy, fetch_records)
    try:
        damage["on"] = True
        owner.db.add(np.ones((2, DIM)), ["c"] * 2)
        result = replica.refresh()
        assert result is not None and result.reloaded, "the damaged records were not applied: a fresh copy was"
        same_state(replica.db, owner.db)
    finally:
        replica.close()


def test_a_blob_with_foreign_or_damaged_files_is_refused(owner: Owner, tmp_path: Path) -> None:
    blob, _ = pack_copy(owner.db)
    # a member that is not a database file (here one that climbs out of the directory)
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(blob)) as src, tarfile.open(fileobj=buf, mode="w") as out:
        for member in src.getmembers():
            out.addfile(member, src.extractfile(member))
        evil = tarfile.TarInfo("../evil.sh")
        evil.size = 4
        out.addfile(evil, io.BytesIO(b"boom"))
    with pytest.raises(DatabaseCorruptError, match="evil"):
        unpack_copy(buf.getvalue(), tmp_path / "copy")
    assert not (tmp_path / "copy").exists() and not (tmp_path / "evil.sh").exists()
    # a flipped byte in the index: unpacked, but the open verifies every file's SHA-256
    data = bytearray(blob)
    at = data.find(b"IxF") if b"IxF" in data else len(data) // 2
    data[at + 40] ^= 0xFF
    with pytest.raises(DatabaseCorruptError):
        Database.open(unpack_copy(bytes(data), tmp_path / "copy2"), read_only=True)


@pytest.mark.slow
def test_ray_replicas_bootstrap_through_the_object_store_and_survive_a_killed_owner(tmp_path: Path) -> None:
    """An owner actor and two replica actors whose directories are separate: the replicas never
    open the owner's path. SIGKILL on the owner's process loses nothing it acknowledged; the
    replicas keep serving, report stale, and resume once a new owner opens the database."""
    ray = pytest.importorskip("ray", reason="the Ray actors need the ray extra (pip install 'knnclip[ray]')")

    @ray.remote
    class OwnerActor:
        def __init__(self, path: str) -> None:
            self.db = Database.open(path) if os.path.exists(path) else Database.create(path, DIM)

        def pid(self) -> int:
            return os.getpid()

        def add(self, n: int, name: str) -> int:
            return len(self.db.add(np.full((n, DIM), float(len(name))), [name] * n))

        def checkpoint(self) -> None:
            self.db.checkpoint()

        def copy(self) -> bytes:
            return pack_copy(self.db)[0]

        def records_since(self, lsn: int) -> bytes | None:
            return self.db.records_since(lsn)

    @ray.remote
    class ReplicaActor:
        def __init__(self, workdir: str) -> None:
            def call(method: str, *args: object) -> object:
                try:
                    owner = ray.get_actor("owner")
                    return ray.get(getattr(owner, method).remote(*args), timeout=10)
                except (ray.exceptions.RayError, ValueError) as exc:
                    raise OwnerUnavailableError(str(exc)) from None

            self.replica = ShippedReplica(
                workdir,
                lambda: call("copy"),
                lambda lsn: call("records_since", lsn),  # type: ignore[arg-type,return-value]
            )

        def refresh(self) -> tuple[bool, dict[str, int], str]:
            self.replica.refresh()
            return self.replica.stale, self.replica.db.classes, str(self.replica.db.path) + self.replica.last_error

    owner_dir = tmp_path / "owner"
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    try:
        owner = OwnerActor.options(name="owner", max_restarts=0).remote(str(owner_dir / "db"))
        assert ray.get(owner.add.remote(4, "cat")) == 4
        replicas = [ReplicaActor.remote(str(tmp_path / f"replica{i}")) for i in range(2)]
        for i, r in enumerate(replicas):
            stale, classes, path = ray.get(r.refresh.remote())
            assert not stale and classes == {"cat": 4}
            assert Path(path).parent == tmp_path / f"replica{i}" and not Path(path).is_relative_to(owner_dir)
        ray.get(owner.add.remote(2, "dog"))
        ray.get(owner.checkpoint.remote())
        ray.get(owner.add.remote(1, "eel"))
        assert all(ray.get(r.refresh.remote())[1] == {"cat": 4, "dog": 2, "eel": 1} for r in replicas)
        ray.get(owner.add.remote(3, "fox"))  # acknowledged, then the owner dies
        os.kill(ray.get(owner.pid.remote()), signal.SIGKILL)
        time.sleep(1.0)
        for r in replicas:
            stale, classes, _ = ray.get(r.refresh.remote())
            assert stale and classes == {"cat": 4, "dog": 2, "eel": 1}, "the last state applied, still served"
        del owner  # Ray keeps a dead actor's name while a handle to it lives
        deadline = time.monotonic() + 60
        while True:  # the owner is back, once Ray has seen the old one die and freed its name
            try:
                revived = OwnerActor.options(name="owner").remote(str(owner_dir / "db"))
                break
            except ray.exceptions.ActorAlreadyExistsError:
                assert time.monotonic() < deadline, "Ray never released the dead owner's name"
                time.sleep(0.5)
        ray.get(revived.pid.remote())  # opened the database (replaying its log)
        for r in replicas:
            stale, classes, why = ray.get(r.refresh.remote())
            assert not stale and classes == {"cat": 4, "dog": 2, "eel": 1, "fox": 3}, why
    finally:
        ray.shutdown()


def test_a_record_that_does_not_fit_the_copy_is_refused_and_stops_it(owner: Owner, tmp_path: Path) -> None:
    from knnclip.engine.database.wal import RecordKind, encode_record

    with Database.open(unpack_copy(pack_copy(owner.db)[0], tmp_path / "copy"), read_only=True) as replica:
        misfit = encode_record(replica.lsn + 1, RecordKind.REMOVE_CLASS, {"class_id": 999})
        with pytest.raises(DatabaseCorruptError, match="record .* cannot be applied"):
            replica.apply_records(misfit)
        assert replica.state.value == "failed"
