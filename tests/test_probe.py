"""The linear probe the int8 parity checks rely on: a head fitted to a chosen mean top
probability, folded into the model exactly."""

from __future__ import annotations

import os

import numpy as np
import pytest

# Behind `long` with the int8 tests that rely on it: the default suite is at its budget.
pytestmark = [pytest.mark.slow, pytest.mark.long]

SIZE = 75  # the smallest input Xception takes


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(7)
    images = rng.random((24, SIZE, SIZE, 3), dtype=np.float32)
    return images, [index % 3 for index in range(24)]


def test_the_head_reaches_the_target_without_saturating(
        data: tuple[np.ndarray, list[int]]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from model import network
    from training.probe import fit_head

    images, labels = data
    model = network.build("concatenated", SIZE, seed=1)
    mean_top = fit_head(model, images, labels, batch_size=12, target_mean_top=0.85)
    assert 0.85 <= mean_top < 0.9
    # The returned figure is what the model now gives: standardisation folded in.
    served = model.predict(images, batch_size=12, verbose=0)
    assert float(np.mean(np.max(served, axis=1))) == pytest.approx(mean_top, abs=1e-3)
    assert np.array_equal(np.argmax(served, axis=1), np.asarray(labels))

    unconstrained = fit_head(model, images, labels, strength=100.0, batch_size=12)
    assert unconstrained > 0.97  # what the target keeps the parity images away from

    with pytest.raises(ValueError, match="every class"):
        fit_head(model, images, [index % 2 for index in range(24)], batch_size=12)
