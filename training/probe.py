"""A linear probe: fit only the network's Dense head on frozen features.

Everything after the backbones is linear up to the softmax (:mod:`model.evidence`),
so fitting the ``predictions`` layer alone is a multinomial logistic regression on
the flattened ``fusion_conv`` features: seconds on a CPU, where training the
backbones takes a GPU. The benchmarks and tests use it to turn a network into one
whose outputs are far from uniform (confident), which checks of numerical parity
need -- on near-chance outputs any two paths agree. It is not the paper's training
(``dicom-node train``) and makes no claim about accuracy on unseen images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model.engine import HEAD_LAYER


def fit_head(model: Any, images: NDArray[np.float32], labels: Sequence[int],
             strength: float = 1.0, batch_size: int = 8,
             target_mean_top: float | None = None) -> float:
    """Replace ``model``'s head by a logistic regression; return the mean top
    probability the model then gives on ``images``.

    Parameters
    ----------
    model
        A network of :mod:`model.network` (its head is changed in place).
    images
        N x size x size x 3 network inputs.
    labels
        Each image's class index; every class must occur.
    strength
        The inverse L2 regularisation (scikit-learn's ``C``).
    batch_size
        Batch size of the feature extraction.
    target_mean_top
        When given, ``strength`` is ignored: the weakest ``C`` (between 1e-6 and
        1e2, found by bisection to within 2 %) whose fit reaches this mean top
        probability: confident, but not saturated at 1.0, where every probability
        difference vanishes and a parity check would prove little.
    """
    import keras
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    head = model.get_layer(HEAD_LAYER)
    features_of = keras.Model(model.input, head.input)
    features = np.asarray(features_of.predict(images, batch_size=batch_size, verbose=0),
                          dtype=np.float64)
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    standard = (features - mean) / scale
    targets = np.asarray(labels)
    # The L2-penalised solution lies in the span of the images' feature vectors, so the
    # regression is fitted exactly on their coordinates in that span (N x N, not
    # N x 102,400 at 300 px: milliseconds a fit) and mapped back.
    _, _, basis = np.linalg.svd(standard, full_matrices=False)
    reduced = standard @ basis.T

    def fit(c: float) -> tuple[Any, float]:
        fitted = LogisticRegression(C=c, max_iter=5000).fit(reduced, targets)
        return fitted, float(np.mean(np.max(fitted.predict_proba(reduced), axis=1)))

    low, high = -6.0, 2.0
    fitted, mean_top = fit(strength if target_mean_top is None else 10**high)
    if target_mean_top is not None:
        # Bisection on log10(C): the mean top probability grows with C.
        for _ in range(10):
            middle = (low + high) / 2
            candidate, candidate_top = fit(10**middle)
            if candidate_top >= target_mean_top:
                high, fitted, mean_top = middle, candidate, candidate_top
            else:
                low = middle
    if list(fitted.classes_) != list(range(head.units)):
        raise ValueError(f"labels must cover every class 0..{head.units - 1}")
    # Standardisation folded into the layer: W x + b on the raw features, so the
    # model's probabilities on ``images`` are the regression's (``mean_top``).
    coef = fitted.coef_ @ basis
    kernel = (coef / scale).T
    bias = fitted.intercept_ - (mean / scale) @ coef.T
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    return mean_top
