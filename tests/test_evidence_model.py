"""Class-activation maps of the head (model.evidence): they add up to the network's
logits, the evidence is the predicted class over the mean, upsampling keeps place."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from model import evidence, network

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small() -> keras.Model:
    """The concatenated network at 96 px (3 x 3 feature map), untrained."""
    return network.build("concatenated", 96, seed=3)


def test_maps_add_up_to_the_logits_the_network_gives(small: keras.Model) -> None:
    features_model = keras.Model(small.input, small.get_layer("fusion_conv").output)
    x = np.random.default_rng(1).random((4, 96, 96, 3), dtype=np.float32)
    features = np.asarray(features_model(x, training=False))
    # A head whose positions move the logits by about one (the paper's initialisation
    # leaves them all near zero), and a bias.
    dense = small.get_layer("predictions")
    scale = 1.0 / (float(np.abs(features).mean()) * np.sqrt(features[0].size))
    kernel = np.random.default_rng(5).normal(0.0, scale, size=tuple(dense.kernel.shape))
    bias = np.array([0.3, -0.2, 0.1], dtype=np.float32)
    dense.set_weights([kernel.astype(np.float32), bias])
    probabilities = np.asarray(small(x, training=False))
    maps = evidence.class_maps(features, dense.get_weights()[0], bias)
    assert maps.shape == (4, 3, 3, 3) and maps.dtype == np.float32
    spread = maps.sum(axis=(1, 2))
    assert np.ptp(spread - spread[:, :1]) > 0.5  # the positions, not the bias, decide
    z = evidence.logits(maps, bias)
    # The softmax only sees logit differences: compare those, and the probabilities.
    log_p = np.log(probabilities)
    np.testing.assert_allclose(z - z[:, :1], log_p - log_p[:, :1], atol=1e-4)
    softmax = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), probabilities,
                               atol=1e-5)


def test_kernel_that_does_not_fit_the_features_is_refused() -> None:
    features = np.zeros((1, 3, 3, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="kernel"):
        evidence.class_maps(features, np.zeros((3 * 3 * 4, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="bias"):
        evidence.class_maps(features, np.zeros((3 * 3 * 8, 3)), np.zeros(2))


def test_evidence_is_the_class_over_the_mean_of_all() -> None:
    maps = np.zeros((2, 2, 3), dtype=np.float32)
    maps[0, 0] = [3.0, 0.0, 0.0]  # speaks for class 0
    maps[1, 1] = [1.0, 1.0, 1.0]  # speaks for every class alike: no evidence for any
    maps[0, 1] = [0.0, 3.0, 0.0]  # speaks for class 1, so against class 0
    np.testing.assert_allclose(evidence.evidence(maps, 0), [[2.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(evidence.evidence(maps, 1), [[-1.0, 2.0], [0.0, 0.0]])
    with pytest.raises(ValueError):
        evidence.evidence(maps, 3)


def test_upsampled_map_peaks_where_its_cell_is() -> None:
    cells = np.full((3, 3), -1.0, dtype=np.float32)
    cells[0, 2] = 4.0  # top right
    image = evidence.upsample(cells, 30, 60)
    assert image.shape == (30, 60) and image.dtype == np.float32
    assert image.min() == 0.0 and image.max() == pytest.approx(1.0)
    row, column = np.unravel_index(np.argmax(image), image.shape)
    assert row < 10 and column >= 40
    assert image[20:, :20].max() == 0.0  # far from the cell: the negative part is cut
    np.testing.assert_array_equal(evidence.upsample(-np.ones((3, 3)), 8, 8), 0.0)


def test_upsampling_to_the_same_size_changes_nothing_but_the_scale() -> None:
    cells = np.random.default_rng(2).random((4, 5)).astype(np.float32)
    np.testing.assert_allclose(evidence.upsample(cells, 4, 5), cells / cells.max(), rtol=1e-6)
