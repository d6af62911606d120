"""ONNX export of the DINOv2 keys model: parity in ONNX Runtime (fp32 and fp16 graphs) with the
official outputs, the manifest, atomic publishing, and artefact verification on load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from knnclip.engine.artifact import read_manifest
from knnclip.engine.cli import main
from knnclip.engine.errors import ArtifactCorruptError, ArtifactExistsError, InvalidInputError
from knnclip.export import onnx as onnx_export
from knnclip.export.dinov2 import load_dinov2
from knnclip.export.dinov2 import onnx as dinov2_onnx
from tests.support.dinov2_reference import (
    ARCHITECTURES,
    FIXTURE,
    as_tokens,
    fixture_config,
    random_official_checkpoint,
    reference_forward,
    rel_l2,
    to_torch,
)


@pytest.fixture(scope="module")
def model(fixture_io):
    return load_dinov2(FIXTURE / "checkpoint.pth", fixture_config())


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {
        precision: dinov2_onnx.export_dinov2_onnx(model, root / precision, fp16=precision == "fp16").directory
        for precision in ("fp32", "fp16")
    }


def run(directory: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["keys"], {"images": images})[0]


class TestParity:
    """Catches an exported graph that departs from the official model."""

    @pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("fp16", 2e-2)])
    def test_keys_match_official(self, exports, fixture_io, precision, tolerance):
        keys = run(exports[precision], fixture_io["image"])
        assert keys.shape == (1, 96, 37, 37) and keys.dtype == np.float32
        assert rel_l2(as_tokens(torch.from_numpy(keys)), fixture_io["keys"]) <= tolerance

    def test_fp32_is_much_closer_than_its_tolerance(self, exports, fixture_io):
        keys = run(exports["fp32"], fixture_io["image"])
        assert rel_l2(as_tokens(torch.from_numpy(keys)), fixture_io["keys"]) <= 1e-5

    @pytest.mark.parametrize("precision", ["fp32", "fp16"])
    def test_dynamic_batch(self, exports, fixture_io, precision):
        image = fixture_io["image"]
        batch = np.concatenate([np.zeros_like(image), image, image[..., ::-1]])
        keys = run(exports[precision], np.ascontiguousarray(batch))
        single = run(exports[precision], image)
        assert keys.shape[0] == 3
        assert rel_l2(keys[1:2], single) <= 1e-3

    def test_fp16_graph_keeps_layernorm_and_softmax_in_fp32(self, exports):
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(exports["fp16"] / "model.onnx"))).graph
        elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
        elem |= {t.name: t.data_type for t in graph.initializer}
        ops = {}
        for node in filter(lambda n: n.input, graph.node):
            ops.setdefault(node.op_type, set()).add(elem.get(node.input[0]))
        assert ops["LayerNormalization"] == {onnx.TensorProto.FLOAT}
        assert ops["Softmax"] == {onnx.TensorProto.FLOAT}
        assert ops["MatMul"] == {onnx.TensorProto.FLOAT16}
        assert ops["Conv"] == {onnx.TensorProto.FLOAT16}
        assert elem["images"] == elem["keys"] == onnx.TensorProto.FLOAT

    @pytest.mark.parametrize("name", ["mlp-noreg", "swiglu-reg"])
    def test_other_architectures_and_sizes(self, tmp_path, name):
        """The resized position embedding is folded in at the export size (here not the native one)."""
        args = ARCHITECTURES[name]
        sd = random_official_checkpoint(args, seed=3)
        size = (3 * args["patch_size"], 7 * args["patch_size"])
        result = dinov2_onnx.export_dinov2_onnx(
            load_dinov2(to_torch(sd), args), tmp_path / "m", size=f"{size[0]}x{size[1]}"
        )
        images = np.random.default_rng(4).standard_normal((2, 3, *size)).astype(np.float32)
        keys = run(result.directory, images)
        assert rel_l2(as_tokens(torch.from_numpy(keys)), reference_forward(sd, args, images)["keys"]) <= 1e-4
        assert result.manifest.body["input_size"] == list(size)


class TestManifest:
    """Catches an artefact whose manifest does not describe it or does not catch damage."""

    def test_fields(self, exports, model):
        m = read_manifest(exports["fp16"], dinov2_onnx.KIND_DINOV2_KEYS).to_json()
        assert m["precision"] == "fp16" and m["opset"] >= 17 and m["input_size"] == [518, 518]
        assert m["model"]["config"]["embed_dim"] == 96 and m["model"]["config"]["num_register_tokens"] == 4
        assert m["inputs"][0]["shape"] == ["batch", 3, 518, 518]
        assert m["outputs"][0]["shape"] == ["batch", 96, 37, 37]
        assert m["weights_sha256"] == onnx_export.state_dict_sha256(model)
        assert m["verification"]["rel_l2_error"] <= m["verification"]["tolerance"] == 2e-2
        onnx.checker.check_model(str(exports["fp16"] / "model.onnx"), full_check=True)

    def test_export_leaves_the_model_as_it_was(self, exports, model, fixture_io):
        assert model.fixed_size is None and model.fixed_pos_embed is None
        assert model.blocks[0].attn.qkv.weight.dtype == torch.float32
        with torch.no_grad():
            keys = model(torch.from_numpy(fixture_io["image"]))
        assert rel_l2(as_tokens(keys), fixture_io["keys"]) <= 1e-4

    def test_weights_hash_depends_on_weights(self, model):
        other = load_dinov2(FIXTURE / "checkpoint.pth", fixture_config())
        assert onnx_export.state_dict_sha256(other) == onnx_export.state_dict_sha256(model)
        with torch.no_grad():
            other.blocks[0].ls1.gamma[0] += 1e-3
        assert onnx_export.state_dict_sha256(other) != onnx_export.state_dict_sha256(model)

    def copy(self, src: Path, dst: Path) -> Path:
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
        return dst

    def test_flipped_byte(self, exports, tmp_path):
        art = self.copy(exports["fp32"], tmp_path / "a")
        data = bytearray((art / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0x40
        (art / "model.onnx").write_bytes(bytes(data))
        with pytest.raises(ArtifactCorruptError, match="SHA-256 differs"):
            read_manifest(art)
        read_manifest(art, verify_files=False)  # size unchanged: only the hash can tell

    def test_truncated_missing_edited_other_kind(self, exports, tmp_path):
        art = self.copy(exports["fp32"], tmp_path / "a")
        with pytest.raises(ArtifactCorruptError, match="is a 'dinov2-keys', not a 'fcclip-image'"):
            read_manifest(art, "fcclip-image")
        (art / "model.onnx").write_bytes((art / "model.onnx").read_bytes()[:1000])
        with pytest.raises(ArtifactCorruptError, match="truncated"):
            read_manifest(art)
        (art / "model.onnx").unlink()
        with pytest.raises(ArtifactCorruptError, match="missing"):
            read_manifest(art)
        body = json.loads((art / "manifest.json").read_text())
        body["precision"] = "fp16"
        (art / "manifest.json").write_text(json.dumps(body))
        with pytest.raises(ArtifactCorruptError, match="checksum mismatch"):
            read_manifest(art)
        (art / "manifest.json").write_text("{")
        with pytest.raises(ArtifactCorruptError, match="not JSON"):
            read_manifest(art)
        (art / "manifest.json").unlink()
        with pytest.raises(ArtifactCorruptError, match="not a knnclip artefact directory"):
            read_manifest(art)


class TestPublishing:
    """Catches half-written or silently replaced artefacts."""

    def test_existing_directory_is_kept(self, model, tmp_path):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        with pytest.raises(ArtifactExistsError, match="--overwrite"):
            dinov2_onnx.export_dinov2_onnx(model, tmp_path / "out")
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"

    def test_overwrite_replaces_whole_directory(self, model, tmp_path):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "stale.onnx").write_text("old")
        dinov2_onnx.export_dinov2_onnx(model, tmp_path / "out", overwrite=True)
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "model.onnx"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or old copy left

    def test_failed_verification_publishes_nothing(self, model, tmp_path, monkeypatch):
        monkeypatch.setitem(onnx_export.TOLERANCE, "fp32", 0.0)
        with pytest.raises(onnx_export.ExportVerificationError, match="nothing was written"):
            dinov2_onnx.export_dinov2_onnx(model, tmp_path / "out")
        assert list(tmp_path.iterdir()) == []

    def test_external_data(self, model, tmp_path, monkeypatch, fixture_io):
        """Models over 2 GiB (ViT-g in fp32) keep their weights in one model.onnx.data file."""
        monkeypatch.setattr(onnx_export, "_EXTERNAL_DATA_BYTES", 0)
        result = dinov2_onnx.export_dinov2_onnx(model, tmp_path / "out")
        assert set(result.manifest.body["files"]) == {"model", "data"}
        assert (
            (tmp_path / "out" / "model.onnx").stat().st_size
            < 200_000
            < (tmp_path / "out" / "model.onnx.data").stat().st_size
        )
        keys = run(result.directory, fixture_io["image"])
        assert rel_l2(as_tokens(torch.from_numpy(keys)), fixture_io["keys"]) <= 1e-4
        (tmp_path / "out" / "model.onnx.data").write_bytes(b"")
        with pytest.raises(ArtifactCorruptError, match=r"model\.onnx\.data: 0 bytes"):
            read_manifest(result.directory)

    @pytest.mark.parametrize(
        "kwargs, problem",
        [
            ({"size": 500}, "not a positive multiple of the patch size"),
            ({"opset": 13}, "opset 13 is too old"),
            ({"size": "518x"}, "size must be H or HxW"),
        ],
    )
    def test_bad_arguments(self, model, tmp_path, kwargs, problem):
        with pytest.raises(InvalidInputError, match=problem):
            dinov2_onnx.export_dinov2_onnx(model, tmp_path / "out", **kwargs)
        assert list(tmp_path.iterdir()) == []


class TestCli:
    """Catches a broken `knnclip export dinov2` command line."""

    def test_export(self, tmp_path, capsys, fixture_io):
        rc = main(
            [
                "export",
                "dinov2",
                "--checkpoint",
                str(FIXTURE / "checkpoint.pth"),
                "--config",
                json.dumps(fixture_config()),
                "--size",
                "266x392",
                "--out",
                str(tmp_path / "out"),
                "--fp16",
                "--json",
            ]
        )
        assert rc == 0
        manifest = json.loads(capsys.readouterr().out)
        assert manifest["precision"] == "fp16" and manifest["input_size"] == [266, 392]
        assert manifest["checkpoint"]["name"] == "checkpoint.pth"
        assert run(tmp_path / "out", np.zeros((1, 3, 266, 392), np.float32)).shape == (1, 96, 19, 28)

    def test_wrong_architecture_exit_code(self, tmp_path, capsys):
        rc = main(["export", "dinov2", "--checkpoint", str(FIXTURE / "checkpoint.pth"), "--out", str(tmp_path / "o")])
        assert rc == 1
        assert "does not match the model ViT-g/14-reg4" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
