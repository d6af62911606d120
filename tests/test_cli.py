"""The knnclip command as a user runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from knnclip import _C


def run(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("knnclip")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "knnclip.engine.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


class TestInfo:
    """Catches an info command that crashes or misreports the build."""

    def test_json_matches_build_info(self):
        result = run("info", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["knnclip"] == _C.build_info()
        assert report["devices"]["cuda_available"] == _C.cuda_available()
        assert report["backends"]["onnxruntime"]["installed"]
        assert "CPUExecutionProvider" in report["backends"]["onnxruntime"]["providers"]
        assert report["backends"]["faiss"]["installed"]

    def test_text(self):
        result = run("info")
        assert result.returncode == 0, result.stderr
        assert "compiled ops (knnclip._C)" in result.stdout
        assert _C.build_info()["cpu_isa"] in result.stdout


@pytest.mark.parametrize("args", [[], ["no-such-command"]])
def test_usage_errors_exit_2(args):
    assert run(*args).returncode == 2
