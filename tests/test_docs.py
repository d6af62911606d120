"""Every fenced Python example of README.md and docs/ runs, on the demo models and the parity
fixtures, in a folder holding the files it names; the shell examples of docs/serving.md run in
order against a real server. A renamed function, a missing import or a wrong argument in the docs
fails here."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from knnclip.engine.demo.synthetic import make_split
from tests.support.fixture_files import fixture_dir

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)


def examples(language: str) -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for i, match in enumerate(m for m in FENCE.finditer(path.read_text()) if m.group(1) == language):
            found.append((f"{path.relative_to(REPO)}#{i + 1}", match.group(2)))
    return found


PYTHON = examples("python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sample():
    return make_split(1, seed=3)[0]


def write_clip(path: Path, frames: int = 4) -> None:
    av = pytest.importorskip("av", reason="the video example needs PyAV (the video extra)")
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=5)
        stream.height, stream.width = 192, 256
        stream.pix_fmt = "yuv420p"
        for s in make_split(frames, seed=4):
            for packet in stream.encode(av.VideoFrame.from_ndarray(s.image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def hf_dinov2_config(official: dict) -> dict:
    """The Hugging Face config.json the DINOv2 loader reads beside a checkpoint (docs/models.md)."""
    return {
        "model_type": "dinov2_with_registers",
        "hidden_size": official["embed_dim"],
        "num_hidden_layers": official["depth"],
        "num_attention_heads": official["num_heads"],
        "mlp_ratio": official["mlp_ratio"],
        "patch_size": official["patch_size"],
        "image_size": official["img_size"],
        "num_register_tokens": official["num_register_tokens"],
        "use_swiglu_ffn": True,
        "layerscale_value": 1.0,
    }


@pytest.fixture
def workdir(tmp_path, monkeypatch, demo_models, sample):
    """A folder with what the examples name: models, photo.jpg, street.jpg, clip.mp4, checkpoints."""
    (tmp_path / "knnclip-demo").mkdir()
    (tmp_path / "knnclip-demo" / "models").symlink_to(demo_models)
    (tmp_path / "models").symlink_to(demo_models)
    Image.fromarray(sample.image).save(tmp_path / "photo.jpg")
    Image.fromarray(sample.image).save(tmp_path / "street.jpg")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def namespace(name: str, sample, workdir: Path) -> dict:
    """The variables an example leaves to the reader, made for it."""
    h, w = sample.image.shape[:2]
    masks = np.zeros((2, h, w), bool)
    masks[0, : h // 2], masks[1, h // 2 :] = True, True
    rng = np.random.default_rng(0)
    ns = {
        "image": sample.image,
        "masks": masks,
        "label_map": masks[1].astype(np.uint8),
        "embeddings": rng.standard_normal((3, 1536)).astype(np.float32),
        "queries": rng.standard_normal((2, 1536)).astype(np.float32),
    }
    if name.startswith("docs/models.md"):  # the fixtures stand in for the official checkpoints
        dino, fc = workdir / "dino", workdir / "fc"
        dino.mkdir(), fc.mkdir()
        shutil.copy(fixture_dir("dinov2") / "checkpoint.pth", dino / "dinov2_vitg14_reg4_pretrain.pth")
        official = json.loads((fixture_dir("dinov2") / "config.json").read_text())
        (dino / "config.json").write_text(json.dumps(hf_dinov2_config(official)))
        shutil.copy(fixture_dir("fcclip") / "checkpoint.pth", fc / "fcclip_cocopan.pth")
        shutil.copy(fixture_dir("fcclip") / "config.json", fc / "config.json")
        os.chdir(dino if "load_dinov2" in dict(PYTHON)[name] else fc)
        ns["images"] = (
            torch.randn(1, 3, 224, 224) if "load_dinov2" in dict(PYTHON)[name] else torch.randn(1, 3, 256, 320)
        )
    if name.startswith("docs/video.md"):
        write_clip(workdir / "clip.mp4")
    return ns


@pytest.mark.parametrize(("name", "code"), PYTHON, ids=[n for n, _ in PYTHON])
def test_python_example_runs(name, code, workdir, sample, demo_models):
    ns = namespace(name, sample, workdir)
    if name.startswith("docs/serving.md"):
        pytest.importorskip("fastapi", reason="the client example needs a server (the serve extra)")
        port = free_port()
        token = "doc-example-token-0123456789"
        (workdir / "token").write_text(token + "\n")
        (workdir / "token").chmod(0o600)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "knnclip.engine.cli",
                "serve",
                "--models",
                str(demo_models),
                "--db",
                "served.db",
                "--device",
                "cpu",
                "--port",
                str(port),
                "--token-file",
                "token",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}")
            exec(compile(code.replace("127.0.0.1:8080", f"127.0.0.1:{port}"), name, "exec"), ns)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
        return
    exec(compile(code, name, "exec"), ns)


def wait_ready(url: str, timeout: float = 120) -> None:
    from tests.support.serve_helpers import answers_ok

    assert answers_ok(f"{url}/readyz", timeout), f"{url} was not ready within {timeout} s"


def test_every_python_example_is_collected():
    assert len(PYTHON) >= 7 and {n.split("#")[0] for n, _ in PYTHON} >= {"README.md", "docs/serving.md"}


def serving_shell_steps() -> list[str]:
    """The commands of docs/serving.md's first shell block, continuation lines joined, comments dropped."""
    block = next(code for name, code in examples("bash") if name.startswith("docs/serving.md"))
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.split("  #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_serving_quick_start_runs_in_order(workdir, demo_models):
    """docs/serving.md's first block as a user runs it: the install line is skipped (the test
    environment has the extra), the server is started in the background on a free port."""
    pytest.importorskip("fastapi", reason="the quick start needs the serve extra")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = None
    replies = []
    try:
        for step in serving_shell_steps():
            step = step.replace("8080", str(port))
            if step.startswith("pip install"):
                continue
            if step.startswith("knnclip serve"):
                server = subprocess.Popen(
                    f"exec {step} --port {port} --device cpu",
                    shell=True,
                    cwd=workdir,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                wait_ready(f"http://127.0.0.1:{port}")
                continue
            if step.startswith("curl"):  # its body, then the status on a line of its own
                step = f"{step} -sS -w '\\n%{{http_code}}'"
            done = subprocess.run(
                ["bash", "-c", step], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, (step, done.stderr)
            if step.startswith("curl"):
                body, status = done.stdout.rsplit("\n", 1)
                replies.append((step, int(status), json.loads(body)))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    assert server is not None and [status for _, status, _ in replies] == [201, 200], replies
    added, segmented = replies[0][2], replies[1][2]
    assert added["name"] == "zebra" and "semantic" in segmented and segmented["segments"] is not None
