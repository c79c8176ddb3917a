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
             strength: float = 1.0, batch_size: int = 8) -> float:
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
    """
    import keras
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    head = model.get_layer(HEAD_LAYER)
    features_of = keras.Model(model.input, head.input)
    features = np.asarray(features_of.predict(images, batch_size=batch_size, verbose=0),
                          dtype=np.float64)
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    fitted = LogisticRegression(C=strength, max_iter=2000).fit((features - mean) / scale,
                                                               np.asarray(labels))
    if list(fitted.classes_) != list(range(head.units)):
        raise ValueError(f"labels must cover every class 0..{head.units - 1}")
    # Standardisation folded into the layer: W x + b on the raw features.
    kernel = (fitted.coef_ / scale).T
    bias = fitted.intercept_ - (mean / scale) @ fitted.coef_.T
    head.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    probabilities = model.predict(images, batch_size=batch_size, verbose=0)
    return float(np.mean(np.max(probabilities, axis=1)))
