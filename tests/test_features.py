"""The backbones as named-layer feature extractors."""

import pytest
import torch
import torchvision

from stylekit.backbones import VGG_CFGS
from stylekit.features import BACKBONES, FeatureExtractor
from stylekit.weights import random_state_dict


@pytest.fixture(scope="module")
def vgg19_state():
    return random_state_dict("vgg19", seed=3)


def test_vgg19_layers_are_named_as_in_the_papers():
    relus = [name for name in BACKBONES["vgg19"].layers if name.startswith("relu")]
    assert relus[0] == "relu1_1" and relus[-1] == "relu5_4" and len(relus) == 16
    assert "relu4_2" in relus and "pool5" in BACKBONES["vgg19"].layers


def test_extractor_returns_exactly_the_requested_layers(vgg19_state):
    extractor = FeatureExtractor("vgg19", vgg19_state, ["relu1_1", "relu4_2"])
    out = extractor(torch.rand(1, 3, 32, 32))
    assert set(out) == {"relu1_1", "relu4_2"}
    assert out["relu1_1"].shape == (1, 64, 32, 32) and out["relu4_2"].shape == (1, 512, 4, 4)


def test_extractor_stops_at_the_deepest_requested_layer(vgg19_state):
    extractor = FeatureExtractor("vgg19", vgg19_state, ["relu2_1"])
    assert extractor.names[-1] == "relu2_1"


def test_average_pooling_replaces_max_pooling(vgg19_state):
    extractor = FeatureExtractor("vgg19", vgg19_state, ["relu3_1"], pooling="avg")
    kinds = {type(stage).__name__ for stage in extractor.stages}
    assert "AvgPool2d" in kinds and "MaxPool2d" not in kinds


def test_normalisation_happens_inside_the_extractor(vgg19_state):
    extractor = FeatureExtractor("vgg19", vgg19_state, ["conv1_1"])
    mean_image = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    assert extractor(mean_image)["conv1_1"].abs().max() < 1e-5  # zero biases, zero input


def test_unknown_layer_is_refused(vgg19_state):
    with pytest.raises(ValueError, match="relu9_9"):
        FeatureExtractor("vgg19", vgg19_state, ["relu9_9"])


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_other_backbones_give_their_default_layers(backbone):
    spec = BACKBONES[backbone]
    extractor = FeatureExtractor(backbone, random_state_dict(backbone, seed=0),
                                 spec.content_layers + spec.style_layers)
    out = extractor(torch.rand(1, 3, 32, 32))
    assert set(out) == set(spec.content_layers + spec.style_layers)


def _features_and_gradient(extractor, image, checkpoint, gradient_dtype=None):
    image = image.clone().requires_grad_(True)
    out = extractor(image, checkpoint=checkpoint, gradient_dtype=gradient_dtype)
    sum(feature.pow(2).mean() for feature in out.values()).backward()
    return out, image.grad


@pytest.mark.parametrize("backbone", ["vgg19", "resnet50"])
def test_checkpointing_gives_the_same_features_and_gradient(backbone):
    spec = BACKBONES[backbone]
    extractor = FeatureExtractor(backbone, random_state_dict(backbone, seed=1),
                                 spec.content_layers + spec.style_layers)
    image = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    plain, plain_grad = _features_and_gradient(extractor, image, checkpoint=False)
    saved, saved_grad = _features_and_gradient(extractor, image, checkpoint=True)
    assert list(saved) == list(plain)
    for name in plain:
        torch.testing.assert_close(saved[name], plain[name])
    torch.testing.assert_close(saved_grad, plain_grad)


def test_checkpointing_keeps_fewer_tensors_for_the_backward_pass(vgg19_state):
    extractor = FeatureExtractor("vgg19", vgg19_state, BACKBONES["vgg19"].style_layers)
    image = torch.rand(1, 3, 64, 64, requires_grad=True)

    def saved_bytes(checkpoint: bool) -> int:
        sizes: list[int] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            sizes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            extractor(image, checkpoint=checkpoint)
        return sum(sizes)

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def _default_extractor(backbone: str) -> FeatureExtractor:
    spec = BACKBONES[backbone]
    return FeatureExtractor(backbone, random_state_dict(backbone, seed=1),
                            spec.content_layers + spec.style_layers)


def _test_image() -> torch.Tensor:
    return torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0))


def _fp32_and_bf16_gradient_runs(backbone: str):
    """(features, gradient) of the test image, once in plain fp32 and once with bf16 gradients."""
    extractor = _default_extractor(backbone)
    return (_features_and_gradient(extractor, _test_image(), checkpoint=False),
            _features_and_gradient(extractor, _test_image(), checkpoint=False,
                                   gradient_dtype=torch.bfloat16))


@pytest.mark.parametrize("backbone", ["vgg19", "resnet50"])
def test_bf16_gradient_leaves_the_features_exactly_fp32(backbone):
    (plain, _), (low, _) = _fp32_and_bf16_gradient_runs(backbone)
    for name in plain:
        assert low[name].dtype == torch.float32 and torch.equal(low[name], plain[name])


@pytest.mark.parametrize("backbone", ["vgg19", "resnet50"])
def test_bf16_gradient_is_computed_in_bf16_and_stays_close_to_fp32(backbone):
    (_, plain), (_, low) = _fp32_and_bf16_gradient_runs(backbone)
    error = float((low - plain).norm() / plain.norm())
    assert low.dtype == torch.float32 and 0 < error < 0.03


def test_bf16_gradient_is_the_same_with_checkpointing():
    extractor = _default_extractor("vgg19")
    _, plain = _features_and_gradient(extractor, _test_image(), checkpoint=False,
                                      gradient_dtype=torch.bfloat16)
    _, saved = _features_and_gradient(extractor, _test_image(), checkpoint=True,
                                      gradient_dtype=torch.bfloat16)
    torch.testing.assert_close(saved, plain)


def test_bf16_gradient_leaves_forward_only_passes_alone():
    extractor = _default_extractor("vgg19")
    with torch.no_grad():
        plain = extractor(_test_image())
        low = extractor(_test_image(), gradient_dtype=torch.bfloat16)
    assert all(torch.equal(low[name], plain[name]) for name in plain)


def test_the_torch_free_vgg_layouts_are_torchvisions():
    cfgs = torchvision.models.vgg.cfgs
    assert {"vgg19": cfgs["E"], "vgg16": cfgs["D"]} == VGG_CFGS
