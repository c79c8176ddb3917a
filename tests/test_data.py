"""The training input pipeline: same tensors as inference, the paper's augmentation, caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import preprocess
from training import data
from training.sources import Record

pytestmark = pytest.mark.slow


def pngs(folder: Path, n: int) -> list[Record]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        image = np.zeros((120, 90), dtype=np.uint8)
        image[:, : 30 + i] = 200  # asymmetric, so flips and rotations show
        image += rng.integers(0, 20, size=image.shape, dtype=np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(image).save(path)
        records.append(Record(path, ("covid", "normal", "pneumonia")[i % 3], f"p{i}", "t"))
    return records


def test_without_augmentation_it_is_the_inference_tensor(tmp_path: Path) -> None:
    records = pngs(tmp_path, 5)
    images, labels = next(iter(data.dataset(records, 64, batch_size=5)))
    assert images.shape == (5, 64, 64, 3) and images.dtype.name == "float32"
    assert labels.shape == (5, 3)
    np.testing.assert_array_equal(labels.numpy().argmax(1), [0, 1, 2, 0, 1])
    for i, record in enumerate(records):
        np.testing.assert_allclose(images[i].numpy(), preprocess.load(record.path, 64),
                                   atol=1e-6)


def test_augmentation_changes_images_within_range(tmp_path: Path) -> None:
    records = pngs(tmp_path, 6)
    plain, _ = next(iter(data.dataset(records, 64, batch_size=6)))
    augmented, labels = next(iter(data.dataset(records, 64, batch_size=6, augment=True,
                                               seed=1)))
    assert float(augmented.numpy().min()) >= 0.0 and float(augmented.numpy().max()) <= 1.0
    changed = [not np.allclose(a, p, atol=1e-3) for a, p in zip(augmented.numpy(),
                                                                plain.numpy(), strict=True)]
    assert sum(changed) >= 4
    np.testing.assert_array_equal(labels.numpy().argmax(1), [0, 1, 2, 0, 1, 2])
    assert (augmented[..., 0].numpy() == augmented[..., 2].numpy()).all()


def test_decoded_once_with_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = pngs(tmp_path, 4)
    calls: list[bytes] = []
    real = data._load_gray

    def counting(path: bytes, size: int, interpolation: str) -> np.ndarray:
        calls.append(path)
        return real(path, size, interpolation)

    monkeypatch.setattr(data, "_load_gray", counting)
    pipeline = data.dataset(records, 32, batch_size=2, augment=True)
    for _ in range(3):  # three epochs
        assert sum(int(b[0].shape[0]) for b in pipeline) == 4
    assert len(calls) == 4
    uncached = data.dataset(records, 32, batch_size=2, cache=None)
    for _ in range(2):
        list(uncached)
    assert len(calls) == 12


def test_augmentation_is_the_papers() -> None:
    names = [type(layer).__name__ for layer in data.augmentation()]
    assert names == ["RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation",
                     "RandomShear"]
    flip, rotation, zoom, shift, shear = data.augmentation()
    assert flip.mode == "horizontal_and_vertical"
    assert rotation.factor == (-0.5, 0.5)  # the whole circle
    assert zoom.height_factor == 0.05 and shift.width_factor == 0.05
    assert shear.x_factor == pytest.approx((-0.000873, 0.000873), abs=1e-6)
