"""The service against hostile clients (the second red-team round): slow and idle connections,
bodies sent without a token, inputs built to exhaust memory or recursion, names built to confuse,
and a disk that refuses a snapshot. Each is answered with a specific 4xx/5xx, fast, and the
server keeps serving."""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from knnclip.engine import Database
from knnclip.engine.database.wal import HEADER_BYTES
from knnclip.engine.demo.run import build_database
from knnclip.engine.demo.synthetic import make_split
from knnclip.engine.serve.service import ReadWriteLock
from tests.support.serve_helpers import TOKEN, ServerProcess, answers_ok, token_file

SIZE = (96, 128)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def seeded_db(demo_models, tmp_path_factory) -> Path:
    return build_database(demo_models, tmp_path_factory.mktemp("hostile-db") / "db", make_split(4, seed=1, size=SIZE))


@pytest.fixture(scope="module")
def server(demo_models, seeded_db, tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    shutil.copytree(seeded_db, work / "db")
    (work / "not-a-folder").write_text("a file where the snapshots should go")
    args = (
        "--token-file",
        str(token_file(work)),
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--max-connections",
        "16",
        "--snapshot-dir",
        str(work / "not-a-folder" / "snapshots"),
    )
    with ServerProcess(demo_models, work / "db", *args, env={"KNNCLIP_MASK_BUDGET_BYTES": str(64 << 20)}) as proc:
        yield proc


def raw(url: str, request: bytes, wait: float = 10.0) -> bytes:
    """Send ``request`` as it is and read until the server closes or ``wait`` passes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else 0


def png(pixels: np.ndarray, info: PngImagePlugin.PngInfo | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_split(1, seed=9, size=SIZE)[0].image


class TestSlowAndIdleClients:
    def test_headers_that_never_finish_get_408_and_the_connection_closes(self, server):
        start = time.monotonic()
        reply = raw(server.url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and nothing more
        assert status_of(reply) == 408 and time.monotonic() - start < 8, reply
        assert httpx.get(f"{server.url}/healthz").status_code == 200

    def test_a_kept_alive_connection_that_starts_a_request_and_stalls_gets_408(self, server):
        """After a whole request on a kept-alive connection, half of the next one starts the deadline anew."""
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while b"\r\n\r\n" not in first:  # the whole response: its head, then as many bytes as it says
                first += sock.recv(65536)
            head, body = first.split(b"\r\n\r\n", 1)
            length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
            while len(body) < length:
                body += sock.recv(65536)
            assert status_of(first) == 200 and len(body) == length, first
            start = time.monotonic()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # and nothing more
            second = b""
            while chunk := sock.recv(65536):
                second += chunk
        assert status_of(second) == 408 and time.monotonic() - start < 4, second

    def test_a_body_trickled_past_its_deadline_gets_408(self, server):
        start = time.monotonic()
        reply = raw(server.url, b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789")
        assert status_of(reply) == 408 and b"BodyTimeout" in reply and time.monotonic() - start < 8, reply

    def test_connections_past_the_cap_get_503_and_the_cap_frees_itself(self, server):
        host, port = server.url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(24)]
        try:
            for sock in held:
                sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a request each
            time.sleep(0.3)
            refused = 0
            for sock in held[16:]:
                sock.settimeout(5)
                refused += status_of(sock.recv(4096)) == 503
            assert refused >= 6, refused
        finally:
            for sock in held:
                sock.close()
        # the header deadline closes the rest; health answers again
        assert answers_ok(f"{server.url}/healthz", 10), "/healthz did not answer once the idle connections were gone"

    def test_invented_methods_do_not_become_metric_series(self, server):
        for method in (b"FOOBAR", b"ZZTOP"):
            raw(server.url, method + b" /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", wait=2)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "FOOBAR" not in metrics and "ZZTOP" not in metrics


class TestNothingBeforeTheToken:
    def test_a_change_without_a_token_is_refused_before_its_body_is_read(self, server):
        start = time.monotonic()  # 16 MiB announced and never sent: only the headers can decide
        head = (
            b"POST /v1/classes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 16777216\r\n\r\n"
        )
        reply = raw(server.url, head + b'{"name": "', wait=5)
        assert status_of(reply) == 401 and time.monotonic() - start < 3, reply

    def test_a_png_with_a_flood_of_text_chunks_is_refused_from_its_structure(self, server, image):
        info = PngImagePlugin.PngInfo()
        for i in range(2000):
            info.add_text(f"k{i}", "v")
        start = time.monotonic()
        reply = httpx.post(f"{server.url}/v1/segment", content=png(image, info))
        assert reply.status_code == 400 and "chunks" in reply.json()["error"]["message"]
        assert time.monotonic() - start < 5


def examples(server, masks: bytes, classes: str, filename: str = "m.npz", image: bytes | None = None):
    files = {"image": ("i.png", image or png(np.zeros((*SIZE, 3), np.uint8))), "masks": (filename, masks)}
    return httpx.post(f"{server.url}/v1/examples", headers=AUTH, files=files, data={"classes": classes}, timeout=60)


def npz_of(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


class TestBoundedExamples:
    def test_a_small_npz_of_huge_masks_is_refused_before_decompressing(self, server):
        body = npz_of(masks=np.zeros((16384, 128, 128), bool))  # 420 kB compressed, 256 MiB as masks
        assert len(body) < 1 << 20
        reply = examples(server, body, json.dumps(["x"] * 16384))
        assert reply.status_code in (400, 413), reply.text
        assert reply.status_code == 413 or "masks" in reply.json()["error"]["message"]

    def test_a_label_png_naming_every_pixel_is_refused_by_the_budget(self, server):
        """12,288 classes, one pixel each: 12,288 masks of 96x128 are 144 MiB, over the 64 MiB of
        this server's budget (KNNCLIP_MASK_BUDGET_BYTES), and are never made."""
        labels = np.arange(SIZE[0] * SIZE[1], dtype=np.uint16).reshape(SIZE)
        classes = json.dumps([f"c{i}" for i in range(labels.size)])
        reply = examples(server, png(labels), classes, filename="m.png")
        assert reply.status_code == 413 and reply.json()["error"]["type"] == "OutOfMemoryError", reply.text

    @pytest.mark.parametrize(
        ("body", "classes", "message"),
        [
            (npz_of(masks=np.array(True)), '["x"]', "dimensions"),
            (None, '["x"]', "not a .npy"),
            (npz_of(labels=np.zeros(SIZE, np.int64)), "[" * 50_000 + "]" * 50_000, "nested"),
        ],
        ids=["0-d masks", "member not npy", "deep json"],
    )
    def test_malformed_examples_are_400_not_500(self, server, body, classes, message):
        if body is None:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as archive:
                archive.writestr("masks.txt", "not an array")
            body = buf.getvalue()
        reply = examples(server, body, classes)
        assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text

    def test_a_chunked_multipart_body_over_the_limit_is_413(self, server):
        def chunks():
            yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n\r\n'
            for _ in range(40):
                yield b"\0" * (1 << 20)

        headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
        reply = httpx.post(f"{server.url}/v1/examples", headers=headers, content=chunks(), timeout=60)
        assert reply.status_code == 413, reply.text


class TestNamesAndDisks:
    def test_a_delete_names_one_class(self, server):
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            assert client.post("/v1/classes", json={"name": "keep me"}).status_code == 201
            reply = client.delete("/v1/classes/keep me,nonexistent")
            assert reply.status_code == 400 and "one class" in reply.json()["error"]["message"]
            assert "keep me" in {c["name"] for c in client.get("/v1/classes").json()["classes"]}

    def test_a_class_with_a_slash_can_be_deleted(self, server):
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            assert client.post("/v1/classes", json={"name": "indoor/outdoor"}).status_code == 201
            assert client.delete("/v1/classes/indoor%2Foutdoor").status_code == 200
            assert "indoor/outdoor" not in {c["name"] for c in client.get("/v1/classes").json()["classes"]}

    def test_a_snapshot_the_disk_refuses_is_507_and_the_database_is_unchanged(self, server):
        before = httpx.get(f"{server.url}/readyz").json()["entries"]
        reply = httpx.post(f"{server.url}/v1/snapshot", headers=AUTH)
        assert reply.status_code == 507 and reply.json()["error"]["type"] == "DatabaseWriteError", reply.text
        assert httpx.get(f"{server.url}/readyz").json()["entries"] == before


def test_readers_go_between_writers():
    """Phase-fair: with writers queued back to back, the readers waiting when one finishes go next."""
    lock = ReadWriteLock()
    order: list[str] = []
    lock.acquire_write()
    threads = [
        threading.Thread(target=lambda: (lock.acquire_write(), order.append("w"), lock.release_write()))
        for _ in range(3)
    ]
    threads += [threading.Thread(target=lambda: (lock.acquire_read(), order.append("r"), lock.release_read()))]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every thread is waiting on the lock now (nothing else can let them in)
    lock.release_write()
    for t in threads:
        t.join(10)
    assert order[0] == "r" and order.count("w") == 3, order


def test_a_token_file_that_is_not_text_is_one_line(demo_models, seeded_db, tmp_path):
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe" + b"\x80" * 40)
    token.chmod(0o600)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "knnclip.engine.cli",
            "serve",
            "--models",
            str(demo_models),
            "--db",
            str(tmp_path / "db"),
            "--token-file",
            str(token),
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "not UTF-8" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_sigterm_checkpoints(demo_models, seeded_db, tmp_path):
    db = shutil.copytree(seeded_db, tmp_path / "db")
    proc = ServerProcess(demo_models, db, "--token-file", str(token_file(tmp_path)))
    proc.wait_ready()
    assert httpx.post(f"{proc.url}/v1/classes", headers=AUTH, json={"name": "late"}).status_code == 201
    assert proc.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert (db / "wal.log").stat().st_size == HEADER_BYTES, "the log holds records: SIGTERM did not checkpoint"
    with Database.open(db, read_only=True) as reopened:
        assert "late" in reopened.classes
