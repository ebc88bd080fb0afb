"""Registered encoders load files in the layout of their published checkpoints and extract features of
the published width on the real slide; wrong files and missing gated models give one-line errors.

The published layouts are written here independently of the registry: timm models from the kwargs
their published loaders use, transformers models from the tensor names their hub files hold (the
names of transformers 4, which saved them). To stay fast, most files have one transformer block
(same key names and widths); the registry's ``depth`` builds the matching shallow model. UNI is also
loaded from a full-depth (24-block) file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from helpers import assert_one_line_error, run_healnet
from safetensors.torch import save_file
from timm.layers import SwiGLUPacked
from torch import nn

from preprocessing.core.errors import InputError
from preprocessing.features import registry
from preprocessing.features.encoders import build_encoder
from preprocessing.features.store import read_store, store_attrs
from preprocessing.features.weights import sha256_file
from preprocessing.tiling.tiles import write_tiles

SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
# architecture and kwargs as the published loaders (TRIDENT, the model cards) build each timm model
TIMM_LAYOUT = {
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0)),
    "uni2_h": ("vit_giant_patch14_224", dict(img_size=224, patch_size=14, depth=24, num_heads=24,
                                             init_values=1e-5, embed_dim=1536, mlp_ratio=2.66667 * 2,
                                             num_classes=0, no_embed_class=True, reg_tokens=8, **SWIGLU)),
    "virchow": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375,
                                             global_pool="", **SWIGLU)),
    "virchow2": ("vit_huge_patch14_224", dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4,
                                              mlp_ratio=5.3375, global_pool="", **SWIGLU)),
    "gigapath": ("vit_giant_patch14_dinov2", dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536,
                                                  depth=40, num_heads=24, mlp_ratio=5.33334, num_classes=0)),
    "hoptimus0": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                        init_values=1e-5)),
    "hoptimus1": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, global_pool="token",
                                                        init_values=1e-5)),
    "efficientnet_lite0": ("efficientnet_lite0", {}),  # the whole classifier, as timm saves it
    "resnet50_trunc": ("resnet50", {}),  # torchvision's full ResNet-50 (layer4 and fc are left out)
}
PUBLISHED_DEPTH = {"uni": 24, "uni2_h": 24, "virchow": 32, "virchow2": 32, "gigapath": 40, "hoptimus0": 40,
                   "hoptimus1": 40, "conch_v15": 24, "phikon": 12, "phikon_v2": 24}
# one published tensor per model, to check the layout really is the published one
LANDMARKS = {
    "uni": ("blocks.0.ls1.gamma", (1024,)),
    "uni2_h": ("reg_token", (1, 8, 1536)),
    "virchow": ("blocks.0.mlp.fc1.weight", (6832, 1280)),
    "virchow2": ("pos_embed", (1, 261, 1280)),
    "gigapath": ("patch_embed.proj.weight", (1536, 3, 16, 16)),
    "hoptimus0": ("blocks.0.mlp.fc2.weight", (1536, 4096)),
    "hoptimus1": ("reg_token", (1, 4, 1536)),
    "conch_v15": ("attn_pool_contrast.to_kv.weight", (1536, 1024)),
    "phikon": ("encoder.layer.0.intermediate.dense.weight", (3072, 768)),
    "phikon_v2": ("encoder.layer.0.layer_scale1.lambda1", (1024,)),
}


def _random(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in shapes.items()}
    for key in state:  # batch norm: positive variances, an integer batch counter
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 1
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
    return state


def _timm_shapes(arch: str, kwargs: dict, depth: int | None) -> dict[str, tuple[int, ...]]:
    args = dict(kwargs, **({"depth": depth} if depth else {}))
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _attention_shapes(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    """One transformers ViT/Dinov2 layer's attention: query, key, value and output projections."""
    parts = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
             "attention.output.dense")
    return {prefix + part + suffix: shape for part in parts
            for suffix, shape in ((".weight", (d, d)), (".bias", (d,)))}


def _phikon_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """owkin/phikon's file: a transformers-4 ViTModel (ViT-B/16) with its pooler."""
    d = 768
    shapes = {"embeddings.cls_token": (1, 1, d), "embeddings.position_embeddings": (1, 197, d),
              "embeddings.patch_embeddings.projection.weight": (d, 3, 16, 16),
              "embeddings.patch_embeddings.projection.bias": (d,)}
    for i in range(depth):
        p = f"encoder.layer.{i}."
        shapes |= _attention_shapes(p, d)
        shapes |= {p + "intermediate.dense.weight": (4 * d, d), p + "intermediate.dense.bias": (4 * d,),
                   p + "output.dense.weight": (d, 4 * d), p + "output.dense.bias": (d,)}
        for norm in ("layernorm_before", "layernorm_after"):
            shapes |= {p + norm + ".weight": (d,), p + norm + ".bias": (d,)}
    return shapes | {"layernorm.weight": (d,), "layernorm.bias": (d,), "pooler.dense.weight": (d, d),
                     "pooler.dense.bias": (d,)}


def _phikon_v2_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """owkin/phikon-v2's file: a Dinov2Model, ViT-L/16 with layer scale."""
    d = 1024
    shapes = {"embeddings.cls_token": (1, 1, d), "embeddings.mask_token": (1, d),
              "embeddings.position_embeddings": (1, 197, d),
              "embeddings.patch_embeddings.projection.weight": (d, 3, 16, 16),
              "embeddings.patch_embeddings.projection.bias": (d,)}
    for i in range(depth):
        p = f"encoder.layer.{i}."
        shapes |= _attention_shapes(p, d)
        shapes |= {p + "mlp.fc1.weight": (4 * d, d), p + "mlp.fc1.bias": (4 * d,),
                   p + "mlp.fc2.weight": (d, 4 * d), p + "mlp.fc2.bias": (d,),
                   p + "layer_scale1.lambda1": (d,), p + "layer_scale2.lambda1": (d,)}
        for norm in ("norm1", "norm2"):
            shapes |= {p + norm + ".weight": (d,), p + norm + ".bias": (d,)}
    return shapes | {"layernorm.weight": (d,), "layernorm.bias": (d,)}


def _conch_shapes(depth: int) -> dict[str, tuple[int, ...]]:
    """MahmoodLab/conchv1_5's pytorch_model_vision.bin: ViT-L/16 trunk (layer scale, 224 px position
    grid) and the contrastive attentional pooler."""
    trunk = _timm_shapes("vit_large_patch16_224", dict(init_values=1.0, num_classes=0), depth)
    pool = {"attn_pool_contrast.query": (1, 768), "attn_pool_contrast.ln_k.weight": (1024,),
            "attn_pool_contrast.ln_k.bias": (1024,), "attn_pool_contrast.ln_q.weight": (768,),
            "attn_pool_contrast.ln_q.bias": (768,), "attn_pool_contrast.to_q.weight": (768, 768),
            "attn_pool_contrast.to_kv.weight": (1536, 1024), "attn_pool_contrast.to_out.weight": (768, 768),
            "ln_contrast.weight": (768,), "ln_contrast.bias": (768,)}
    return {f"trunk.{k}": v for k, v in trunk.items()} | pool


def published_shapes(name: str, depth: int | None) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of ``name``'s published checkpoint, with ``depth`` blocks."""
    if name == "phikon":
        return _phikon_shapes(depth or 12)
    if name == "phikon_v2":
        return _phikon_v2_shapes(depth or 24)
    if name == "conch_v15":
        return _conch_shapes(depth)
    arch, kwargs = TIMM_LAYOUT[name]
    return _timm_shapes(arch, kwargs, depth if name in PUBLISHED_DEPTH else None)


def save_published(name: str, folder: Path, depth: int | None, state: dict | None = None) -> Path:
    """Random weights in ``name``'s published layout, saved as the registry's file in ``folder``."""
    state = state if state is not None else _random(published_shapes(name, depth))
    info = registry.REGISTRY[name]
    filename = info.files[-1] if info.kind != "builtin" else "weights.pth"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.fixture
def shallow(monkeypatch):
    """Build registered foundation models with ``depth`` blocks (the published layout otherwise)."""
    def use(name: str, depth: int) -> None:
        if name in registry.FOUNDATION:
            monkeypatch.setitem(registry.FOUNDATION, name, dataclasses.replace(registry.FOUNDATION[name],
                                                                               depth=depth))
    return use


@pytest.fixture(scope="module")
def cmu_tiles(real_slide, tmp_path_factory) -> Path:
    """Two 256 px patches of tissue on the real CMU-1 slide (20x, 0.499 µm/px)."""
    meta = {"slide": "CMU-1-Small-Region", "level": 0, "downsample": 1.0, "patch_size_level0": 257,
            "patch_size": 256, "target_mpp": 0.5, "mpp": 0.499, "mpp_source": "aperio"}
    frame = pd.DataFrame({"x": [514, 771], "y": [1285, 1285], "tissue_fraction": 1.0})
    return write_tiles(tmp_path_factory.mktemp("cmu") / "cmu.parquet", frame, meta)


def extract(capsys, slide: Path, tiles: Path, out: Path, name: str, weights: Path | None):
    args = [slide, tiles, "-o", out, "--encoder", name, "--workers", "0", "--dtype", "float32",
            "--no-progress", "--threads", "2"]
    return run_healnet(capsys, "extract", *args, *(["--weights", weights] if weights else []))


def test_published_layouts_are_the_ones_the_loaders_expect():
    for name, (key, shape) in LANDMARKS.items():
        assert published_shapes(name, 1)[key] == shape, name
    assert len(published_shapes("uni", None)) == 4 + 24 * 14 + 2  # cls, pos, patch conv; 24 blocks; norm


@pytest.mark.parametrize("name", list(registry.FOUNDATION))
def test_published_layout_extracts_the_published_width(name, real_slide, cmu_tiles, shallow, capsys, tmp_path,
                                                       one_torch_thread):
    depth = 1
    shallow(name, depth)
    state = _random(published_shapes(name, depth))
    folder = tmp_path / "weights"
    path = save_published(name, folder, depth, state)
    given = folder  # as `hf download` writes it
    out = tmp_path / "slide.zarr"
    ran = extract(capsys, real_slide, cmu_tiles, out, name, given)
    assert ran.returncode == 0, ran.stderr
    features, _ = read_store(out)
    info = registry.REGISTRY[name]
    assert features.shape == (2, info.feature_dim) and np.isfinite(features).all()
    attrs = store_attrs(out)
    assert attrs["encoder"] == name and attrs["weights_sha256"] == sha256_file(path)
    assert attrs["weights"] == str(given) and attrs["model_id"] == info.repo
    assert tuple(attrs["mean"]) == pytest.approx(info.mean) and attrs["input_size"] == [info.input_size] * 2

    key = list(state)[len(state) // 2]
    renamed = {(k + "_renamed" if k == key else k): v for k, v in state.items()}
    bad = save_published(name, tmp_path / "bad", depth, renamed)
    ran = extract(capsys, real_slide, cmu_tiles, tmp_path / "bad.zarr", name, bad)
    assert_one_line_error(ran, key, f"{key}_renamed", "missing keys", "unexpected keys", command="extract",
                          source=bad)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50_trunc"])
def test_imagenet_encoders_load_their_published_layout(name, tmp_path):
    """The two CNNs extract through the same path in tests/test_extract.py; here their files load."""
    state = _random(published_shapes(name, None))
    encoder = build_encoder(name, weights=save_published(name, tmp_path, None, state))
    assert encoder.feature_dim == registry.REGISTRY[name].feature_dim
    key = list(state)[len(state) // 2]
    bad = save_published(name, tmp_path / "bad", None, {(k + "_renamed" if k == key else k): v
                                                         for k, v in state.items()})
    with pytest.raises(InputError) as info:
        build_encoder(name, weights=bad)
    assert_one_line_error(info, key, f"{key}_renamed", source=bad)


def test_full_depth_uni_file_loads(tmp_path):
    """All 24 blocks, 1.2 GB, through the code path of --weights (extraction itself is checked above)."""
    state = _random(published_shapes("uni", None), seed=1)
    path = save_published("uni", tmp_path / "uni", None, state)
    encoder = build_encoder("uni", weights=path)
    loaded = encoder.model.state_dict()
    assert len(encoder.model.blocks) == 24 and set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in ("blocks.23.ls2.gamma", "pos_embed", "norm.bias"))
    assert encoder.feature_dim == 1024 and encoder.weights_sha256 == sha256_file(path)


@pytest.fixture
def empty_hf_home(monkeypatch, tmp_path) -> Path:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf"


def test_gated_model_without_weights_names_the_fetch_command(real_slide, cmu_tiles, empty_hf_home, capsys,
                                                             tmp_path):
    ran = extract(capsys, real_slide, cmu_tiles, tmp_path / "uni.zarr", "uni", None)
    assert_one_line_error(ran, "UNI", "MahmoodLab/UNI", "accept its terms",
                          "`hf download MahmoodLab/UNI pytorch_model.bin --local-dir models/uni`",
                          command="extract", source="uni")
    assert not (tmp_path / "uni.zarr").exists()


def test_weights_come_from_the_offline_hugging_face_cache(empty_hf_home, shallow, monkeypatch):
    shallow("virchow2", 1)
    snapshot = empty_hf_home / "hub" / "models--paige-ai--Virchow2" / "snapshots" / "abc123"
    path = save_published("virchow2", snapshot, 1)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    encoder = build_encoder("virchow2")
    assert encoder.weights_source == f"hf-hub:paige-ai/Virchow2/{path.name}"
    assert encoder.weights_sha256 == sha256_file(path) and encoder.feature_dim == 2560
    assert encoder.describe()["model_id"] == "paige-ai/Virchow2" and not encoder.weights_given


def test_random_weights_only_when_asked(empty_hf_home, shallow):
    shallow("phikon", 1)
    encoder = build_encoder("phikon", allow_random=True)
    assert encoder.weights_source == "random" and encoder.weights_sha256 is None
    assert encoder.feature_dim == 768


def test_folder_without_the_registered_file_is_an_input_error(tmp_path):
    (tmp_path / "UNI").mkdir()
    with pytest.raises(InputError) as info:
        build_encoder("uni", weights=tmp_path / "UNI")
    assert_one_line_error(info, "pytorch_model.bin", "MahmoodLab/UNI", source=tmp_path / "UNI")


def test_encoders_command_prints_one_line_per_encoder(capsys):
    ran = run_healnet(capsys, "encoders")
    lines = ran.stdout.strip().splitlines()
    assert ran.returncode == 0 and len(lines) == 1 + len(registry.REGISTRY)
    assert any(line.startswith("virchow2 ") and " 2560 " in line for line in lines)
