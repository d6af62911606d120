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
    def __init__(self, models: Path, db: Path, log: Path, *args: str, ray: bool = False) -> None:
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

        with Client(self.url) as client:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()

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
