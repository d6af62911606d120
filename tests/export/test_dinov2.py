"""DINOv2 model and loaders: parity with the official code's recorded outputs and with an
independent NumPy float64 forward, strict checkpoint loading, configs, and bad input."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from knnclip.engine.errors import (
    BackendUnavailableError,
    CheckpointError,
    InvalidInputError,
    ModelDownloadError,
)
from knnclip.export.dinov2 import (
    PRESETS,
    DinoV2Config,
    config_from_dict,
    download_dinov2,
    load_dinov2,
    resolve_config,
)
from tests.support.dinov2_reference import (
    ARCHITECTURES,
    FIXTURE,
    as_tokens,
    fixture_config,
    official_args,
    random_official_checkpoint,
    reference_forward,
    rel_l2,
    to_torch,
)


@pytest.fixture(scope="module")
def fixture_model(fixture_io):
    return load_dinov2(FIXTURE / "checkpoint.pth", fixture_config())


class TestFixtureParity:
    """Catches any departure from the official DinoVisionTransformer (ViT-g/14-reg4 structure)."""

    def test_keys_match_official(self, fixture_model, fixture_io):
        with torch.no_grad():
            keys = fixture_model(torch.from_numpy(fixture_io["image"]))
        assert keys.shape == (1, 96, 37, 37)
        assert rel_l2(as_tokens(keys), fixture_io["keys"]) <= 1e-4

    def test_normalised_tokens_match_official(self, fixture_model, fixture_io):
        with torch.no_grad():
            out = fixture_model.forward_features(torch.from_numpy(fixture_io["image"]))
        assert rel_l2(as_tokens(out["keys"]), fixture_io["keys"]) <= 1e-4
        for name in ("patch", "cls", "registers"):
            assert out[name].shape == fixture_io[name].shape
            assert rel_l2(out[name], fixture_io[name]) <= 1e-4, name

    def test_batch_rows_are_independent(self, fixture_model, fixture_io):
        image = torch.from_numpy(fixture_io["image"])
        batch = torch.cat([image, torch.zeros_like(image), image.flip(-1)])
        with torch.no_grad():
            keys = fixture_model(batch)
        assert rel_l2(as_tokens(keys[:1]), fixture_io["keys"]) <= 1e-4

    def test_reference_agrees_with_fixture(self, fixture_io):
        """The NumPy reference used below is itself checked against the official outputs."""
        sd = {k: v.numpy() for k, v in torch.load(FIXTURE / "checkpoint.pth", weights_only=True).items()}
        args = official_args(**{k: v for k, v in fixture_config().items() if k in official_args()})
        out = reference_forward(sd, args, fixture_io["image"])
        assert rel_l2(out["keys"], fixture_io["keys"]) <= 1e-5
        assert rel_l2(out["patch"], fixture_io["patch"]) <= 1e-5


class TestArchitectures:
    """Catches a forward that only matches the fixture's one architecture or input size."""

    @pytest.mark.parametrize("name", sorted(ARCHITECTURES))
    @pytest.mark.parametrize("scale", [(1, 1), (2, 3), (1, 0.5)], ids=["native", "larger", "smaller"])
    def test_matches_numpy_reference(self, name, scale):
        args = ARCHITECTURES[name]
        sd = random_official_checkpoint(args, seed=len(name))
        p = args["patch_size"]
        grid = args["img_size"] // p
        height, width = max(1, int(grid * scale[0])) * p, max(1, int(grid * scale[1])) * p
        images = np.random.default_rng(1).standard_normal((2, 3, height, width)).astype(np.float32)
        model = load_dinov2(to_torch(sd), args)
        with torch.no_grad():
            out = model.forward_features(torch.from_numpy(images))
        ref = reference_forward(sd, args, images)
        assert out["keys"].shape == (2, args["embed_dim"], height // p, width // p)
        assert rel_l2(as_tokens(out["keys"]), ref["keys"]) <= 1e-5
        assert rel_l2(out["patch"], ref["patch"]) <= 1e-5
        assert rel_l2(out["cls"], ref["cls"]) <= 1e-5

    def test_fixed_size_matches_per_call_resize(self):
        args = ARCHITECTURES["swiglu-reg"]
        model = load_dinov2(to_torch(random_official_checkpoint(args)), args)
        images = torch.randn(1, 3, 42, 112)
        with torch.no_grad():
            dynamic = model(images)
            fixed = model.fix_input_size(42, 112)(images)
        assert torch.equal(dynamic, fixed)
        with pytest.raises(InvalidInputError, match="fixed to 42x112"):
            model(torch.randn(1, 3, 70, 70))

    def test_fp16_compute_is_close_to_fp32(self, fixture_model, fixture_io):
        half = load_dinov2(FIXTURE / "checkpoint.pth", fixture_config()).half_compute_()
        with torch.no_grad():
            keys = half(torch.from_numpy(fixture_io["image"]))
        assert keys.dtype == torch.float32
        assert rel_l2(as_tokens(keys), fixture_io["keys"]) <= 2e-2
        assert half.blocks[0].norm1.weight.dtype == torch.float32
        assert half.blocks[0].attn.qkv.weight.dtype == torch.float16


def hf_state_dict(sd: dict[str, np.ndarray], depth: int, swiglu: bool) -> dict[str, np.ndarray]:
    """The official weights renamed to the Hugging Face Dinov2 layout (written from the HF naming)."""
    top = {
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "register_tokens": "embeddings.register_tokens",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    out = {new: sd[old] for old, new in top.items() if old in sd}
    ffn = {"w12": "weights_in", "w3": "weights_out"} if swiglu else {"fc1": "fc1", "fc2": "fc2"}
    for i in range(depth):
        b, h = f"blocks.{i}.", f"encoder.layer.{i}."
        d = sd[b + "norm1.weight"].shape[0]
        for kind in ("weight", "bias"):
            qkv = sd[f"{b}attn.qkv.{kind}"]
            for j, part in enumerate(("query", "key", "value")):
                out[f"{h}attention.attention.{part}.{kind}"] = qkv[j * d : (j + 1) * d]
            out[f"{h}attention.output.dense.{kind}"] = sd[f"{b}attn.proj.{kind}"]
            out[f"{h}norm1.{kind}"] = sd[f"{b}norm1.{kind}"]
            out[f"{h}norm2.{kind}"] = sd[f"{b}norm2.{kind}"]
            for old, new in ffn.items():
                out[f"{h}mlp.{new}.{kind}"] = sd[f"{b}mlp.{old}.{kind}"]
        out[h + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        out[h + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """A safetensors file written from the format's definition (u64 header length, JSON, data)."""
    np_dtype = {"F32": np.float32, "F16": np.float16}[dtype]
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np_dtype).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def hf_config_json(cfg: dict) -> dict:
    return {
        "model_type": "dinov2_with_registers" if cfg["num_register_tokens"] else "dinov2",
        "hidden_size": cfg["embed_dim"],
        "num_hidden_layers": cfg["depth"],
        "num_attention_heads": cfg["num_heads"],
        "mlp_ratio": cfg["mlp_ratio"],
        "use_swiglu_ffn": cfg["ffn_layer"].startswith("swiglu"),
        "num_register_tokens": cfg["num_register_tokens"],
        "image_size": cfg["img_size"],
        "patch_size": cfg["patch_size"],
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "hidden_act": "gelu",
    }


class TestHuggingFaceLayout:
    """Catches a wrong renaming or q/k/v order when loading Hugging Face Dinov2 weights."""

    @pytest.fixture
    def hf_dir(self, tmp_path, fixture_io):
        sd = {k: v.numpy() for k, v in torch.load(FIXTURE / "checkpoint.pth", weights_only=True).items()}
        write_safetensors(tmp_path / "model.safetensors", hf_state_dict(sd, depth=3, swiglu=True))
        (tmp_path / "config.json").write_text(json.dumps(hf_config_json(fixture_config())))
        return tmp_path

    def test_directory_with_config_matches_official(self, hf_dir, fixture_io):
        model = load_dinov2(hf_dir)  # config.json beside the weights
        assert model.config.num_register_tokens == 4 and model.config.ffn_layer == "swiglu"
        with torch.no_grad():
            keys = model(torch.from_numpy(fixture_io["image"]))
        assert rel_l2(as_tokens(keys), fixture_io["keys"]) <= 1e-4

    def test_prefixed_file_with_explicit_config(self, tmp_path, hf_dir, fixture_io):
        from knnclip.export.safetensors import load_safetensors

        prefixed = {"dinov2." + k: v.numpy() for k, v in load_safetensors(hf_dir / "model.safetensors").items()}
        write_safetensors(tmp_path / "head.safetensors", prefixed)
        model = load_dinov2(tmp_path / "head.safetensors", fixture_config())
        with torch.no_grad():
            keys = model(torch.from_numpy(fixture_io["image"]))
        assert rel_l2(as_tokens(keys), fixture_io["keys"]) <= 1e-4

    def test_mlp_architecture_and_fp16_file(self, tmp_path):
        args = ARCHITECTURES["mlp-noreg"]
        sd = random_official_checkpoint(args)
        write_safetensors(tmp_path / "model.safetensors", hf_state_dict(sd, args["depth"], swiglu=False), "F16")
        (tmp_path / "config.json").write_text(json.dumps(hf_config_json(args)))
        model = load_dinov2(tmp_path)
        images = np.random.default_rng(2).standard_normal((1, 3, 98, 98)).astype(np.float32)
        sd16 = {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}
        with torch.no_grad():
            keys = model(torch.from_numpy(images))
        assert rel_l2(as_tokens(keys), reference_forward(sd16, args, images)["keys"]) <= 1e-5

    def test_missing_value_projection_is_named(self, tmp_path, hf_dir):
        from knnclip.export.safetensors import load_safetensors

        sd = {k: v.numpy() for k, v in load_safetensors(hf_dir / "model.safetensors").items()}
        del sd["encoder.layer.1.attention.attention.value.weight"]
        write_safetensors(tmp_path / "model.safetensors", sd)
        with pytest.raises(CheckpointError, match=r"layer 1: attention weight lacks \['value'\]"):
            load_dinov2(tmp_path / "model.safetensors", fixture_config())


class TestCheckpointErrors:
    """Catches checkpoints that load silently while wrong: other architectures, missing or extra
    tensors, NaN weights, damaged files."""

    def sd(self) -> dict[str, torch.Tensor]:
        return torch.load(FIXTURE / "checkpoint.pth", weights_only=True)

    def test_other_architecture_is_described(self, fixture_io):
        with pytest.raises(CheckpointError) as info:
            load_dinov2(FIXTURE / "checkpoint.pth")  # default config: ViT-g/14-reg4
        message = str(info.value)
        assert "mis-shaped" in message and "missing" in message
        assert "blocks.0.attn.qkv.weight: checkpoint (288, 96) vs model (4608, 1536)" in message
        assert "embed_dim=96, depth=3, ffn_layer=swiglu, num_register_tokens=4" in message

    def test_register_mismatch(self):
        cfg = fixture_config() | {"num_register_tokens": 0}
        with pytest.raises(CheckpointError, match="1 unexpected: register_tokens"):
            load_dinov2(self.sd(), cfg)

    def test_missing_and_unexpected_are_listed(self):
        sd = self.sd()
        del sd["blocks.2.ls2.gamma"]
        sd["blocks.2.extra"] = torch.zeros(1)
        with pytest.raises(
            CheckpointError, match=r"1 missing: blocks\.2\.ls2\.gamma(.|\n)*1 unexpected: blocks\.2\.extra"
        ):
            load_dinov2(sd, fixture_config())

    def test_ffn_kind_mismatch(self):
        with pytest.raises(CheckpointError, match="mlp.fc1.weight"):
            load_dinov2(self.sd(), fixture_config() | {"ffn_layer": "mlp"})

    def test_nan_weight(self):
        sd = self.sd()
        sd["blocks.1.attn.proj.weight"][0, 0] = float("nan")
        with pytest.raises(CheckpointError, match=r"NaN or Inf values in blocks\.1\.attn\.proj\.weight"):
            load_dinov2(sd, fixture_config())

    def test_wrapped_chunked_training_checkpoint(self, tmp_path, fixture_io):
        """block_chunks > 0 names blocks 'blocks.{chunk}.{i}'; training saves wrap under teacher/backbone."""
        chunked = {}
        for k, v in self.sd().items():
            if k.startswith("blocks."):
                i = int(k.split(".")[1])
                k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
            chunked["backbone." + k] = v
        torch.save({"teacher": chunked, "iteration": 7}, tmp_path / "train.pth")
        model = load_dinov2(tmp_path / "train.pth", fixture_config())
        with torch.no_grad():
            keys = model(torch.from_numpy(fixture_io["image"]))
        assert rel_l2(as_tokens(keys), fixture_io["keys"]) <= 1e-4

    @pytest.mark.parametrize(
        "content, problem",
        [
            (b"", "not a readable torch checkpoint"),
            (b"not a checkpoint at all", "not a readable torch checkpoint"),
        ],
    )
    def test_unreadable_pth(self, tmp_path, content, problem):
        (tmp_path / "bad.pth").write_bytes(content)
        with pytest.raises(CheckpointError, match=problem):
            load_dinov2(tmp_path / "bad.pth", fixture_config())

    def test_truncated_pth(self, tmp_path):
        data = (FIXTURE / "checkpoint.pth").read_bytes()
        (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
            load_dinov2(tmp_path / "cut.pth", fixture_config())

    def test_not_a_state_dict(self, tmp_path):
        torch.save({"epoch": 3}, tmp_path / "meta.pth")
        with pytest.raises(CheckpointError, match="does not hold a state dict"):
            load_dinov2(tmp_path / "meta.pth", fixture_config())

    def test_missing_file_and_empty_directory(self, tmp_path):
        with pytest.raises(CheckpointError, match="no such checkpoint file"):
            load_dinov2(tmp_path / "nope.pth")
        with pytest.raises(CheckpointError, match="a directory without model.safetensors"):
            load_dinov2(tmp_path)


class TestSafetensorsReader:
    """Catches a damaged safetensors file being read as weights."""

    def write(self, path: Path, header: dict, data: bytes) -> Path:
        raw = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return path

    def test_round_trip_dtypes(self, tmp_path):
        from knnclip.export.safetensors import load_safetensors

        tensors = {
            "a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.ones(4, np.float16),
            "e": np.zeros((0, 3)),
        }
        write_safetensors(tmp_path / "t.safetensors", tensors | {"e": np.zeros((0, 3), np.float32)})
        out = load_safetensors(tmp_path / "t.safetensors")
        assert out["a"].dtype == torch.float32 and out["a"].tolist() == tensors["a"].tolist()
        assert out["b"].dtype == torch.float32 and out["e"].shape == (0, 3)

    @pytest.mark.parametrize(
        "header, data, problem",
        [
            ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "do not match"),
            ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12, "do not match"),
            ({"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed header"),
            (
                {
                    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
                "overlap",
            ),
            ([1, 2], b"", "not a JSON object"),
            ({"x": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}, b"", "impossible shape"),
            ({"x": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}, b"", "impossible shape"),
        ],
    )
    def test_damaged_header(self, tmp_path, header, data, problem):
        from knnclip.export.safetensors import load_safetensors

        path = self.write(tmp_path / "bad.safetensors", header, data)
        with pytest.raises(CheckpointError, match=problem):
            load_safetensors(path)

    def test_header_nested_beyond_recursion(self, tmp_path):
        from knnclip.export.safetensors import load_safetensors

        raw = b"[" * 100_000 + b"]" * 100_000
        (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
        with pytest.raises(CheckpointError, match="nested too deeply"):
            load_safetensors(tmp_path / "deep.safetensors")

    def test_short_and_non_json(self, tmp_path):
        from knnclip.export.safetensors import load_safetensors

        (tmp_path / "short.safetensors").write_bytes(b"\1\2")
        with pytest.raises(CheckpointError, match="too short"):
            load_safetensors(tmp_path / "short.safetensors")
        (tmp_path / "big.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
        with pytest.raises(CheckpointError, match="does not fit"):
            load_safetensors(tmp_path / "big.safetensors")
        (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{{")
        with pytest.raises(CheckpointError, match="not JSON"):
            load_safetensors(tmp_path / "junk.safetensors")


class TestBadImages:
    """Catches input the model would silently mis-process."""

    @pytest.mark.parametrize(
        "shape, problem",
        [
            ((1, 4, 518, 518), r"must be \[B, 3, H, W\]"),
            ((3, 518, 518), r"must be \[B, 3, H, W\]"),
            ((1, 3, 500, 518), "500x518 is not a positive multiple of the patch size 14"),
            ((1, 3, 518, 0), "not a positive multiple"),
        ],
    )
    def test_shape(self, fixture_model, shape, problem):
        with pytest.raises(InvalidInputError, match=problem):
            fixture_model(torch.zeros(shape))

    def test_nan_and_inf(self, fixture_model, fixture_io):
        image = torch.from_numpy(fixture_io["image"]).clone()
        image[0, 1, 5, 7] = float("nan")
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            fixture_model(image)
        image[0, 1, 5, 7] = float("inf")
        with pytest.raises(InvalidInputError, match="NaN or Inf"):
            fixture_model.forward_features(image)

    def test_integer_pixels(self, fixture_model):
        with pytest.raises(InvalidInputError, match="floating point"):
            fixture_model(torch.zeros(1, 3, 14, 14, dtype=torch.uint8))

    def test_not_a_tensor(self, fixture_model):
        with pytest.raises(InvalidInputError, match="torch.Tensor"):
            fixture_model(np.zeros((1, 3, 14, 14), np.float32))


class TestConfig:
    """Catches configs read differently from the official constructor."""

    def test_official_fixture_config(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every key of the fixture's config is known
            cfg = config_from_dict(fixture_config())
        assert cfg == DinoV2Config(embed_dim=96, depth=3, num_heads=4)

    def test_presets(self):
        g = PRESETS["vitg14_reg4"]
        assert (g.embed_dim, g.depth, g.num_heads, g.ffn_hidden, g.grid_size) == (1536, 40, 24, 4096, 37)
        assert resolve_config(None) == g and g.describe() == "ViT-g/14-reg4"
        s = PRESETS["vits14"]
        assert (s.ffn_layer, s.ffn_hidden, s.num_register_tokens, s.interpolate_offset) == ("mlp", 1536, 0, 0.1)
        assert PRESETS["vitl14_reg4"].interpolate_antialias

    def test_official_defaults_apply(self):
        cfg = config_from_dict({"embed_dim": 64, "num_heads": 4})
        assert (cfg.patch_size, cfg.img_size, cfg.depth, cfg.init_values, cfg.interpolate_offset) == (
            16,
            224,
            12,
            None,
            0.1,
        )

    def test_arch_name(self):
        hub_reg = {"num_register_tokens": 4, "interpolate_offset": 0.0, "interpolate_antialias": True}
        cfg = config_from_dict({"arch_name": "vit_giant2", "ffn_layer": "swiglufused", **hub_reg})
        assert cfg == PRESETS["vitg14_reg4"]

    def test_unknown_key_warns_and_is_ignored(self):
        with pytest.warns(UserWarning, match="ignoring unknown keys"):
            cfg = config_from_dict(fixture_config() | {"colour": "blue"})
        assert cfg.embed_dim == 96

    @pytest.mark.parametrize(
        "values, problem",
        [
            ({"embed_dim": 100, "num_heads": 3}, "not divisible"),
            ({"ffn_layer": "moe"}, "not supported"),
            ({"img_size": 500, "patch_size": 14}, "not a multiple"),
            ({"depth": 0}, "positive integer"),
        ],
    )
    def test_invalid(self, values, problem):
        with pytest.raises(InvalidInputError, match=problem):
            config_from_dict(values)

    def test_hf_config(self):
        cfg = config_from_dict(hf_config_json(fixture_config()))
        assert cfg == DinoV2Config(embed_dim=96, depth=3, num_heads=4)

    def test_json_string_file_and_unknown(self, tmp_path):
        assert resolve_config(json.dumps(fixture_config())).embed_dim == 96
        (tmp_path / "c.json").write_text(json.dumps(fixture_config()))
        assert resolve_config(tmp_path / "c.json").depth == 3
        with pytest.raises(InvalidInputError, match="neither a preset"):
            resolve_config("vit_huge")


class TestDownload:
    """Catches an offline download that hangs or fails with an obscure error."""

    def test_offline_is_a_clear_error(self, monkeypatch, tmp_path):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            with pytest.raises(BackendUnavailableError, match="pip install huggingface_hub"):
                download_dinov2("vits14", cache_dir=tmp_path)
            return
        with pytest.raises(ModelDownloadError, match="could not download facebook/dinov2-small"):
            download_dinov2("vits14", cache_dir=tmp_path)

    def test_unknown_name(self):
        with pytest.raises(ModelDownloadError, match="neither a preset"):
            download_dinov2("giant")
