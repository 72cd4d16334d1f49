"""Winograd F(4×4, 3×3) convolutions: the same numbers as conv2d, on the gradient path only."""

import pytest
import torch
import torch.nn.functional as F

from stylekit import engine, native_transforms, winograd
from stylekit.features import BACKBONES, FeatureExtractor
from stylekit.weights import random_state_dict


@pytest.fixture(params=["c", "torch"])
def transforms(request, monkeypatch):
    """Each test of the convolution runs with the C transforms and with torch's (the fallback)."""
    if request.param == "c" and native_transforms.transforms() is None:
        pytest.skip("no C compiler here: only torch's transforms")
    if request.param == "torch":
        monkeypatch.setattr(native_transforms, "transforms", lambda: None)
    return request.param


def _layer(cin: int, cout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(cout, cin, 3, 3, generator=gen) / (9 * cin) ** 0.5,
            torch.randn(cout, generator=gen))


def _relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    value, exact = value.detach().double(), exact.detach().double()
    return float((value - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("shape", [(1, 16, 12, 16), (2, 16, 13, 11), (1, 8, 9, 40),
                                   (1, 8, 1, 70), (1, 8, 70, 1), (2, 8, 2, 3)])  # a panorama's conv5_1
def test_winograd_convolution_equals_conv2d_within_fp32_rounding(shape, transforms):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    weight, bias = _layer(shape[1], 24)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    out = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
    assert out.shape == exact.shape and out.dtype == torch.float32
    assert _relative_error(out, exact) < 2e-5


def test_winograd_output_is_channels_last_like_the_network_around_it(transforms):
    x = torch.rand(1, 16, 12, 16, generator=torch.Generator().manual_seed(1))
    weight, bias = _layer(16, 24)
    out = winograd.conv3x3(x.to(memory_format=torch.channels_last), winograd.transform_weight(weight), bias)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_large_inputs_are_convolved_band_by_band_with_the_same_result(monkeypatch, transforms):
    x = torch.rand(1, 16, 40, 24, generator=torch.Generator().manual_seed(6))
    weight, bias = _layer(16, 16)
    whole = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
    monkeypatch.setattr(winograd, "BAND_BYTES", 36 * 6 * 16 * 4 * 3)  # three tile rows per band
    banded = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
    torch.testing.assert_close(banded, whole)


def test_winograd_convolution_without_bias(transforms):
    x = torch.rand(1, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    weight, _ = _layer(8, 8)
    exact = F.conv2d(x.double(), weight.double(), padding=1)
    assert _relative_error(winograd.conv3x3(x, winograd.transform_weight(weight), None), exact) < 2e-5


def test_transposed_kernels_give_the_input_gradient_of_the_convolution(transforms):
    grad = torch.randn(2, 24, 12, 20, generator=torch.Generator().manual_seed(3))
    weight, _ = _layer(16, 24)
    exact = torch.nn.grad.conv2d_input((2, 16, 12, 20), weight.double(), grad.double(), padding=1)
    out = winograd.conv3x3(grad, winograd.transform_weight(weight, transposed=True), None)
    assert out.shape == exact.shape and _relative_error(out, exact) < 2e-5


def test_winograd_is_used_only_for_plain_3x3_convolutions_with_many_channels():
    deep, _ = _layer(256, 256)
    assert winograd.pays_off(deep, (1, 1), (1, 1), (1, 1), 1)
    assert not winograd.pays_off(deep, (2, 2), (1, 1), (1, 1), 1)  # strided
    assert not winograd.pays_off(deep, (1, 1), (0, 0), (1, 1), 1)  # 'valid'
    assert not winograd.pays_off(deep, (1, 1), (1, 1), (1, 1), 2)  # grouped
    assert not winograd.pays_off(torch.zeros(256, 256, 1, 1), 1, 0, 1, 1)  # 1×1
    assert not winograd.pays_off(_layer(64, 64)[0], 1, 1, 1, 1)  # too few channels to gain


def test_c_and_torch_transforms_give_the_same_convolution(monkeypatch):
    if native_transforms.transforms() is None:
        pytest.skip("no C compiler here")
    x = torch.rand(2, 32, 21, 18, generator=torch.Generator().manual_seed(7))
    weight, bias = _layer(32, 40)
    c = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
    monkeypatch.setattr(native_transforms, "transforms", lambda: None)
    torch_made = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
    assert _relative_error(c, torch_made.double()) < 1e-5


def test_the_c_transforms_give_the_same_convolution_on_one_thread_as_on_several():
    if native_transforms.transforms() is None:
        pytest.skip("no C compiler here")
    x = torch.rand(2, 32, 23, 18, generator=torch.Generator().manual_seed(9))
    weight, bias = _layer(32, 40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # tiles split unevenly among threads, odd tile count
        shared = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
        torch.set_num_threads(1)
        alone = winograd.conv3x3(x, winograd.transform_weight(weight), bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(shared, alone)  # each tile is computed alike, whichever thread takes it


def test_a_double_precision_input_is_convolved_by_torchs_transforms_not_read_as_fp32():
    x = torch.rand(1, 8, 12, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    weight, bias = _layer(8, 8)
    exact = F.conv2d(x, weight.double(), bias.double(), padding=1)
    out = winograd.conv3x3(x, winograd.transform_weight(weight).double(), bias.double())
    assert out.dtype == torch.float64 and _relative_error(out, exact) < 1e-6  # fp32 kernels


def test_cheaper_c_transforms_take_winograd_down_to_conv2_1(monkeypatch):
    conv2_1, conv1_2 = _layer(64, 128)[0], _layer(64, 64)[0]  # Cin·Cout / (Cin + Cout) = 43, 32
    monkeypatch.setattr(native_transforms, "transforms", lambda: "a loaded library")
    assert winograd.pays_off(conv2_1, 1, 1, 1, 1)
    assert not winograd.pays_off(conv1_2, 1, 1, 1, 1)
    monkeypatch.setattr(native_transforms, "transforms", lambda: None)
    assert not winograd.pays_off(conv2_1, 1, 1, 1, 1)


def _normalised(extractor: FeatureExtractor, image: torch.Tensor) -> torch.Tensor:
    return (image - extractor.mean) / extractor.std


def _plain_features(extractor: FeatureExtractor, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The extractor's layers run one by one as plain modules: direct convolutions, autograd's backward."""
    x, out = _normalised(extractor, image), {}
    for name, stage in zip(extractor.names, extractor.stages, strict=True):
        x = stage(x)
        if name in extractor.layers:
            out[name] = x
    return out


def _loss(features: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(feature.pow(2).mean() for feature in features.values())


@pytest.fixture(scope="module")
def extractor():
    spec = BACKBONES["vgg19"]
    return FeatureExtractor("vgg19", random_state_dict("vgg19", seed=4),
                            spec.content_layers + spec.style_layers)


def _image() -> torch.Tensor:
    # 64×64: conv3_* run at 16×16 (Winograd), conv4_* and conv5_1 at 8×8 (Winograd), the rest direct.
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def test_deep_layers_on_the_cpu_gradient_path_run_as_winograd(transforms):
    network = FeatureExtractor("vgg19", random_state_dict("vgg19", seed=4),
                               BACKBONES["vgg19"].style_layers)
    image = _image().requires_grad_(True)
    with torch.profiler.profile() as profile:
        network(image)
    direct = sum(event.count for event in profile.key_averages() if event.key == "aten::conv2d")
    # Of VGG19's 13 convolutions up to relu5_1, conv1_1 and conv1_2 have too few channels, and so
    # have conv2_1 and conv2_2 for torch's transforms; conv5_1 (4×4 here) has too few pixels; the rest
    # run as Winograd.
    assert direct == {"c": 3, "torch": 5}[transforms]


def test_winograd_features_and_gradient_match_plain_direct_convolutions(extractor):
    image = _image().requires_grad_(True)
    features = extractor(image)
    _loss(features).backward()
    fast_gradient = image.grad.clone()
    image.grad = None
    plain = _plain_features(extractor, image)
    _loss(plain).backward()
    for name in plain:
        assert _relative_error(features[name], plain[name].double()) < 2e-5
    error = float((fast_gradient - image.grad).norm() / image.grad.norm())
    assert error < 1e-3


def test_forward_only_passes_keep_the_direct_convolution(extractor):
    with torch.no_grad():
        features = extractor(_image())
        plain = _plain_features(extractor, _image())
    assert all(torch.equal(features[name], plain[name]) for name in plain)


def test_cpu_network_runs_channels_last_with_the_plain_layouts_features_and_gradient(extractor):
    last = FeatureExtractor("vgg19", random_state_dict("vgg19", seed=4), extractor.layers).to(
        memory_format=engine.memory_format(torch.device("cpu")))
    runs = []
    for network in (extractor, last):
        image = _image().requires_grad_(True)
        features = network(image)
        _loss(features).backward()
        runs.append((features, image.grad))
    (plain_features, plain_gradient), (features, gradient) = runs
    for name in plain_features:
        assert features[name].is_contiguous(memory_format=torch.channels_last)
        assert _relative_error(features[name], plain_features[name]) < 2e-5
    assert float((gradient - plain_gradient).norm() / plain_gradient.norm()) < 2e-5


def test_c_transforms_that_find_no_scratch_memory_raise_memory_error():
    class NoScratch:  # the C library's answer when its malloc fails
        def winograd_input(self, *args):
            return 1

    weight, bias = _layer(8, 8)
    with pytest.raises(MemoryError, match="no memory for the Winograd input transform"):
        winograd._conv3x3_c(NoScratch(), torch.rand(1, 8, 12, 12), winograd.transform_weight(weight), bias, 4)
