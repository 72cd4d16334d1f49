"""Loss-and-gradient evaluations: plain autograd, and the CUDA-graph replay that must match it."""

import pytest
import torch

from stylekit import StyleOptions, StyleRequest, engine, gradients, losses, stylize
from stylekit.features import FeatureExtractor
from stylekit.gradients import eager_gradient, graphed_gradient
from stylekit.weights import random_state_dict

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _squares(image: torch.Tensor) -> torch.Tensor:
    return image.pow(2).flatten(1).sum(1)


def test_eager_gradient_returns_each_images_loss_and_leaves_the_gradient_of_their_sum():
    image = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    totals = eager_gradient(_squares)(image)
    torch.testing.assert_close(totals, image.detach().pow(2).flatten(1).sum(1))
    torch.testing.assert_close(image.grad, 2 * image.detach())
    assert not totals.requires_grad


def test_eager_gradient_does_not_accumulate_across_evaluations():
    image = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    gradient = eager_gradient(_squares)
    gradient(image)
    gradient(image)
    torch.testing.assert_close(image.grad, 2 * image.detach())


def _vgg_loss(device: torch.device):
    """A real style loss on the extractor at 64 px: Grams of relu1_1..relu3_1 against a fixed target."""
    extractor = FeatureExtractor("vgg19", random_state_dict("vgg19", 0),
                                 ("relu1_1", "relu2_1", "relu3_1")).to(device)
    gen = torch.Generator().manual_seed(3)
    style = torch.rand(1, 3, 64, 48, generator=gen).to(device)
    with torch.no_grad():
        targets = {k: losses.gram(v) for k, v in extractor(style).items()}
    weights = dict.fromkeys(targets, 1.0)

    def evaluate(image: torch.Tensor) -> torch.Tensor:
        return losses.style_loss(extractor(image), targets, weights) + losses.tv_loss(image)
    return evaluate, torch.rand(1, 3, 64, 48, generator=gen).to(device)


def test_an_evaluation_a_cuda_graph_cannot_record_runs_as_plain_autograd(monkeypatch):
    image = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def half_recorded(evaluate, x):  # a capture that fails part-way, a gradient already written
        x.grad = torch.full_like(x, 7.0)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(gradients, "graphed_gradient", half_recorded)
    totals = gradients.gradient_function(_squares, image, use_graph=True)(image)
    torch.testing.assert_close(totals, image.detach().pow(2).flatten(1).sum(1))
    torch.testing.assert_close(image.grad, 2 * image.detach())  # not added to what the recording left


@needs_cuda
def test_graphed_gradient_equals_eager_after_the_image_changes_in_place():
    evaluate, start = _vgg_loss(torch.device("cuda"))
    image = start.clone().requires_grad_(True)
    graphed = graphed_gradient(evaluate, image)
    with torch.no_grad():
        image.mul_(0.5).add_(0.25)  # the optimiser moves the image in place between replays
    replayed_totals, replayed = graphed(image), image.grad.clone()
    fresh = image.detach().clone().requires_grad_(True)
    eager_totals = eager_gradient(evaluate)(fresh)
    torch.testing.assert_close(replayed_totals, eager_totals, rtol=1e-4, atol=0)
    torch.testing.assert_close(replayed, fresh.grad, rtol=1e-3, atol=1e-6)


@needs_cuda
def test_graphed_gradient_refuses_an_image_it_was_not_recorded_with():
    evaluate, start = _vgg_loss(torch.device("cuda"))
    graphed = graphed_gradient(evaluate, start.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="recorded with"):
        graphed(start.clone().requires_grad_(True))


@needs_cuda
def test_stylize_on_a_gpu_reaches_the_same_loss_with_and_without_graphs(weights_file, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    photo, painting = (torch.rand(48, 64, 3, generator=gen).numpy() for _ in range(2))
    options = StyleOptions(weights=str(weights_file), steps=40, device="cuda", precision="fp32",
                           targets="torch", seed=0)
    graphed = stylize(StyleRequest(photo, [painting], options))
    monkeypatch.setattr(engine, "CUDA_GRAPHS", False)
    eager = stylize(StyleRequest(photo, [painting], options))
    assert graphed.iterations == eager.iterations
    assert graphed.total_loss == pytest.approx(eager.total_loss, rel=0.05)


@needs_cuda
def test_gpu_network_runs_channels_last_with_the_plain_layouts_features_and_gradient():
    start = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(4)).cuda()
    extractor = FeatureExtractor("vgg19", random_state_dict("vgg19", 0), ("relu3_1",)).cuda()
    last = FeatureExtractor("vgg19", random_state_dict("vgg19", 0), ("relu3_1",)).to(
        "cuda", memory_format=engine.memory_format(torch.device("cuda")))
    runs = []
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # exact fp32 in both layouts
        for network in (extractor, last):
            image = start.clone().requires_grad_(True)
            features = network(image)["relu3_1"]
            losses.gram(features).sum().backward()
            runs.append((features.detach(), image.grad))
    (plain_features, plain_gradient), (features, gradient) = runs
    assert features.is_contiguous(memory_format=torch.channels_last)
    # cuDNN's channels-last kernels sum in another order: fp32 rounding, relative to the largest value
    torch.testing.assert_close(features, plain_features, rtol=0,
                               atol=1e-4 * float(plain_features.abs().max()))
    torch.testing.assert_close(gradient, plain_gradient, rtol=0,
                               atol=1e-4 * float(plain_gradient.abs().max()))
