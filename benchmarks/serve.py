"""Load on ``knnclip serve``: throughput and p50/p99 latency against the number of concurrent
clients, the gain from dynamic batching, and the shed rate under overload, for the embedded server
and for Ray Serve: ``python benchmarks/serve.py [--seconds 6] [--levels 1 2 4 8 16 32]``.

Each server is a real ``knnclip serve`` subprocess on loopback over the demo's seeded models
(FC-CLIP at 192x256, a ViT-S-like DINOv2) and a database of the synthetic classes. Clients are
closed loops on one asyncio event loop (httpx), each sending the next 192x256 PNG as soon as the
last reply came; every level runs ``--seconds``. Servers and clients share this machine's cores,
so the figures are for a server under its own load generator. Servers:

- ``embedded batch=4``: the default (``--max-batch 4 --max-wait-ms 10``);
- ``embedded batch=1``: dynamic batching off (``--max-batch 1``), for the gain from batching;
- ``ray 2 replicas``: ``--ray --replicas 2`` (skipped without Ray);
- ``overload``: embedded, ``--max-queue 4``, 64 clients: how much is shed with 503 + Retry-After.

Writes ``results/serve.json`` and ``.md``.

``python benchmarks/serve.py --follow`` measures instead what it costs a replica to follow the
owner's changes (``results/serve-follow.json``, ``.md``):

- per change, at 10^5 and 10^6 entries (flat fp16): the time and bytes of ``Database.follow`` on
  a read-only handle after the writer logs one change (a class of 10 entries; every fifth change
  followed by a checkpoint), against reopening the database read-only, as replicas did before;
- on Ray Serve with 2 replicas under closed-loop load: the time from a class being acknowledged
  by ``POST /v1/classes`` until a reply from each replica uses it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine, write_json, write_text

from knnclip.engine.bench.harness import percentiles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self, models: Path, db: Path, log: Path, *args: str, ray: bool = False, token: str | None = None
    ) -> None:
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "knnclip.engine.cli",
            "serve",
            "--models",
            str(models),
            "--db",
            str(db),
            "--device",
            "cpu",
            "--port",
            str(self.port),
            *args,
        ]
        self.log = log.open("wb")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        from knnclip.engine.serve.client import Client

        with Client(self.url, token) as client:
            client.wait_ready(timeout=240)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


async def load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    codes: dict[int, int] = {}
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:

        async def client(i: int) -> None:
            n = i
            while time.perf_counter() < end:
                start = time.perf_counter()
                reply = await http.post("/v1/segment", content=bodies[n % len(bodies)])
                codes[reply.status_code] = codes.get(reply.status_code, 0) + 1
                if reply.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                elif reply.status_code == 503:
                    await asyncio.sleep(0.05)  # a polite client backs off a little (not Retry-After: we measure)
                n += clients

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    total = sum(codes.values())
    row: dict[str, Any] = {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "ok": codes.get(200, 0),
        "shed": codes.get(503, 0),
        "other": total - codes.get(200, 0) - codes.get(503, 0),
        "throughput_rps": codes.get(200, 0) / elapsed,
        "shed_rate": codes.get(503, 0) / total if total else 0.0,
    }
    if latencies:
        p = percentiles(latencies)
        row.update(p50_ms=p["p50"] * 1000, p99_ms=p["p99"] * 1000)
    return row


def follow_cost(size: int, changes: int, work: Path) -> dict[str, Any]:
    """Follow against reopen, per change, on a flat fp16 database of ``size`` random entries."""
    import numpy as np

    from knnclip.engine import Database

    dim, rng = 1536, np.random.default_rng(size)
    path = work / f"follow-{size}"
    with Database.create(path, dim) as writer:
        writer.auto_checkpoint_bytes = 1 << 40  # one checkpoint at the end, not one per 256 MiB
        writer.add_class("base")
        for lo in range(0, size, 50_000):
            n = min(50_000, size - lo)
            writer.add(rng.standard_normal((n, dim), dtype=np.float32), np.zeros(n, np.int64))
    writer = Database.open(path)
    follower = Database.open(path, read_only=True)
    follows, reopens = [], []
    try:
        for i in range(changes):
            writer.add(rng.standard_normal((10, dim), dtype=np.float32), [f"class{i}"] * 10)
            if i % 5 == 4:
                writer.checkpoint()
            start = time.perf_counter()
            result = follower.follow()
            follows.append((time.perf_counter() - start, result.bytes_read, result.records, result.reloaded))
            assert follower.lsn == writer.lsn
            if i < 5:  # reopening costs seconds at 10^6: five are enough
                start = time.perf_counter()
                with Database.open(path, read_only=True) as reopened:
                    read = reopened.stats()["disk_bytes"]
                reopens.append((time.perf_counter() - start, read))
    finally:
        follower.close()
        writer.close()
    f_times = percentiles([f[0] for f in follows])
    r_times = percentiles([r[0] for r in reopens])
    return {
        "entries": size,
        "changes": changes,
        "follow_p50_ms": f_times["p50"] * 1e3,
        "follow_p99_ms": f_times["p99"] * 1e3,
        "follow_bytes_per_change": float(np.mean([f[1] for f in follows])),
        "follow_reloads": sum(f[3] for f in follows),
        "reopen_p50_ms": r_times["p50"] * 1e3,
        "reopen_bytes": float(np.mean([r[1] for r in reopens])),
    }


async def propagation(url: str, token: str, bodies: list[bytes], adds: int, clients: int) -> dict[str, Any]:
    """Seconds from a class's acknowledgement until a reply from each replica lists it."""
    import httpx

    replies: list[tuple[float, str, set[str]]] = []  # (time the reply came, replica, class names)
    stop = asyncio.Event()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as http:

        async def client(i: int) -> None:
            n = i
            while not stop.is_set():
                reply = await http.post("/v1/segment", content=bodies[n % len(bodies)])
                if reply.status_code == 200:
                    body = reply.json()
                    replies.append((time.perf_counter(), body["replica"], {c for c in body["classes"] if c}))
                n += clients

        workers = [asyncio.create_task(client(i)) for i in range(clients)]
        delays: list[float] = []
        replicas: set[str] = set()
        try:
            await asyncio.sleep(3.0)  # both replicas warm and answering
            replicas = {r[1] for r in replies}
            for i in range(adds):
                name = f"probe{i}"
                reply = await http.post("/v1/classes", json={"name": name})
                reply.raise_for_status()
                acknowledged = time.perf_counter()
                deadline = acknowledged + 30
                seen: dict[str, float] = {}
                while len(seen) < len(replicas) and time.perf_counter() < deadline:
                    for when, replica, names in list(replies):
                        if when >= acknowledged and name in names and replica not in seen:
                            seen[replica] = when - acknowledged
                    await asyncio.sleep(0.005)
                delays += [seen.get(r, float("inf")) for r in replicas]
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
    p = percentiles(delays)
    return {
        "replicas": len(replicas),
        "adds": adds,
        "clients": clients,
        "p50_s": p["p50"],
        "p99_s": p["p99"],
        "max_s": max(delays),
    }


def follow_main(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from knnclip.engine.demo.run import DemoSettings, build_database, build_models
    from knnclip.engine.demo.synthetic import make_split

    report: dict[str, Any] = {"machine": machine(), "follow": [], "propagation": None}
    with tempfile.TemporaryDirectory(prefix="knnclip-follow-bench-") as work_dir:
        work = Path(work_dir)
        for size in args.follow_sizes:
            row = follow_cost(size, 20, work)
            print(row, flush=True)
            report["follow"].append(row)
        try:
            import ray  # noqa: F401 - is the ray extra installed?
        except ImportError:
            print("ray is not installed: the propagation row is skipped")
            args.no_ray = True
        if not args.no_ray:
            bodies = []
            for s in make_split(8, seed=21):
                buf = io.BytesIO()
                Image.fromarray(np.asarray(s.image)).save(buf, format="PNG")
                bodies.append(buf.getvalue())
            models = build_models(DemoSettings(out=work), say=print)
            build_database(models, work / "db", make_split(8, seed=1), text_cache=work / "text")
            token = "bench-token-0123456789abcdef"
            (work / "token").write_text(token)
            os.chmod(work / "token", 0o600)  # a token file others can read is refused
            flags = ("--ray", "--replicas", "2", "--max-batch", "4", "--token-file", str(work / "token"))
            server = Server(models, work / "db", work / "ray.log", *flags, ray=True, token=token)
            try:
                report["propagation"] = asyncio.run(propagation(server.url, token, bodies, 20, 2))
                print(report["propagation"], flush=True)
            finally:
                server.stop()
    write_json("serve-follow", report)
    write_text("serve-follow.md", follow_markdown(report))


def follow_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# Following the owner's changes ({m.get('cpu', '?')}, {m.get('cores', '?')} cores): "
        "`python benchmarks/serve.py --follow`",
        "",
        "Per change: a class of 10 entries added by the writer (every fifth change followed by a checkpoint), "
        "then `Database.follow()` on a read-only handle, against opening the database read-only again "
        "(what replicas did before). flat fp16, 1536-d.",
        "",
        "| entries | follow p50 ms | follow p99 ms | bytes read per change | reloads | reopen p50 ms "
        "| reopen bytes | reopen / follow time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["follow"]:
        lines.append(
            f"| {r['entries']:,} | {r['follow_p50_ms']:.2f} | {r['follow_p99_ms']:.2f} "
            f"| {r['follow_bytes_per_change']:,.0f} | {r['follow_reloads']} | {r['reopen_p50_ms']:.0f} "
            f"| {r['reopen_bytes']:,.0f} | {r['reopen_p50_ms'] / r['follow_p50_ms']:,.0f}x |"
        )
    p = report["propagation"]
    if p:
        lines += [
            "",
            f"Ray Serve, {p['replicas']} replicas, {p['clients']} closed-loop clients: {p['adds']} classes added "
            "through `POST /v1/classes`; seconds from each acknowledgement until a reply from each replica "
            f"lists the class: p50 {p['p50_s']:.2f} s, p99 {p['p99_s']:.2f} s, max {p['max_s']:.2f} s "
            "(a reply that lists it was served by a batch that started after the add, so these include "
            "one request's own latency).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--follow", action="store_true", help="measure following instead (results/serve-follow)")
    parser.add_argument("--follow-sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    if args.follow:
        follow_main(args)
        return

    import numpy as np
    from PIL import Image

    from knnclip.engine.demo.run import DemoSettings, build_database, build_models
    from knnclip.engine.demo.synthetic import make_split

    bodies = []
    for s in make_split(8, seed=21):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(s.image)).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="knnclip-serve-bench-") as work_dir:
        work = Path(work_dir)
        models = build_models(DemoSettings(out=work), say=print)
        build_database(models, work / "db", make_split(8, seed=1), text_cache=work / "text")
        servers = {
            "embedded batch=4": (("--max-batch", "4", "--max-wait-ms", "10", "--max-queue", "64"), False),
            "embedded batch=1": (("--max-batch", "1", "--max-queue", "64"), False),
        }
        try:
            import ray

            if not args.no_ray:
                servers["ray 2 replicas"] = (
                    ("--ray", "--replicas", "2", "--max-batch", "4", "--max-queue", "64"),
                    True,
                )
        except ImportError:
            print("ray is not installed: the Ray Serve rows are skipped")
        for name, (flags, ray) in servers.items():
            print(f"{name}: starting")
            server = Server(models, work / "db", work / f"{name.replace(' ', '_')}.log", *flags, ray=ray)
            try:
                asyncio.run(load(server.url, bodies, 2, 2.0))  # warm-up
                results[name] = []
                for clients in args.levels:
                    row = asyncio.run(load(server.url, bodies, clients, args.seconds))
                    results[name].append(row)
                    print(
                        f"  {clients:>3} clients: {row['throughput_rps']:.2f} req/s, "
                        f"p50 {row.get('p50_ms', 0):.0f} ms, p99 {row.get('p99_ms', 0):.0f} ms, "
                        f"shed {row['shed_rate']:.1%}"
                    )
            finally:
                server.stop()
        print("overload: starting")
        server = Server(models, work / "db", work / "overload.log", "--max-batch", "4", "--max-queue", "4")
        try:
            results["overload (queue 4)"] = [asyncio.run(load(server.url, bodies, 64, args.seconds))]
            with __import__("httpx").Client(base_url=server.url) as http:
                healthy_after = http.get("/healthz").status_code == 200
        finally:
            server.stop()
    report = {
        "machine": machine(),
        "seconds_per_level": args.seconds,
        "image": "192x256 PNG",
        "results": results,
        "healthy_after_overload": healthy_after,
    }
    write_json("serve", report)
    write_text("serve.md", markdown(report))


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# knnclip serve under load ({m.get('cpu', '?')}, {m.get('cores', '?')} cores): `python benchmarks/serve.py`",
        "",
        f"Closed-loop clients on loopback, {report['seconds_per_level']:g} s per level, {report['image']} images, the "
        "demo's seeded models; the load generator shares the server's cores. Latency of successful requests.",
        "",
        "| server | clients | req/s | p50 ms | p99 ms | shed (503) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in report["results"].items():
        for r in rows:
            p50, p99 = r.get("p50_ms", float("nan")), r.get("p99_ms", float("nan"))
            lines.append(
                f"| {name} | {r['clients']} | {r['throughput_rps']:.2f} | {p50:.0f} | {p99:.0f} | "
                f"{r['shed_rate']:.1%} |"
            )
    batched, single = report["results"].get("embedded batch=4"), report["results"].get("embedded batch=1")
    if batched and single:
        lines += ["", "Gain from dynamic batching (batch=4 over batch=1 throughput, same clients):", ""]
        for b, s in zip(batched, single, strict=True):
            if s["throughput_rps"]:
                lines.append(f"- {b['clients']} clients: {b['throughput_rps'] / s['throughput_rps']:.2f}x")
    lines += ["", f"`/healthz` answered 200 after the overload run: {report['healthy_after_overload']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
