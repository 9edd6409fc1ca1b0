"""Hugging Face ``transformers`` CNNs (randomly initialised from small configs; no download), pruned through the
CNN path from ``{"pixel_values": x}`` batches.

Their forwards take ``**kwargs``, check ``pixel_values.shape[1]`` against the configured channels, and (MobileNetV2)
compute TensorFlow-style padding with ``int(x.shape[-1])``, none of which plain torch.fx traces; ConvNeXt's (in
transformers 5) is wrapped by a decorator that takes ``(self, *args, **kwargs)``. What may be pruned
follows from the architectures (He et al. 2016; Sandler et al. 2018): in a basic residual block the first
convolution (through its BatchNorm and ReLU), in a bottleneck block the first and the second, in an inverted
residual block the expansion convolution through the depthwise one, in a ConvNeXt block (Liu et al. 2022) the
first Linear of its MLP; every block's last convolution feeds a
residual sum or the next block's input, which is also a residual branch.

Oracles: those lists, derived from the modules; the unpruned network (keep everything); the original network with
the removed channels zeroed at the consumers' inputs (no refit).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _torch_helpers import zeroed_at_consumers

import nn_adapters as nna

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "mobilenet_v2":
            cfg = transformers.MobileNetV2Config(depth_multiplier=0.35, image_size=32, num_labels=5)
            net = transformers.MobileNetV2ForImageClassification(cfg)
        elif kind == "levit":  # caches its attention biases per device in forward(); reads a buffer as an index
            cfg = transformers.LevitConfig(image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3],
                                           depths=[1, 1, 1], key_dim=[8, 8, 8], num_labels=5)
            net = transformers.LevitForImageClassification(cfg)
        elif kind == "convnext":
            cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 2], num_stages=2, num_labels=5)
            net = transformers.ConvNextForImageClassification(cfg)
        else:
            cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 2], layer_type=kind,
                                            num_labels=5)
            net = transformers.ResNetForImageClassification(cfg)
    for m in net.modules():  # trained-looking BatchNorms
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _expected_pairs(net: torch.nn.Module) -> set[str]:
    out = set()
    for name, m in net.named_modules():
        kind = type(m).__name__
        if kind == "ResNetBasicLayer":
            out.add(f"{name}.layer.0.convolution->{name}.layer.1.convolution")
        elif kind == "ResNetBottleNeckLayer":
            out |= {f"{name}.layer.0.convolution->{name}.layer.1.convolution",
                    f"{name}.layer.1.convolution->{name}.layer.2.convolution"}
        elif kind == "ConvNextLayer":  # the MLP of the block, on channels-last positions
            out.add(f"{name}.pwconv1->{name}.pwconv2")
        elif kind == "MobileNetV2InvertedResidual":
            out.add(f"{name}.expand_1x1.convolution->{name}.reduce_1x1.convolution")
    return out


def _pixels(n: int = 32) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("kind", ["basic", "bottleneck", "mobilenet_v2", "convnext"])
def test_the_prunable_pairs_of_hugging_face_cnns_are_those_of_their_architecture(kind):
    net = _model(kind)
    pairs, skipped = nna.find_pairs(net, _pixels(2))
    names = {p.name for p in pairs}
    expected = _expected_pairs(net)
    assert len(expected) >= 2
    if kind == "mobilenet_v2":  # also non-residual block outputs feeding the next expansion: a superset
        assert expected <= names
        for p in pairs:
            if p.name in expected:
                assert any(b.endswith("conv_3x3.convolution") for b in p.between)  # the depthwise conv
    else:
        assert names == expected
    assert all(p.name not in names for p in pairs if "shortcut" in p.producer)


@pytest.mark.parametrize("method", ["layer", "asym"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "mobilenet_v2", "convnext", "levit"])
def test_keeping_every_unit_reproduces_the_hugging_face_cnn(kind, method):
    net, x = _model(kind), _pixels()
    pruned, report = nna.prune(net, x, keep=1.0, method=method)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x).logits, net(**x).logits, rtol=1e-4, atol=1e-5)
    if kind == "levit":
        # the convolutions of its patch embedding, Conv -> BatchNorm -> Hardswish -> Conv, and its MLPs: Linear ->
        # flatten(0, 1) -> BatchNorm1d -> reshape_as -> Hardswish -> Linear (the tokens merged into the batch dim
        # around the BatchNorm)
        emb = "levit.patch_embeddings.embedding_layer_"
        mlps = [f"{n}.linear_up.linear->{n}.linear_down.linear" for n, m in net.named_modules()
                if type(m).__name__ == "LevitMLPLayer"]
        assert len(mlps) >= 3
        assert [r.pair for r in report.layers] == [f"{emb}{i}.convolution->{emb}{i + 1}.convolution"
                                                   for i in (1, 2, 3)] + mlps


@pytest.mark.parametrize("kind", ["bottleneck", "mobilenet_v2", "convnext", "levit"])
def test_without_refit_the_pruned_cnn_is_the_original_with_the_removed_channels_zeroed(kind):
    net, x = _model(kind), _pixels()
    pruned, report = nna.prune(net, x, keep=0.5, method="asym", reweight=False)
    assert report.params_after < report.params_before
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x).logits, zeroed_at_consumers(net, report, x).logits,
                                   rtol=1e-4, atol=1e-5)


def _mobilevit() -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.MobileViTConfig(image_size=32, hidden_sizes=[16, 24, 32],
                                           neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_labels=5)
        return transformers.MobileViTForImageClassification(cfg).eval()


def test_a_hybrid_model_is_pruned_by_its_layer_pairs_with_target_layers():
    """MobileViT (Mehta & Rastegari 2022) holds transformer blocks that the transformer adapter recognises but
    refuses (they are not one stack); ``target="layers"`` prunes the pairs found by tracing instead: the inverted
    residual blocks' expansions and the transformer blocks' MLPs, whose patches are moved into the batch dim."""
    net, x = _mobilevit(), _pixels()
    with pytest.raises(ValueError, match="pass target='layers'"):
        nna.prune(net, x, keep=0.5)
    pruned, report = nna.prune(net, x, keep=1.0, target="layers", method="asym")
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x).logits, net(**x).logits, rtol=1e-4, atol=1e-5)
    names = {r.pair for r in report.layers}
    mlps = {f"{n}.intermediate.dense->{n}.output.dense" for n, m in net.named_modules()
            if type(m).__name__ == "MobileViTTransformerLayer"}
    assert mlps and mlps <= names
    pruned, report = nna.prune(net, x, keep=0.5, target="layers", method="asym", reweight=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(**x).logits, zeroed_at_consumers(net, report, x).logits,
                                   rtol=1e-4, atol=1e-5)
