"""Frames per second of ``knnclip segment VIDEO`` end to end (decode, segment, draw, encode, JSON
Lines), with decoding, inference and encoding overlapped (reader and writer threads) against the
same work one step after another in one thread: ``python benchmarks/video.py [--frames 48]``.

Clips are encoded here (H.264, 10 fps) from the synthetic dataset at two resolutions; the models
are the demo's seeded ones (FC-CLIP 192x256, DINOv2 ViT-S-like at 224), so the model time is
small and what the overlap saves is visible. Both modes run alternately, ``--rounds`` times each,
in one process. Writes ``results/video.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import machine, write_json, write_text

RESOLUTIONS = ((192, 256), (480, 640))


def encode_clip(path: Path, size: tuple[int, int], frames: int) -> None:
    import av

    from knnclip.engine.demo.synthetic import make_split

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for s in make_split(frames, seed=11, size=size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(s.image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from knnclip.engine import Segmenter
    from knnclip.engine.demo.run import DemoSettings, build_models
    from knnclip.engine.demo.synthetic import make_split
    from knnclip.engine.video.outputs import VideoOutputs
    from knnclip.engine.video.pipeline import segment_video
    from knnclip.engine.video.source import VideoSource

    rows = []
    with tempfile.TemporaryDirectory(prefix="knnclip-video-bench-") as work_dir:
        work = Path(work_dir)
        models = build_models(DemoSettings(out=work), say=print)
        train = make_split(8, seed=1)
        with Segmenter.from_dir(models, work / "db", device="cpu", text_cache=work / "text") as seg:
            seg.add_examples([s.image for s in train], [s.masks for s in train], [s.names for s in train])
            for size in RESOLUTIONS:
                clip = work / f"clip-{size[0]}x{size[1]}.mp4"
                encode_clip(clip, size, args.frames)
                fps: dict[str, list[float]] = {"overlapped": [], "serial": []}
                busy: dict[str, dict[str, float]] = {}
                segment_video(seg, VideoSource(str(clip)), None, batch_size=args.batch_size)  # warm-up
                for round_ in range(args.rounds):
                    for mode in ("overlapped", "serial"):
                        outputs = VideoOutputs(work / f"out-{mode}-{round_}", 10.0, "h264")
                        report = segment_video(
                            seg,
                            VideoSource(str(clip)),
                            outputs,
                            batch_size=args.batch_size,
                            overlap=mode == "overlapped",
                        )
                        assert report.frames_segmented == args.frames, report
                        fps[mode].append(report.fps)
                        busy[mode] = {k: round(v, 3) for k, v in report.busy_seconds.items()}
                row = {
                    "resolution": f"{size[1]}x{size[0]}",
                    "frames": args.frames,
                    "overlapped_fps": round(statistics.median(fps["overlapped"]), 2),
                    "serial_fps": round(statistics.median(fps["serial"]), 2),
                    "all_fps": {k: [round(v, 2) for v in vs] for k, vs in fps.items()},
                    "busy_seconds_last_round": busy,
                }
                row["speedup"] = round(row["overlapped_fps"] / row["serial_fps"], 2)
                rows.append(row)
                print(row)
    payload = {
        "machine": machine(),
        "command": "python benchmarks/video.py",
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "rows": rows,
    }
    write_json("video", payload)
    m = payload["machine"]
    lines = [
        f"# Video end to end ({m['cpu']}, {m['cores']} cores): `python benchmarks/video.py`",
        "",
        "Decode, segment (demo models), overlay, H.264 encode and JSON Lines per frame; median of "
        f"{args.rounds} alternating runs per mode, batch size {args.batch_size}. 'busy' is the time each "
        "stage spent working in the last run of each mode (s): overlapped, then serial.",
        "",
        "| source | frames | overlapped fps | serial fps | overlapped / serial | busy: decode, infer, write |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["busy_seconds_last_round"]
        busy = " / ".join(f"{b[m]['decode']}, {b[m]['infer']}, {b[m]['write']}" for m in ("overlapped", "serial"))
        lines.append(
            f"| {r['resolution']} | {r['frames']} | {r['overlapped_fps']} | {r['serial_fps']} | {r['speedup']}x | "
            f"{busy} |"
        )
    write_text("video.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
