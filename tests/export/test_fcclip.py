"""FC-CLIP model, loaders and test-time inference: parity with the official code's recorded
outputs at every stage (two fixtures: other seed, vocabulary and input size), the deformable
sampling against grid_sample, strict checkpoint loading, configs and bad vocabularies."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from knnclip.engine.errors import CheckpointError, InvalidInputError
from knnclip.engine.pipeline import postprocess
from knnclip.engine.pipeline.preprocess import fcclip_input
from knnclip.engine.text.prompts import class_synonyms, prompts, text_classifier
from knnclip.export.fcclip import FCCLIPConfig, config_from_dict, load_clip, load_fcclip
from knnclip.export.fcclip import inference as torch_inference
from knnclip.export.fcclip.deform_attn import bilinear_gather
from tests.support.fcclip_helpers import Fixture, load_fixture, rel
from tests.support.fixture_files import FIXTURES

F = torch.nn.functional

VARIANTS = ["fcclip", "fcclip_resize"]
STAGES = [
    "feat_stem",
    "feat_res2",
    "feat_res3",
    "feat_res4",
    "feat_res5",
    "feat_clip_vis_dense",
    "mask_features",
    "multi_scale_feature_0",
    "multi_scale_feature_1",
    "multi_scale_feature_2",
    "pred_logits",
    "pred_masks",
    "aux_pred_logits",
    "aux_pred_masks",
    "ov_pooled_clip_feature",
    "ov_embed",
    "ov_logits",
]


@pytest.fixture(scope="module", params=VARIANTS)
def fx(request) -> Fixture:
    return load_fixture(request.param)


@pytest.fixture(scope="module")
def outputs(fx):
    with torch.no_grad():
        return fx.model.forward_image(
            torch.from_numpy(fx.io["input_tensor"]), torch.from_numpy(fx.io["text_classifier"]), fx.synonyms_per_class
        )


class TestImageParity:
    """Catches any departure from the official FCCLIP image path, stage by stage."""

    @pytest.mark.parametrize("stage", STAGES)
    def test_stage_matches_official(self, fx, outputs, stage):
        ours = outputs[stage.removeprefix("feat_")]
        assert tuple(ours.shape) == fx.io[stage].shape
        assert rel(ours, fx.io[stage]) <= 1e-4

    def test_batch_rows_are_independent(self, fx, outputs):
        image = torch.from_numpy(fx.io["input_tensor"])
        batch = torch.cat([torch.zeros_like(image), image])
        with torch.no_grad():
            out = fx.model.forward_image(batch, torch.from_numpy(fx.io["text_classifier"]), fx.synonyms_per_class)
        for name in ("pred_logits", "pred_masks", "ov_logits"):
            assert rel(out[name][1:], outputs[name]) <= 1e-5, name


class TestTextParity:
    """Catches tokenizer, text tower or classifier-averaging departures from open_clip/FC-CLIP."""

    def test_tokens_match_open_clip(self, fx, tokenizer):
        texts = [p for syn in class_synonyms(fx.class_names) for p in prompts(syn)]
        np.testing.assert_array_equal(tokenizer(texts), fx.io["token_ids"])

    def test_text_features_match_official(self, fx):
        with torch.no_grad():
            feats = fx.model.clip.encode_text(torch.from_numpy(fx.io["token_ids"]))
        assert rel(feats, fx.io["text_features_per_template"]) <= 1e-4

    def test_classifier_with_void_matches_official(self, fx):
        with torch.no_grad():
            per_template = fx.model.clip.encode_text(torch.from_numpy(fx.io["token_ids"]))
            ours = fx.model.classifier_with_void(torch_inference.text_classifier(per_template))
        assert rel(ours, fx.io["text_classifier"]) <= 1e-4

    def test_engine_classifier_matches_official(self, fx):
        ours = text_classifier(fx.io["text_features_per_template"], 14)
        assert rel(ours, fx.io["text_classifier"][:-1]) <= 1e-5

    def test_synonyms_per_class_from_names(self, fx):
        assert [len(s) for s in class_synonyms(fx.class_names)] == fx.io["num_templates"].tolist()


class TestInferenceParity:
    """Catches departures in the ensemble, mask resizing, semantic and panoptic inference (torch and
    NumPy implementations both against the official outputs)."""

    def test_torch_ensemble_semantic_panoptic(self, fx, outputs):
        seen = torch.from_numpy(fx.io["category_overlapping_mask"])
        mask_cls = torch_inference.ensemble(outputs["pred_logits"][0], outputs["ov_logits"][0], seen, 0.4, 0.8)
        assert rel(mask_cls, fx.io["mask_cls"]) <= 1e-4
        masks = torch_inference.resize_masks(outputs["pred_masks"][0], fx.padded, fx.resized, fx.original)
        assert rel(torch_inference.semantic_inference(mask_cls, masks), fx.io["sem_seg"]) <= 1e-4
        panoptic, segments = torch_inference.panoptic_inference(mask_cls, masks, fx.is_thing, 0.0, 0.8)
        np.testing.assert_array_equal(panoptic.numpy(), fx.io["panoptic_seg"])
        assert [s.id for s in segments] == fx.io["segments_id"].tolist()
        assert [s.category_id for s in segments] == fx.io["segments_category_id"].tolist()
        assert [s.isthing for s in segments] == fx.io["segments_isthing"].tolist()

    def test_engine_preprocess_is_exact(self, fx):
        short = fx.config.get("preprocessing", {}).get("test_time_resize") or {}
        x = fcclip_input(
            fx.io["image_uint8"],
            fx.config["meta_arch"]["pixel_mean"],
            fx.config["meta_arch"]["pixel_std"],
            short=short.get("min_size_test"),
            max_size=short.get("max_size_test", 1333),
        )
        assert x.resized == fx.resized and x.padded == fx.padded and x.original == fx.original
        np.testing.assert_array_equal(x.tensor, fx.io["input_tensor"])

    def test_engine_logits_ensemble_semantic_panoptic(self, fx):
        io = fx.io
        ov = postprocess.classification_logits(
            io["ov_embed"][0], io["text_classifier"], fx.config["clip"]["logit_scale"], fx.synonyms_per_class
        )
        assert rel(ov, io["ov_logits"][0]) <= 1e-5
        probs = postprocess.geometric_ensemble(io["pred_logits"][0], ov, io["category_overlapping_mask"], 0.4, 0.8)
        mask_cls = probs.mask_cls()
        assert rel(mask_cls, io["mask_cls"]) <= 1e-5
        masks = postprocess.resize_masks(io["pred_masks"][0], fx.padded, fx.resized, fx.original)
        semantic = postprocess.semantic_inference(postprocess.semantic_probs(mask_cls), masks)
        assert rel(semantic, io["sem_seg"]) <= 1e-5
        panoptic, segments = postprocess.panoptic_inference(mask_cls, masks, fx.is_thing)
        np.testing.assert_array_equal(panoptic, io["panoptic_seg"])
        assert [s.id for s in segments] == io["segments_id"].tolist()
        assert [s.category_id for s in segments] == io["segments_category_id"].tolist()
        assert [s.isthing for s in segments] == io["segments_isthing"].tolist()
        assert [s.area for s in segments] == [int((panoptic == s.id).sum()) for s in segments]


class TestMaskResize:
    """Catches a composed resize matrix that departs from F.interpolate's three steps."""

    @given(
        h=st.integers(1, 24),
        w=st.integers(1, 24),
        pad_extra=st.integers(0, 40),
        out_h=st.integers(1, 70),
        out_w=st.integers(1, 70),
        seed=st.integers(0, 2**16),
    )
    def test_matches_interpolate_crop_interpolate(self, h, w, pad_extra, out_h, out_w, seed):
        padded = (4 * h, 4 * w)
        resized = (max(1, 4 * h - pad_extra % (4 * h)), max(1, 4 * w - (pad_extra * 7) % (4 * w)))
        masks = np.random.default_rng(seed).normal(size=(3, h, w)).astype(np.float32)
        ours = postprocess.resize_masks(masks, padded, resized, (out_h, out_w))
        ref = torch_inference.resize_masks(torch.from_numpy(masks).double(), padded, resized, (out_h, out_w))
        np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=2e-5)


class TestDeformableSampling:
    """Catches gather-based bilinear sampling that departs from grid_sample (zeros padding,
    align_corners=False), including points outside the map and on its border."""

    @given(
        height=st.integers(1, 9),
        width=st.integers(1, 9),
        channels=st.integers(1, 5),
        points=st.integers(1, 6),
        seed=st.integers(0, 2**16),
    )
    def test_matches_grid_sample(self, height, width, channels, points, seed):
        g = torch.Generator().manual_seed(seed)
        value = torch.randn(2, height * width, channels, generator=g, dtype=torch.float64)
        locations = torch.rand(2, 3, points, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
        locations[0, 0, 0] = torch.tensor([0.0, 1.0])  # the exact border
        ours = bilinear_gather(value, height, width, locations)
        grid = value.transpose(1, 2).reshape(2, channels, height, width)
        ref = F.grid_sample(grid, 2 * locations - 1, mode="bilinear", padding_mode="zeros", align_corners=False)
        np.testing.assert_allclose(ours.numpy(), ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-12)


class TestLoader:
    """Catches a loader that accepts the wrong weights or loses tensors silently."""

    def test_detectron2_wrapper_and_training_tensors(self, tmp_path):
        fx = load_fixture("fcclip")
        sd = torch.load(fx.dir / "checkpoint.pth", weights_only=True)
        assert any(k.startswith("criterion.") for k in sd)  # the official file carries the loss weights
        wrapped = {"model": {**sd, "pixel_mean": torch.zeros(3, 1, 1)}, "iteration": 9}
        torch.save(wrapped, tmp_path / "model_final.pth")
        model = load_fcclip(tmp_path / "model_final.pth", fx.config)
        assert torch.equal(model.void_embedding.weight, sd["void_embedding.weight"])

    def test_missing_and_unexpected_keys_are_listed(self):
        fx = load_fixture("fcclip")
        sd = torch.load(fx.dir / "checkpoint.pth", weights_only=True)
        del sd["sem_seg_head.predictor.query_feat.weight"]
        sd["sem_seg_head.predictor.extra.weight"] = torch.zeros(1)
        with pytest.raises(CheckpointError) as info:
            load_fcclip(sd, fx.config)
        assert "query_feat.weight" in str(info.value) and "predictor.extra.weight" in str(info.value)

    def test_other_variant_names_what_it_looks_like(self, tmp_path):
        fx = load_fixture("fcclip")
        (tmp_path / "checkpoint.pth").symlink_to(fx.dir / "checkpoint.pth")  # no config.json beside it
        with pytest.raises(CheckpointError) as info:
            load_fcclip(tmp_path / "checkpoint.pth", None)  # default config: ConvNeXt-L, 250 queries
        message = str(info.value)
        assert "mis-shaped" in message and "depths=[2, 2, 2, 2]" in message and "20 queries" in message

    def test_nan_weights_are_refused(self):
        fx = load_fixture("fcclip")
        sd = torch.load(fx.dir / "checkpoint.pth", weights_only=True)
        sd["sem_seg_head.pixel_decoder.mask_features.bias"][0] = float("nan")
        with pytest.raises(CheckpointError, match="NaN"):
            load_fcclip(sd, fx.config)

    def test_the_config_beside_the_checkpoint_is_read(self, tmp_path):
        fx = load_fixture("fcclip")
        model = load_fcclip(fx.dir / "checkpoint.pth")  # fixture_dir puts config.json beside it
        assert torch.equal(model.void_embedding.weight, fx.model.void_embedding.weight)
        (tmp_path / "checkpoint.pth").symlink_to(fx.dir / "checkpoint.pth")
        (tmp_path / "config.json").write_text("[1, 2]")
        with pytest.raises(CheckpointError, match="not a JSON object"):
            load_fcclip(tmp_path / "checkpoint.pth")

    def test_not_a_checkpoint(self, tmp_path):
        (tmp_path / "x.pth").write_bytes(b"not a zip")
        with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
            load_fcclip(tmp_path / "x.pth", load_fixture("fcclip").config)

    def test_clip_alone_from_open_clip_layout(self):
        fx = load_fixture("fcclip")
        sd = torch.load(fx.dir / "checkpoint.pth", weights_only=True)
        open_clip_sd = {k.removeprefix("backbone.clip_model."): v for k, v in sd.items() if "clip_model." in k}
        clip = load_clip(open_clip_sd, fx.config)
        with torch.no_grad():
            feats = clip.encode_text(torch.from_numpy(fx.io["token_ids"][:5]))
        assert rel(feats, fx.io["text_features_per_template"][:5]) <= 1e-4


class TestConfig:
    """Catches config readers that drop or misread a setting."""

    def test_fixture_config_is_read(self):
        cfg = config_from_dict(load_fixture("fcclip_resize").config)
        assert cfg.clip.depths == (2, 2, 2, 2) and cfg.clip.dims == (32, 64, 128, 256)
        assert cfg.decoder.layers == 3 and cfg.decoder.num_queries == 20 and cfg.decoder.hidden_dim == 64
        assert cfg.pixel_decoder.encoder_layers == 2 and cfg.pixel_decoder.encoder_ffn_dim == 1024
        assert cfg.inference.alpha == 0.4 and cfg.inference.beta == 0.8
        assert cfg.inference.min_size_test == 288 and cfg.inference.max_size_test == 1333

    def test_own_json_round_trips(self):
        cfg = config_from_dict(load_fixture("fcclip").config)
        assert config_from_dict(json.loads(json.dumps(cfg.to_json()))) == cfg

    def test_defaults_are_the_official_large_model(self):
        cfg = FCCLIPConfig()
        assert cfg.clip.dims == (192, 384, 768, 1536) and cfg.clip.depths == (3, 3, 27, 3)
        assert cfg.clip.text_layers == 16 and cfg.clip.text_width == 768 and cfg.clip.embed_dim == 768
        assert cfg.decoder.num_queries == 250 and cfg.decoder.layers == 9 and cfg.pixel_decoder.encoder_layers == 6

    @pytest.mark.parametrize(
        "change, message",
        [
            ({"pixel_decoder": {"conv_dim": 48}}, "GroupNorm"),
            ({"decoder": {"hidden_dim": 128}}, "hidden_dim"),
            ({"clip": {"depths": [1, 1, 1]}}, "4 stages"),
            ({"decoder": {"bogus": 1}}, "bogus"),
        ],
    )
    def test_invalid_configs_are_refused(self, change, message):
        with pytest.raises(InvalidInputError, match=message):
            config_from_dict(change)


class TestVocabulary:
    """Catches vocabularies FC-CLIP cannot classify against."""

    def test_empty(self):
        with pytest.raises(InvalidInputError, match="empty"):
            class_synonyms([])

    def test_duplicate_names_across_classes(self):
        with pytest.raises(InvalidInputError, match="'walls' is used by class 0"):
            class_synonyms(["wall,walls", "sky", "brick,walls"])

    def test_repeated_synonym_in_one_class_is_merged(self):
        assert class_synonyms(["wall, walls,wall", "sky"]) == [["wall", "walls"], ["sky"]]

    def test_too_long_name_is_cut_with_a_warning(self, tokenizer):
        name = " ".join(["chandelier"] * 80)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens = tokenizer(prompts([name])[:1])
        assert any("longer than CLIP's context" in str(w.message) for w in caught)
        assert tokens.shape == (1, 77) and tokens[0, -1] == tokenizer.eot and tokens[0, 0] == tokenizer.sot


def test_fixtures_are_present():
    for name in ("dinov2", "fcclip", "fcclip_resize"):
        assert (FIXTURES / name / "io.npz").is_file(), f"the {name} parity fixture is missing from tests/fixtures"


@pytest.mark.parametrize("name", ["fcclip", "fcclip_resize"])
def test_instance_inference_matches_the_official_instances(name):
    """Scores and classes to 1e-5 and masks exactly, as sets (the official top-k is unsorted)."""
    fx = load_fixture(name)
    io = fx.io
    masks = postprocess.resize_masks(io["pred_masks"][0], fx.padded, fx.resized, fx.original)
    found = postprocess.instance_inference(io["mask_cls"], masks, fx.is_thing, topk=100)
    order = np.argsort(-io["inst_scores"], kind="stable")
    assert len(found) == len(order)
    np.testing.assert_allclose([f.score for f in found], io["inst_scores"][order], rtol=1e-5, atol=1e-7)
    assert [f.category_id for f in found] == io["inst_pred_classes"][order].tolist()
    for f, i in zip(found, order, strict=True):
        np.testing.assert_array_equal(f.mask, io["inst_pred_masks"][i].astype(bool))
