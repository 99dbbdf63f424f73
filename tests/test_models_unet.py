"""U-Net (2D/3D) and ViT: sizes, shapes, head/body split, deterministic construction."""

from __future__ import annotations

import pytest
import torch

from silomesh.models.segmentation import build_segmenter
from silomesh.models.train import count_parameters
from silomesh.models.unet import UNet, UNetConfig
from silomesh.models.vit import ViTConfig, ViTSeg


@pytest.mark.parametrize(
    ("size", "dims", "low", "high"),
    [
        ("tiny", 2, 20_000, 40_000),
        ("small", 2, 100_000, 2_000_000),
        ("base", 2, 100_000, 2_000_000),
        ("tiny", 3, 10_000, 40_000),
        ("base", 3, 100_000, 2_000_000),
    ],
)
def test_unet_presets_have_parameter_counts_in_range(size: str, dims: int, low: int, high: int) -> None:
    model = UNet(UNetConfig.preset(size, dims, out_channels=3))
    assert low <= count_parameters(model) <= high


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_vit_presets_have_parameter_counts_in_range(size: str) -> None:
    n = count_parameters(ViTSeg(ViTConfig.preset(size)))
    assert (20_000 <= n <= 40_000) if size == "tiny" else (100_000 <= n <= 2_000_000)


def test_unet_2d_keeps_odd_input_size_and_returns_bottleneck() -> None:
    model = UNet(UNetConfig.preset("tiny", 2, out_channels=3))
    logits, feats = model.forward_features(torch.randn(2, 1, 30, 37))
    assert logits.shape == (2, 3, 30, 37)
    # width 8 * 2**depth 2 channels, sides padded to 32 x 40 then divided by 4
    assert feats.shape == (2, 32, 8, 10)


def test_unet_3d_maps_volumes_to_volumes() -> None:
    model = UNet(UNetConfig.preset("tiny", 3, out_channels=4))
    logits, feats = model.forward_features(torch.randn(1, 1, 6, 16, 18))
    assert logits.shape == (1, 4, 6, 16, 18)
    assert feats.dim() == 5 and feats.shape[1] == 16


def test_unet_rejects_input_of_wrong_rank() -> None:
    with pytest.raises(ValueError, match="4-D input"):
        UNet(UNetConfig.preset("tiny", 2)).forward_features(torch.randn(1, 1, 4, 16, 16))


def test_unknown_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown U-Net size 'huge'"):
        UNetConfig.preset("huge")


def test_unet_split_names_cover_every_key_and_head_is_the_output_conv() -> None:
    model = UNet(UNetConfig.preset("tiny", 2, out_channels=3))
    body, head = model.split_names()
    assert sorted(body + head) == sorted(model.state_dict())
    assert head == ["head.weight", "head.bias"]
    assert not set(body) & set(head)


def test_vit_split_names_put_the_decoder_in_the_head() -> None:
    model = ViTSeg(ViTConfig.preset("tiny"))
    body, head = model.split_names()
    assert sorted(body + head) == sorted(model.state_dict())
    assert all(k.startswith("decoder.") for k in head) and head
    assert all(k.startswith("encoder.") for k in body) and body


def test_vit_handles_sizes_other_than_its_positional_grid() -> None:
    model = ViTSeg(ViTConfig.preset("tiny", image_size=32, out_channels=2))
    logits, tokens = model.forward_features(torch.randn(2, 1, 30, 45))
    assert logits.shape == (2, 2, 30, 45)
    assert tokens.shape == (2, 32, 8, 12)


def test_build_segmenter_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a = build_segmenter("unet", "tiny", 7, in_channels=1, out_channels=3)
    after = torch.rand(1)
    b = build_segmenter("unet", "tiny", 7, in_channels=1, out_channels=3)
    c = build_segmenter("unet", "tiny", 8, in_channels=1, out_channels=3)
    assert torch.equal(after, expected)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_head_bias_initialises_the_output_bias() -> None:
    unet = build_segmenter("unet", "tiny", 0, in_channels=1, out_channels=4, head_bias=-2.0)
    vit = build_segmenter("vit", "tiny", 0, in_channels=1, out_channels=4, head_bias=-2.0)
    assert torch.all(unet.state_dict()["head.bias"] == -2.0)
    assert torch.all(vit.state_dict()["decoder.out.bias"] == -2.0)


def test_3d_vit_is_refused() -> None:
    with pytest.raises(ValueError, match="2D only"):
        build_segmenter("vit", "tiny", 0, in_channels=1, out_channels=2, dims=3)
