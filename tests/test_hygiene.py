"""Habits that keep the layout honest: the run time imports nothing heavy, no module reaches
into another's private names, and every docstring example in the package runs."""

from __future__ import annotations

import ast
import doctest
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"knnclip.engine": REPO / "engine", "knnclip.export": REPO / "export"}
HEAVY = ("torch", "onnx", "tensorrt", "pycuda", "ray", "knnclip.export")


def test_run_time_imports_nothing_heavy():
    """Importing the engine, the CLI entry (with its whole parser) and the segmenter loads
    neither torch, onnx, tensorrt, pycuda, ray nor the export side."""
    code = (
        "import sys, json\n"
        "import knnclip.engine, knnclip.engine.pipeline.segmenter\n"
        "from knnclip.engine.cli import build_parser\n"
        "build_parser()\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def _modules(package: str, folder: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(module: str, path: Path) -> list[str]:
    """Where ``module`` uses another knnclip module's private name: ``from knnclip.x import _y``,
    an import path through a private module, or ``alias._y`` on an imported knnclip module.
    (``knnclip._C`` is the compiled module's public name.)"""
    tree = ast.parse(path.read_text(), str(path))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("knnclip"):
            if any(_private(p) for p in node.module.split(".")[1:] if p != "_C"):
                found.append(f"{path.name}:{node.lineno} from {node.module}")
            for alias in node.names:
                if _private(alias.name) and alias.name != "_C":
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("knnclip"):
                    if any(_private(p) for p in alias.name.split(".")[1:] if p != "_C"):
                        found.append(f"{path.name}:{node.lineno} import {alias.name}")
                    if alias.asname:
                        aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _private(node.attr)
        ):
            found.append(f"{path.name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    uses = []
    for package, folder in PACKAGES.items():
        for module, path in _modules(package, folder).items():
            uses += private_uses(module, path)
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        uses += private_uses(path.stem, path)
    assert uses == []


def test_the_private_name_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from knnclip.engine.pipeline.segmenter import _Timer\nimport knnclip.engine.fsutil as fs\nfs._CHUNK\n"
    )
    assert len(private_uses("bad", bad)) == 2


def _package_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        names.append(package)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, package + ".") if not m.name.endswith("__main__")]
    return names


@pytest.mark.parametrize("module", _package_modules())
def test_docstring_examples_run(module):
    if module.startswith("knnclip.export"):
        pytest.importorskip("torch", reason="the export side needs torch (pip install torch)")
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}"


# Packaging ----------------------------------------------------------------------------------------
# The module each distribution installs, where it is not the distribution's own name.
PROVIDES = {
    "onnxruntime-gpu": "onnxruntime",
    "faiss-cpu": "faiss",
    "faiss-gpu-cu11": "faiss",
    "faiss-gpu-cu12": "faiss",
    "faiss-gpu": "faiss",
    "pillow": "PIL",
    "swagger-ui-bundle-v2": "swagger_ui_bundle",
    "tensorrt-cu12": "tensorrt",
    "prometheus-client": "prometheus_client",
    "huggingface_hub": "huggingface_hub",
}
GPU_ONLY = ("onnxruntime-gpu", "faiss-gpu", "tensorrt", "pycuda", "cupy", "nvidia-")


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def test_the_cpu_and_gpu_stacks_are_extras_of_their_own_on_one_cuda_major():
    """onnxruntime/onnxruntime-gpu and faiss-cpu/faiss-gpu install the same modules: the base
    install has neither, the cpu extra no GPU build, the gpu extra no CPU build, and every
    CUDA-versioned package is for CUDA 12 (.ci/run resolves the gpu extra to check its closure)."""
    import re

    project = _pyproject()["project"]
    base = {PROVIDES.get(_name(r), _name(r)) for r in project["dependencies"]}
    assert not base & {"onnxruntime", "faiss"}
    extras = {k: [_name(r) for r in v] for k, v in project["optional-dependencies"].items()}
    assert set(extras["cpu"]) == {"onnxruntime", "faiss-cpu"}
    assert {PROVIDES.get(n, n) for n in extras["gpu"]} == {"onnxruntime", "faiss"}
    assert not [n for n in extras["gpu"] if n in ("onnxruntime", "faiss-cpu")]
    versioned = [n for names in extras.values() for n in names if re.search(r"cu\d+", n)]
    assert versioned and all(re.search(r"cu12\b", n) for n in versioned), versioned
    gpu_pins = " ".join(project["optional-dependencies"]["gpu"])
    assert "<1.27" in gpu_pins, "onnxruntime-gpu 1.27 and later are CUDA 13 builds"


def test_base_install_has_no_gpu_package_and_no_extra_duplicates_a_module():
    project = _pyproject()["project"]
    base = [_name(r) for r in project["dependencies"]]
    assert not [b for b in base if b.startswith(GPU_ONLY)]
    for extra, requirements in project["optional-dependencies"].items():
        names = base + [_name(r) for r in requirements]
        modules = [PROVIDES.get(n, n) for n in dict.fromkeys(names)]
        duplicated = {m for m in modules if modules.count(m) > 1}
        assert not duplicated, f"[{extra}] installs two distributions of {duplicated}"


def test_every_imported_package_is_declared():
    """Each third-party module that engine/ or export/ imports comes from a declared distribution."""
    project = _pyproject()["project"]
    declared = {_name(r) for r in project["dependencies"]}
    for requirements in project["optional-dependencies"].values():
        declared |= {_name(r) for r in requirements}
    provided = {PROVIDES.get(n, n) for n in declared}
    imported = set()
    for folder in PACKAGES.values():
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "knnclip"}
    assert third_party - provided == set()


def test_architecture_map_lists_every_engine_module_and_folder():
    text = (REPO / "docs" / "architecture.md").read_text()
    block = text[text.index("\nengine/ ") : text.index("\nexport/ ")]
    # entries are indented by two spaces; their continuation lines by more
    listed = {line.split()[0].rstrip("/") for line in block.splitlines() if line[:2] == "  " and line[2] != " "}
    present = {
        p.name.removesuffix(".py")
        for p in (REPO / "engine").iterdir()
        if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))
    }
    assert {n.removesuffix(".py") for n in listed} == present
    assert len([p for p in (REPO / "engine").glob("*.py")]) <= 12


def test_tests_read_nothing_outside_the_repository():
    """A fresh clone has nothing beside it: the parity fixtures live in tests/fixtures."""
    import re

    outside = re.compile(r"\.\./" + r"shared|" + r"parents\[1\]\.parent|" + r'"shared" */ *"fixtures"')
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if outside.search(path.read_text()):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"tests reaching outside the repository: {offenders}"
    for name in ("dinov2", "fcclip", "fcclip_resize"):
        assert (REPO / "tests" / "fixtures" / name / "io.npz").is_file(), name


def test_the_readme_lines_build_once_in_one_environment():
    """With pip's build isolation, scikit-build-core clears its build folder on every install (a
    new isolated environment each time), so the README's second line would compile everything
    again: both lines build in the environment, which the build group provides."""
    readme = (REPO / "README.md").read_text().splitlines()
    lines = [line for line in readme if line.endswith(("# main command", "# test command"))]
    assert len(lines) == 2
    for line in lines:
        assert "--group build" in line and "--no-build-isolation" in line and '".[cpu,' in line, line
    groups = _pyproject()["dependency-groups"]["build"]
    assert {_name(r) for r in groups} >= {"scikit-build-core", "pybind11", "cmake", "ninja"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_test_imports_another_test_and_benchmarks_import_no_test():
    """Shared helpers live in tests/support/; a benchmark's references in knnclip.engine.bench."""
    offending = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        tests_imported = [m for m in _imported_modules(path) if m.startswith("tests.")]
        offending += [f"{path.relative_to(REPO)}: {m}" for m in tests_imported if m.split(".")[-1].startswith("test_")]
    for path in sorted((REPO / "benchmarks").rglob("*.py")):
        offending += [f"{path.relative_to(REPO)}: {m}" for m in _imported_modules(path) if m.split(".")[0] == "tests"]
    assert not offending, offending


def test_tests_mirror_the_engine_folders():
    engine = {p.name for p in (REPO / "engine").iterdir() if (p / "__init__.py").exists()}
    tests = {p.name for p in (REPO / "tests").iterdir() if (p / "__init__.py").exists()}
    # Folders of tests cover engine/'s folders; export/ (knnclip.export), ops/ (knnclip._C) and
    # support/ (shared helpers) are the others.
    assert tests - engine == {"export", "ops", "support"}, tests - engine
    assert engine - tests == set(), f"engine folders without tests: {engine - tests}"
