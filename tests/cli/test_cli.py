"""The knnclip command as a user runs it: a real subprocess, real exit codes."""

from __future__ import annotations

import json
import os
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

    def test_openvino_and_autos_recorded_choices(self, tmp_path, monkeypatch):
        import importlib.util

        records = tmp_path / "engines" / "backend-choice"
        records.mkdir(parents=True)
        for i, backend in enumerate(["openvino", "onnxruntime", "openvino"]):
            (records / f"{i}.json").write_text(json.dumps({"backend": backend}))
        (records / "3.json").write_text("{damaged")
        os.mkfifo(records / "4.json")  # must not block
        monkeypatch.setenv("KNNCLIP_ENGINE_CACHE", str(tmp_path / "engines"))
        report = json.loads(run("info", "--json").stdout)
        assert report["backends"]["openvino"]["installed"] == (importlib.util.find_spec("openvino") is not None)
        assert report["auto_choices"]["chosen"] == {"openvino": 2, "onnxruntime": 1, "unreadable": 2}
        assert "auto on the CPU chose: onnxruntime 1, openvino 2, unreadable 2" in run("info").stdout

    def test_text(self):
        result = run("info")
        assert result.returncode == 0, result.stderr
        assert "compiled ops (knnclip._C)" in result.stdout
        assert _C.build_info()["cpu_isa"] in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["no-such-command"],
        ["segment", "x.png", "--out", "o"],  # neither --models/--db nor --server
        ["segment", "x.png", "--models", "m", "--out", "o"],  # --db missing
        ["db", "create", "x.db", "--dim", "8", "--param", "nlist"],  # NAME=VALUE expected
        ["db", "convert", "x.db", "y.db"],  # --index missing
        ["serve", "--models", "m", "--db", "d", "--ray", "--ship-database", "--shared-database"],  # one or the other
    ],
)
def test_usage_errors_exit_2(args, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "knnclip.engine.cli", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("fastapi", ["serve", "--models", "m", "--db", "d"], "serve"),
        ("av", ["segment", "clip.mp4", "--models", "m", "--db", "d", "--out", "o"], "video"),
        ("torch", ["demo", "--out", "d"], "export"),
    ],
)
def test_a_missing_optional_package_is_one_line_naming_its_extra(module, args, extra, tmp_path):
    """The package is made unimportable (None in sys.modules), as on an install without the extra."""
    code = f"import sys; sys.modules[{module!r}] = None; from knnclip.engine.cli import main; sys.exit(main({args!r}))"
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f'pip install ".[{extra}]"' in lines[0], lines[0]


class TestDb:
    """The db sub-commands end to end on real files, with the exit codes scripts rely on."""

    def test_create_add_remove_stats_check_snapshot(self, tmp_path):
        import numpy as np

        emb = tmp_path / "emb"
        emb.mkdir()
        rng = np.random.default_rng(0)
        np.save(emb / "a.npy", rng.normal(size=(6, 16)).astype(np.float32))
        (emb / "a.txt").write_text("cat\n" * 3 + "dog,puppy\n" * 3)
        np.save(emb / "b.npy", rng.normal(size=(2, 16)))
        np.save(emb / "b.labels.npy", np.array([0, 1]))
        db = str(tmp_path / "db")
        assert run("db", "create", db, "--dim", "16", "--storage", "fp32").returncode == 0
        added = run("db", "add", db, str(emb), "--json")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout) == {"added": 8, "files": 2, "classes": {"cat": 4, "dog": 4}}
        assert json.loads(run("db", "remove", db, "puppy", "--json").stdout) == {"removed": {"puppy": 4}}
        stats = json.loads(run("db", "stats", db, "--json").stdout)
        assert stats["entries"] == 4 and stats["class_counts"] == {"cat": 4} and stats["code_bytes_per_entry"] == 64
        assert run("db", "check", db).returncode == 0
        assert run("db", "snapshot", db, str(tmp_path / "snap")).returncode == 0
        assert json.loads(run("db", "stats", str(tmp_path / "snap"), "--json").stdout)["entries"] == 4
        converted = run("db", "convert", db, str(tmp_path / "hnsw"), "--index", "hnsw", "--param", "M=8", "--json")
        assert converted.returncode == 0, converted.stderr
        stats = json.loads(converted.stdout)
        assert (stats["index"], stats["params"]["M"], stats["entries"]) == ("hnsw", 8, 4)
        bad = run("db", "convert", db, str(tmp_path / "bad"), "--index", "ivf-rabitq", "--param", "store=cloud")
        assert bad.returncode != 0 and "store must be" in bad.stderr and not (tmp_path / "bad").exists()

    def test_remove_entries_rename_and_merge(self, tmp_path):
        import numpy as np

        from knnclip.engine import Database

        db = str(tmp_path / "db")
        with Database.create(db, 8, storage="fp32") as database:
            ids = database.add(np.random.default_rng(0).normal(size=(6, 8)), ["cat"] * 2 + ["dog"] * 2 + ["bird"] * 2)
            cat_id = database.vocabulary.find("cat").id
        removed = run("db", "remove-entries", db, str(ids[0]), "--json")
        assert json.loads(removed.stdout) == {"removed": 1, "entries": 5}, removed.stderr
        missing = run("db", "remove-entries", db, "999")
        assert missing.returncode == 1 and "no entries with ids 999" in missing.stderr
        renamed = json.loads(run("db", "rename", db, "cat", "feline", "--json").stdout)
        assert renamed == {"id": cat_id, "name": "feline", "synonyms": []}
        merged = run("db", "merge", db, "dog", "feline", "--json")
        assert json.loads(merged.stdout)["entries_moved"] == 2, merged.stderr
        with Database.open(db, read_only=True) as database:
            assert database.classes == {"feline": 3, "bird": 2}
            assert database.vocabulary.find("dog").id == cat_id
        clash = run("db", "rename", db, "feline", "bird")
        assert clash.returncode == 1 and "merge_classes" in clash.stderr
        with Database.open(db) as database:
            database.add(np.eye(8)[:3], ["bird"] * 3, sources="shot.png")
        listed = json.loads(run("db", "entries", db, "--source", "shot.png", "--json").stdout)["entries"]
        assert [(e["class_name"], e["source"], e["mask"]) for e in listed] == [
            ("bird", "shot.png", m) for m in range(3)
        ]
        assert (
            len(json.loads(run("db", "entries", db, "--class", "bird", "--limit", "4", "--json").stdout)["entries"])
            == 4
        )
        gone = json.loads(run("db", "remove-source", db, "shot.png", "--json").stdout)
        assert gone == {"source": "shot.png", "removed": 3, "entries": 5}

    def test_exit_codes(self, tmp_path):
        db = tmp_path / "db"
        assert run("db", "create", str(db), "--dim", "8").returncode == 0
        assert run("db", "create", str(db), "--dim", "8").returncode == 1, "exists"
        missing = run("db", "remove", str(db), "horse")
        assert missing.returncode == 1 and "no class named 'horse'" in missing.stderr
        assert run("db", "create", str(tmp_path / "x"), "--param", "nlist").returncode == 2, "a usage error"
        assert run("db", "frobnicate", str(db)).returncode == 2
        (db / "manifest.json").write_text("{}")
        corrupt = run("db", "check", str(db))
        assert corrupt.returncode == 3 and "manifest.json" in corrupt.stderr


class TestProgressWithoutATerminal:
    """Catches long work that prints nothing where standard error is a log file or a pipe."""

    def test_items_report_as_they_are_consumed(self, capsys, monkeypatch):
        from knnclip.engine.cli.progress import progress_items

        monkeypatch.setenv("KNNCLIP_PROGRESS_SECONDS", "0")
        assert list(progress_items(["a", "b", "c"], "segment", quiet=False)) == ["a", "b", "c"]
        lines = capsys.readouterr().err.splitlines()
        assert lines[0].startswith("segment: 0/3 images (0%)") and lines[-1].startswith("segment: 3/3 images (100%)")
        assert list(progress_items(["a"], "segment", quiet=True)) == ["a"] and capsys.readouterr().err == ""

    def test_lines_are_spaced_by_the_interval_but_the_last_always_shows(self, capsys, monkeypatch):
        from knnclip.engine.cli.progress import progress_callback

        monkeypatch.setenv("KNNCLIP_PROGRESS_SECONDS", "3600")
        report = progress_callback("add", quiet=False)
        for done in range(101):
            report(done, 100)
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 2 and lines[-1].startswith("add: 100/100 images (100%)"), lines

    def test_heartbeat_speaks_while_work_without_a_count_runs(self, capsys):
        import time

        from knnclip.engine.cli.progress import heartbeat

        with heartbeat("knnclip export fcclip", every=1):
            time.sleep(2.5)
        lines = capsys.readouterr().err.splitlines()
        assert lines and all(line.startswith("knnclip export fcclip: still running, ") for line in lines), lines
