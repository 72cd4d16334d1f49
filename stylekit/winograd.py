"""Winograd F(4×4, 3×3) convolution for the CPU: VGG's deep 3×3 layers in fp32 at ~1.6× speed.

A 3×3 convolution computes each 4×4 output tile from a 6×6 input tile with 36 products per channel
pair instead of 144 (Lavin & Gray, 2015): 36 matrix products over all tiles, the rest additions,
done on channels-last tiles so every addition runs over contiguous channel vectors. Exact up to fp32
rounding (about 5e-6 of the largest output against 2e-7 for a direct convolution), far below what
the losses resolve; the same in bf16 would be off by 4.5%, so it stays fp32. Knows tensors only.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from . import native_transforms

# G of F(4×4, 3×3): the kernel transform (its input and output transforms are written out below).
_KERNEL_TRANSFORM = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                                 dtype=torch.float64)
_KERNEL_PRODUCT = torch.kron(_KERNEL_TRANSFORM, _KERNEL_TRANSFORM).float()  # G ⊗ G: vec(G w Gᵀ) from vec(w)
# The products scale with Cin·Cout, the transforms with Cin + Cout: below this ratio they cost more
# than the products saved. With torch's transforms, VGG19 at 256×192 on two cores: conv2_2, 64, loses;
# conv3_1, 85, wins. The C transforms are ~3× cheaper, and conv2_2 wins too (21.6 against 25.5 ms);
# on torch's threads, conv2_1, 43, as well (best of 15: 6.0 against 8.0 ms forward, 7.0 against 9.2
# backward at 256×192; 24–36 against 30–46 and 30–38 against 35–51 at 512×384). conv1_2, 32, is level
# at 256×192 and loses at 512×384 (83–105 against 77–94 forward, 111–113 against 99–134 backward).
MIN_CHANNEL_RATIO = {"c": 40, "torch": 80}
MIN_PIXELS = 64  # smaller inputs are mostly padding, in tiles of 4×4
BAND_BYTES = 8 << 20  # transformed tiles per band of tile rows: cache-sized, and no huge temporaries


def pays_off(weight: torch.Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether a convolution is a plain 3×3 'same' one with enough channels to gain from Winograd."""
    cout, cin, kh, kw = weight.shape
    plain = ((kh, kw) == (3, 3) and groups == 1 and _pair(stride) == (1, 1)
             and _pair(padding) == (1, 1) and _pair(dilation) == (1, 1))
    ratio = MIN_CHANNEL_RATIO["c" if native_transforms.transforms() else "torch"]
    return plain and cin * cout / (cin + cout) >= ratio


def transform_weight(weight: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """The 36 transformed kernels as a 36×Cin×Cout fp32 tensor (once per layer).

    `transposed` gives those of the convolution's input gradient: the same 3×3 'same' convolution
    with the kernel flipped and its channel axes swapped. G w Gᵀ of every kernel is one product with
    G ⊗ G, written straight into that layout: 0.3 s for VGG19's 20 kernel sets where Cout·Cin tiny
    fp64 products and two transposing copies took 2.0 s of every CLI run's start. In fp32: its
    rounding, ~2e-8 of the largest kernel, is far below the convolution's own (see the top).
    """
    if transposed:
        weight = weight.flip(2, 3).transpose(0, 1)
    cout, cin = weight.shape[:2]
    kernels = weight.detach().float().permute(2, 3, 1, 0).reshape(9, cin * cout)  # 3×3 by Cin×Cout
    return (_KERNEL_PRODUCT.to(weight.device) @ kernels).view(36, cin, cout)


def conv3x3(x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=1) for N×C×H×W fp32 x, from transform_weight(weight).

    Works through bands of tile rows, so the transformed tiles stay small whatever the image size.
    The result is laid out channels-last, the order the products come in: writing it N×C×H×W took a
    strided scatter, and the channels-last network that follows would only convert it back.
    """
    n, channels, h, w = x.shape
    th, tw = -(-h // 4), -(-w // 4)
    band = max(1, BAND_BYTES // (36 * n * tw * max(channels, transformed.shape[2]) * x.element_size()))
    library = native_transforms.transforms()
    if library is not None and x.dtype == transformed.dtype == torch.float32 and x.device.type == "cpu":
        return _conv3x3_c(library, x, transformed, bias, band)  # C reads raw fp32 memory: nothing else
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, tw * 4 + 1 - w, 1, th * 4 + 1 - h))  # N×H×W×C
    out = x.new_empty(n, th, 4, tw, 4, transformed.shape[2])  # channels-last: the products' own order
    for top in range(0, th, band):
        bottom = min(th, top + band)
        _band(padded[:, 4 * top:4 * bottom + 2], transformed, bias, out[:, top:bottom])
    return out.view(n, th * 4, tw * 4, -1)[:, :h, :w].permute(0, 3, 1, 2)


def _conv3x3_c(library, x: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None,
               band: int) -> torch.Tensor:
    """conv3x3 with the C transforms (native_transforms.py): the same bands, products and layout."""
    n, channels, h, w = x.shape
    th, tw, cout = -(-h // 4), -(-w // 4), transformed.shape[2]
    pixels = x.permute(0, 2, 3, 1).contiguous()  # N×H×W×C: free for the channels-last network
    bias = None if bias is None else bias.float().contiguous()
    threads = torch.get_num_threads()  # torch's own count: with OpenMP the library shares its threads
    out = x.new_empty(n, h, w, cout)
    for top in range(0, th, band):
        bottom = min(th, top + band)
        tiles = x.new_empty(36, n * (bottom - top) * tw, channels)
        if library.winograd_input(pixels.data_ptr(), tiles.data_ptr(), n, h, w, channels, tw, top, bottom,
                                  threads):
            raise MemoryError("no memory for the Winograd input transform")
        products = torch.bmm(tiles, transformed)
        if library.winograd_output(products.data_ptr(), out.data_ptr(),
                                   None if bias is None else bias.data_ptr(),
                                   n, h, w, cout, tw, top, bottom, threads):
            raise MemoryError("no memory for the Winograd output transform")
    return out.permute(0, 3, 1, 2)


def _band(padded: torch.Tensor, transformed: torch.Tensor, bias: torch.Tensor | None,
          out: torch.Tensor) -> None:
    """One band of tile rows: N×(4·rows+2)×(4·columns+2)×C pixels into out (N×rows×4×columns×4×C')."""
    n, th, tw = out.shape[0], out.shape[1], out.shape[3]
    rows = padded.new_empty(6, n, th, padded.shape[2], padded.shape[3])
    _input_transform([padded[:, k:k + 4 * th:4] for k in range(6)], rows)
    tiles = padded.new_empty(6, 6, n, th, tw, padded.shape[3])  # row, column, N, tile row, column, C
    _input_transform([rows[:, :, :, k:k + 4 * tw:4] for k in range(6)], tiles.transpose(0, 1))
    products = torch.bmm(tiles.view(36, n * th * tw, -1), transformed).view(6, 6, n, th, tw, -1)
    if bias is not None:  # the output transform adds product (1, 1) to every output pixel once
        products[1, 1] += bias
    half = padded.new_empty(4, 6, n, th, tw, transformed.shape[2])
    _output_transform(products, half)
    # By column offset, row offset, N, tile row, tile column, C.
    _output_transform(half.transpose(0, 1), out.permute(4, 2, 0, 1, 3, 5))


def fits(x: torch.Tensor) -> bool:
    """Whether an input is large enough for the tile overhead to pay (tiny coarse scales are not)."""
    return x.shape[-2] * x.shape[-1] >= MIN_PIXELS


def _input_transform(d: list[torch.Tensor], out: torch.Tensor) -> None:
    """Bᵀ d along the first axis of six tile slices d[0..5], written into out[0..5]."""
    d0, d1, d2, d3, d4, d5 = d
    a, b = torch.add(d4, d2, alpha=-4), torch.add(d3, d1, alpha=-4)
    c, e = d4 - d2, torch.sub(d3, d1).mul_(2)
    torch.add(torch.add(d4, d2, alpha=-5), d0, alpha=4, out=out[0])
    torch.add(a, b, out=out[1])
    torch.sub(a, b, out=out[2])
    torch.add(c, e, out=out[3])
    torch.sub(c, e, out=out[4])
    torch.add(torch.add(d5, d3, alpha=-5), d1, alpha=4, out=out[5])


def _output_transform(m: torch.Tensor, out: torch.Tensor) -> None:
    """Aᵀ m along the first axis (six tile slices), written into out[0..3]."""
    s12, d12, s34, d34 = m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]
    torch.add(s12 + s34, m[0], out=out[0])
    torch.add(d12, d34, alpha=2, out=out[1])
    torch.add(s12, s34, alpha=4, out=out[2])
    torch.add(d12 + m[5], d34, alpha=8, out=out[3])


def _pair(value) -> tuple[int, int]:
    """nn.Conv2d keeps stride, padding and dilation as pairs; a plain call may pass one int."""
    return (value, value) if isinstance(value, int) else tuple(value)
