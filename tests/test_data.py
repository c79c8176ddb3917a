"""The training input pipeline: same tensors as inference, the paper's augmentation (its
distribution and geometry against the authors' ImageDataGenerator), caching, the preview."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

from model import preprocess
from training import cli, data, sources
from training.sources import Record

pytestmark = [
    pytest.mark.slow,
    # the reference generator calls scipy.ndimage.interpolation.affine_transform
    pytest.mark.filterwarnings("ignore:Please import `affine_transform`:DeprecationWarning"),
]


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


# -- the augmentation, measured against the authors' ImageDataGenerator ---------------------

DRAWS = 4000
#: Keras 3 keeps the Keras 2 generator as a legacy module: the reference for the laws and
#: the geometry (``get_random_transform``, ``apply_transform``).
AUTHORS = dict(rotation_range=360, width_shift_range=0.05, height_shift_range=0.05,
               zoom_range=0.05, shear_range=0.05, horizontal_flip=True, vertical_flip=True,
               fill_mode="nearest")


def authors_generator() -> Any:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    return ImageDataGenerator(**AUTHORS)


def drawn(seed: int = 3, shape: tuple[int, int] = (300, 300)) -> dict[str, np.ndarray]:
    values = data.random_parameters(tf.constant([seed, 0]), DRAWS, shape).numpy()
    return dict(zip(data.PARAMETERS, values.T.astype(np.float64), strict=True))


def as_generator_parameters(row: np.ndarray) -> dict[str, Any]:
    given: dict[str, Any] = dict(zip(data.PARAMETERS, row.astype(float), strict=True))
    given["flip_horizontal"] = bool(given["flip_horizontal"])
    given["flip_vertical"] = bool(given["flip_vertical"])
    return given


def within(fraction: float, p: float, n: int = DRAWS, sigmas: float = 4.0) -> bool:
    return abs(fraction - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def max_abs_correlation(columns: dict[str, np.ndarray]) -> tuple[float, str]:
    names = list(columns)
    r = np.corrcoef(np.stack([columns[k] for k in names]))
    np.fill_diagonal(r, 0.0)
    i, j = np.unravel_index(np.abs(r).argmax(), r.shape)
    return float(abs(r[i, j])), f"{names[i]} ~ {names[j]}"


def test_the_settings_are_the_papers() -> None:
    settings = data.PAPER_AUGMENTATION
    assert (settings.rotation_range, settings.zoom_range) == (360.0, 0.05)
    assert (settings.width_shift_range, settings.height_shift_range) == (0.05, 0.05)
    assert settings.shear_range == 0.05  # degrees, as ImageDataGenerator reads it
    assert settings.horizontal_flip and settings.vertical_flip


def test_flips_are_two_independent_coins() -> None:
    p = drawn()
    horizontal, vertical = p["flip_horizontal"] == 1, p["flip_vertical"] == 1
    assert within(horizontal.mean(), 0.5) and within(vertical.mean(), 0.5)
    assert within((horizontal & vertical).mean(), 0.25)
    # a mirror image (exactly one flip) half the time; one coin for both axes never mirrors
    assert within((horizontal ^ vertical).mean(), 0.5)


def test_every_parameter_is_drawn_independently() -> None:
    worst, pair = max_abs_correlation(drawn())
    assert worst < 0.06, pair


def test_each_parameter_covers_the_generators_whole_range() -> None:
    p = drawn(shape=(300, 200))
    counts, _ = np.histogram(p["theta"], bins=36, range=(-360, 360))
    assert stats.chisquare(counts).pvalue > 0.001  # uniform over -360..360 degrees
    uniform = {"theta": (-360, 360), "tx": (-15, 15), "ty": (-10, 10),  # 5 % of 300 and 200 px
               "shear": (-0.05, 0.05), "zx": (0.95, 1.05), "zy": (0.95, 1.05)}
    for name, (low, high) in uniform.items():
        assert stats.kstest(p[name], stats.uniform(low, high - low).cdf).pvalue > 0.001, name


def test_parameters_are_drawn_as_the_authors_generator_draws_them() -> None:
    generator = authors_generator()
    np.random.seed(0)  # the generator draws from numpy's global state
    theirs = [generator.get_random_transform((300, 200, 1)) for _ in range(DRAWS)]
    ours = drawn(shape=(300, 200))  # not square: tx in rows, ty in columns
    for name in data.PARAMETERS:
        reference = np.array([float(t[name]) for t in theirs])
        if name.startswith("flip"):
            assert abs(reference.mean() - ours[name].mean()) < 4 * math.sqrt(0.5 / DRAWS), name
        else:
            assert stats.ks_2samp(reference, ours[name]).pvalue > 0.001, name


def test_one_resampling_is_the_generators_apply_transform(shared_cxr: Path) -> None:
    size, count = 128, 12
    images = np.stack([preprocess.load(shared_cxr / f, size)[:, :, :1] for f in
                       sorted(p.name for p in shared_cxr.glob("*.png"))[:count]])
    parameters = data.random_parameters(tf.constant([5, 0]), count, (size, size))
    ours = data.apply(tf.constant(images), parameters).numpy()
    generator = authors_generator()
    for image, row, mine in zip(images, parameters.numpy(), ours, strict=True):
        theirs = generator.apply_transform(image.astype(np.float64), as_generator_parameters(row))
        np.testing.assert_allclose(mine, theirs, atol=1e-4)


# A pixel's coordinates as its value: what comes out at each pixel says where the
# augmentation took it from, so the whole transform can be read back from an image.
RAMP = 33
RAMP_STEP = 7  # 0..224, exact in 8 bits


def recovered(x_image: np.ndarray, y_image: np.ndarray) -> dict[str, np.ndarray]:
    """Per image (N x RAMP x RAMP of source columns and rows): mirrored, rotation in
    degrees, zoom per axis and the shift of the centre (de-rotated), from the affine
    fitted to the central disk (which no draw takes outside the image)."""
    rows, columns = np.mgrid[0:RAMP, 0:RAMP].astype(np.float64)
    centre = (RAMP - 1) / 2
    disk = (rows - centre) ** 2 + (columns - centre) ** 2 <= (RAMP / 4) ** 2
    design = np.stack([columns[disk], rows[disk], np.ones(int(disk.sum()))], axis=1)
    source = np.concatenate([x_image[:, disk], y_image[:, disk]]).T
    fit = np.linalg.lstsq(design, source, rcond=None)[0].reshape(3, 2, -1).transpose(2, 1, 0)
    linear, shift = fit[:, :, :2], fit[:, :, 2]
    moved = linear @ np.full(2, centre) + shift - centre  # where the centre comes from
    mirrored = np.linalg.det(linear) < 0
    linear[mirrored] = linear[mirrored] @ np.diag([-1.0, 1.0])
    angle = np.arctan2(linear[:, 1, 0], linear[:, 0, 0])
    unrotate = np.stack([np.stack([np.cos(angle), np.sin(angle)], -1),
                         np.stack([-np.sin(angle), np.cos(angle)], -1)], -2)
    scale = unrotate @ linear
    moved = (unrotate @ moved[:, :, None])[:, :, 0]
    return {"mirrored": mirrored.astype(np.float64), "angle": np.degrees(angle) % 360,
            "zx": scale[:, 0, 0], "zy": scale[:, 1, 1], "dx": moved[:, 0], "dy": moved[:, 1]}


def ramp_records(folder: Path, count: int) -> tuple[list[Record], list[Record]]:
    rows, columns = np.mgrid[0:RAMP, 0:RAMP]
    made = []
    for name, ramp in (("x", columns), ("y", rows)):
        path = folder / f"{name}.png"
        Image.fromarray((ramp * RAMP_STEP).astype(np.uint8)).save(path)
        made.append([Record(path, "normal", "p", "t")] * count)
    return made[0], made[1]


def test_pipeline_shows_what_the_authors_generator_shows(tmp_path: Path) -> None:
    """Through ``dataset``: mirror images half the time, every angle, nothing tied to
    anything else, and the same distributions as the generator's on the same images."""
    x_records, y_records = ramp_records(tmp_path, DRAWS)

    def sources(records: list[Record]) -> np.ndarray:
        pipeline = data.dataset(records, RAMP, batch_size=500, augment=True, seed=11)
        plain = np.concatenate([b.numpy()[..., 0] for b, _ in pipeline])
        return plain * 255.0 / RAMP_STEP

    ours = recovered(sources(x_records), sources(y_records))
    assert within(ours["mirrored"].mean(), 0.5)
    counts, _ = np.histogram(ours["angle"], bins=36, range=(0, 360))
    assert stats.chisquare(counts).pvalue > 0.001
    # the flips make the sign of a shift (seen from the image) a coin: sizes too
    sizes = {f"|{k} - 1|": np.abs(ours[k] - 1) for k in ("zx", "zy")}
    sizes.update({f"|{k}|": np.abs(ours[k]) for k in ("dx", "dy")})
    worst, pair = max_abs_correlation({**ours, **sizes})
    assert worst < 0.06, pair

    generator = authors_generator()
    np.random.seed(0)
    ramps = np.stack(np.mgrid[0:RAMP, 0:RAMP][::-1], axis=-1).astype(np.float64)
    shown = np.stack([generator.random_transform(ramps) for _ in range(DRAWS)])
    theirs = recovered(shown[..., 0], shown[..., 1])
    assert abs(theirs["mirrored"].mean() - ours["mirrored"].mean()) < 4 * math.sqrt(0.5 / DRAWS)
    for name in ("angle", "zx", "zy", "dx", "dy"):
        assert stats.ks_2samp(ours[name], theirs[name]).pvalue > 0.001, name


def test_draws_are_new_every_epoch_and_the_same_every_run(tmp_path: Path) -> None:
    records = pngs(tmp_path, 6)

    def epochs(seed: int) -> list[np.ndarray]:
        pipeline = data.dataset(records, 32, batch_size=3, augment=True, seed=seed)
        return [np.concatenate([b.numpy() for b, _ in pipeline]) for _ in range(2)]

    first, second = epochs(1)
    assert not np.allclose(first, second, atol=1e-3)
    again = epochs(1)
    np.testing.assert_array_equal(first, again[0])
    np.testing.assert_array_equal(second, again[1])
    assert not np.allclose(first, epochs(2)[0], atol=1e-3)


# -- the preview -------------------------------------------------------------------------------

def test_preview_is_a_grid_of_originals_and_draws(shared_cxr: Path, tmp_path: Path) -> None:
    records = data.preview_records(sources.csv_list(shared_cxr / "labels.csv"), 4, seed=0)
    assert [r.label for r in records] == ["covid", "normal", "pneumonia", "covid"]
    out = tmp_path / "preview.png"
    size, gap = 48, data.PREVIEW_GAP
    assert data.preview(records, out, augmentations=3, input_size=size) == (
        4 * size + 3 * gap, 4 * size + 3 * gap)
    grid = np.asarray(Image.open(out))
    assert grid.shape == (4 * size + 3 * gap, 4 * size + 3 * gap) and grid.dtype == np.uint8
    for row, record in enumerate(records):
        top = row * (size + gap)
        original = np.round(preprocess.load(record.path, size)[:, :, 0] * 255)
        np.testing.assert_array_equal(grid[top:top + size, :size], original)
        for column in range(1, 4):
            left = column * (size + gap)
            assert not np.array_equal(grid[top:top + size, left:left + size], original)


def test_prepare_preview_augmentation_writes_the_png(shared_cxr: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview.png"
    done = subprocess.run(
        [sys.executable, "-m", "dicom_node", "prepare", "--preview-augmentation", str(out),
         "--source", f"csv:{shared_cxr / 'labels.csv'}"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows, columns, size = cli.PREVIEW_ROWS, cli.PREVIEW_AUGMENTATIONS + 1, 300
    step = size + data.PREVIEW_GAP
    assert Image.open(out).size == (columns * step - data.PREVIEW_GAP,
                                    rows * step - data.PREVIEW_GAP)
    assert "augmentation preview" in done.stdout and "1: covid" in done.stdout
    assert not (tmp_path / "fold1").exists()
