"""Colour preservation (Gatys et al. 2016, "Preserving color in neural artistic style transfer")."""

from __future__ import annotations

import torch

# ITU-R BT.601 RGB → YIQ, the space Gatys et al. used for luminance-only transfer.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.596, -0.274, -0.322],
                            [0.211, -0.523, 0.312]])


def keep_content_chroma(stylised: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Luminance mode: the stylised image's Y with the content's I and Q (N×3×H×W in [0, 1])."""
    to_yiq = _RGB_TO_YIQ.to(stylised)
    out_yiq = torch.einsum("ij,njhw->nihw", to_yiq, stylised)
    content_yiq = torch.einsum("ij,njhw->nihw", to_yiq, content)
    mixed = torch.cat([out_yiq[:, :1], content_yiq[:, 1:]], dim=1)
    return torch.einsum("ij,njhw->nihw", torch.linalg.inv(to_yiq), mixed).clamp(0, 1)


def match_color_statistics(style: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Histogram mode: affinely recolour the style so its colour mean and covariance are the content's.

    Done before optimisation, so the style's textures are kept and its palette becomes the content's.
    """
    def stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = image.reshape(3, -1).double()
        mean = pixels.mean(1, keepdim=True)
        centred = pixels - mean
        cov = centred @ centred.T / pixels.shape[1] + 1e-5 * torch.eye(3, dtype=torch.float64,
                                                                      device=image.device)
        return mean, cov

    def sqrt_and_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, vectors = torch.linalg.eigh(cov)
        root = values.clamp_min(1e-8).sqrt()
        return vectors @ torch.diag(root) @ vectors.T, vectors @ torch.diag(1 / root) @ vectors.T

    style_mean, style_cov = stats(style[0])
    content_mean, content_cov = stats(content[0])
    _, style_inv_root = sqrt_and_inverse(style_cov)
    content_root, _ = sqrt_and_inverse(content_cov)
    transform = content_root @ style_inv_root
    pixels = style[0].reshape(3, -1).double()
    recoloured = transform @ (pixels - style_mean) + content_mean
    return recoloured.reshape_as(style[0]).unsqueeze(0).to(style.dtype).clamp(0, 1)
