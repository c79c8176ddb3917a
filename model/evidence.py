"""Class-activation maps of the paper's head, exact and gradient-free.

Everything after the backbones' concatenation is linear up to the softmax:
``fusion_conv`` (Conv2D 1x1, no activation) -> Flatten (row-major: row, column,
channel) -> Dropout (the identity at inference) -> Dense. So the logit of class
*c* splits exactly over the h x w positions of the feature map::

    z_c = b_c + sum_ij M_c(i, j),   M_c(i, j) = sum_k W[(i, j, k), c] * F(i, j, k)

with ``F`` the fusion_conv activations and ``W``, ``b`` the Dense kernel and
bias -- the same forward pass, no gradients (Grad-CAM, which weighs channels by
pooled gradients, is an approximation of this for heads that pool). The softmax
is shift invariant, so what speaks for the predicted class over the others is
``M_pred - mean_c M_c`` (its contribution to the class's log-odds against the
geometric mean of all three); :func:`evidence` gives that, :func:`upsample`
brings it to an image's size with its positive part normalised to [0, 1].
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def class_maps(features: NDArray[np.floating], kernel: NDArray[np.floating],
               bias: NDArray[np.floating]) -> NDArray[np.float32]:
    """Per-class contributions to the logits, N x h x w x classes.

    Parameters
    ----------
    features
        The fusion_conv activations, N x h x w x k.
    kernel
        The Dense kernel, (h * w * k) x classes (rows in Flatten's order).
    bias
        The Dense bias, one per class (only its length is checked: it is not spread
        over the map; ``logits(maps, bias)`` adds it back).

    Raises
    ------
    ValueError
        The kernel does not fit the features, or the bias does not fit the kernel.
    """
    if features.ndim != 4:
        raise ValueError(f"features: expected N x h x w x k, got shape {features.shape}")
    _, h, w, k = features.shape
    if kernel.ndim != 2 or kernel.shape[0] != h * w * k:
        raise ValueError(f"kernel: shape {kernel.shape} does not fit features of "
                         f"{h} x {w} x {k}")
    if bias.shape != (kernel.shape[1],):
        raise ValueError(f"bias: shape {bias.shape}, expected ({kernel.shape[1]},)")
    weights = np.asarray(kernel, dtype=np.float32).reshape(h, w, k, kernel.shape[1])
    maps = np.einsum("nhwk,hwkc->nhwc", np.asarray(features, dtype=np.float32), weights,
                     optimize=True)
    return np.asarray(maps, dtype=np.float32)


def logits(maps: NDArray[np.floating], bias: NDArray[np.floating]) -> NDArray[np.float32]:
    """The logits the maps add up to (N x classes): the sum over positions plus the bias."""
    return np.asarray(maps.sum(axis=(1, 2), dtype=np.float64) + bias, dtype=np.float32)


def evidence(maps: NDArray[np.floating], index: int) -> NDArray[np.float32]:
    """What speaks for class ``index`` over the others (h x w, in logit units):
    ``M_index - mean_c M_c`` for one image's maps (h x w x classes)."""
    if maps.ndim != 3 or not 0 <= index < maps.shape[-1]:
        raise ValueError(f"expected h x w x classes maps and a class index, got "
                         f"{maps.shape} and {index}")
    return np.asarray(maps[..., index] - maps.mean(axis=-1), dtype=np.float32)


def upsample(values: NDArray[np.floating], rows: int, columns: int) -> NDArray[np.float32]:
    """``values`` (h x w) resized bilinearly to rows x columns, its positive part divided
    by its maximum: [0, 1], all zeros where nothing is positive.

    Each map cell stands for the block of the image it was computed from, so cell
    centres sit at block centres (half-pixel centres, as the input was resized) and
    the borders are held, not extrapolated.
    """
    if values.ndim != 2 or rows < 1 or columns < 1:
        raise ValueError(f"expected an h x w map and a positive size, got {values.shape} "
                         f"and {rows} x {columns}")
    h, w = values.shape
    # Two small matrix products: (rows x h) @ (h x w) @ (w x columns).
    resized = _interpolation(rows, h) @ np.asarray(values, dtype=np.float32) \
        @ _interpolation(columns, w).T
    np.maximum(resized, 0.0, out=resized)
    peak = float(resized.max())
    if peak > 0:
        resized /= peak
    return resized


def _interpolation(n_out: int, n_in: int) -> NDArray[np.float32]:
    """The n_out x n_in matrix of linear interpolation weights (half-pixel centres)."""
    centre = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    centre = np.clip(centre, 0, n_in - 1)
    low = np.floor(centre).astype(np.intp)
    high = np.minimum(low + 1, n_in - 1)
    frac = centre - low
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, low), 1 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix
