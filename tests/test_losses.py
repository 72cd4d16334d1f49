"""The canonical loss terms, checked against hand computation."""

import pytest
import torch

from stylekit.losses import blend_grams, content_loss, gram, style_loss, tv_loss


def test_gram_is_feature_outer_product_over_c_h_w():
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # N=1, C=2, H=1, W=2
    expected = torch.tensor([[[1 + 4, 3 + 8], [3 + 8, 9 + 16]]]) / (2 * 1 * 2)
    assert torch.allclose(gram(features), expected)


def test_gram_is_computed_in_float32_from_bfloat16_features():
    features = torch.ones(1, 3, 4, 4, dtype=torch.bfloat16)
    assert gram(features).dtype == torch.float32


def test_content_loss_is_mean_squared_feature_difference():
    features = {"relu4_2": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])}
    targets = {"relu4_2": torch.tensor([[[[1.0, 0.0], [3.0, 0.0]]]])}
    assert content_loss(features, targets).item() == pytest.approx((4 + 16) / 4)


def test_style_loss_is_weighted_mean_squared_gram_difference():
    a = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    target = torch.zeros(1, 2, 2)
    g = gram(a)
    expected = 0.5 * g.pow(2).mean().item()
    assert style_loss({"relu1_1": a}, {"relu1_1": target}, {"relu1_1": 0.5}).item() == pytest.approx(expected)


def test_losses_are_zero_for_identical_images():
    features = {"relu1_1": torch.rand(1, 4, 5, 5), "relu4_2": torch.rand(1, 8, 3, 3)}
    assert content_loss(features, {"relu4_2": features["relu4_2"]}).item() == 0
    assert style_loss(features, {"relu1_1": gram(features["relu1_1"])}, {"relu1_1": 1.0}).item() == 0


def test_tv_loss_is_mean_squared_neighbour_difference():
    image = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # a vertical edge: dx = 1, dy = 0
    assert tv_loss(image).item() == pytest.approx(1.0)
    assert tv_loss(torch.full((1, 3, 4, 4), 0.3)).item() == 0


def test_blended_grams_are_the_weighted_mean():
    first, second = {"relu1_1": torch.ones(1, 2, 2)}, {"relu1_1": torch.zeros(1, 2, 2)}
    blended = blend_grams([first, second], [0.7, 0.3])
    assert torch.allclose(blended["relu1_1"], torch.full((1, 2, 2), 0.7))


def test_gram_gradient_matches_the_plain_product():
    features = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 3, 3, dtype=torch.float64)  # an asymmetric upstream gradient
    (grad,) = torch.autograd.grad((gram(features) * weights).sum(), features)
    flat = features.reshape(2, 3, 20)
    (expected,) = torch.autograd.grad(((flat @ flat.transpose(1, 2)) / 60 * weights).sum(), features)
    torch.testing.assert_close(grad, expected)


def test_gram_of_channels_last_features_equals_the_plain_layouts():
    features = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(gram(features.to(memory_format=torch.channels_last)), gram(features))


def test_gram_gradient_keeps_the_channels_last_layout_of_its_features():
    plain = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    last = plain.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    weights = torch.rand(2, 3, 3, dtype=torch.float64)
    (expected,) = torch.autograd.grad((gram(plain) * weights).sum(), plain)
    (grad,) = torch.autograd.grad((gram(last) * weights).sum(), last)
    torch.testing.assert_close(grad, expected)
    assert grad.is_contiguous(memory_format=torch.channels_last)
