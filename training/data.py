"""The training input pipeline: tf.data over :mod:`model.preprocess`, the paper's augmentation.

Each image is decoded and resized once through ``model.preprocess`` -- the same
function the node uses on DICOM -- in parallel, kept as 8-bit gray in a cache
(memory, or a file for data larger than RAM), then augmented on the fly and
prefetched. Images are scaled by 1/255 and put on three channels.

The augmentation is the authors' Keras ``ImageDataGenerator`` (Table 2 and their
notebook: ``rotation_range=360, width_shift_range=0.05, height_shift_range=0.05,
zoom_range=0.05, shear_range=0.05, horizontal_flip=True, vertical_flip=True``,
nearest fill), reproduced in distribution rather than approximated with Keras 3
layers: per image, independent draws with the generator's laws
(``get_random_transform``) -- rotation, two shifts in pixels, shear in degrees,
a zoom per axis, a coin per flip -- composed into one projective matrix about the
image centre as the generator's ``apply_affine_transform`` composes them, and one
bilinear resampling with nearest fill (the flips are folded into the matrix, so
they cost nothing and resample nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from model import preprocess
from model.classes import CLASS_KEYS, NUM_CLASSES
from training.sources import Record


@dataclass(frozen=True)
class Augmentation:
    """``ImageDataGenerator``'s geometric settings, with its names and units.

    Ranges are symmetric: rotation and shear in degrees, shifts as fractions of
    the image side, zoom as the half-width of ``[1 - zoom, 1 + zoom]``.
    """

    rotation_range: float = 360.0
    width_shift_range: float = 0.05
    height_shift_range: float = 0.05
    shear_range: float = 0.05
    zoom_range: float = 0.05
    horizontal_flip: bool = True
    vertical_flip: bool = True


#: The authors' settings (Table 2; shear_range is in degrees in ImageDataGenerator).
PAPER_AUGMENTATION = Augmentation()

#: Columns of :func:`random_parameters`, as ``get_random_transform`` names them:
#: degrees, pixels (tx from the height range, ty from the width range), degrees,
#: zoom factors, and 0/1 flips.
PARAMETERS = ("theta", "tx", "ty", "shear", "zx", "zy", "flip_horizontal", "flip_vertical")


def random_parameters(seed: tf.Tensor, count: int | tf.Tensor, shape: tuple[int, int],
                      settings: Augmentation = PAPER_AUGMENTATION) -> tf.Tensor:
    """Independent transform parameters for ``count`` images (``count`` x 8, float32).

    Each column is drawn as ``ImageDataGenerator.get_random_transform`` draws it,
    every value from its own uniform: theta ~ U(-rotation, rotation), tx ~
    U(-h_shift, h_shift) x rows, ty ~ U(-w_shift, w_shift) x columns, shear ~
    U(-shear, shear), zx and zy ~ U(1 - zoom, 1 + zoom) each, flips ~ U(0, 1) < 0.5.

    Parameters
    ----------
    seed
        Stateless seed, shape (2,) integers: the same seed draws the same values.
    count
        Images.
    shape
        (rows, columns) of the images, for the shifts in pixels.
    settings
        The generator's ranges.
    """
    u = tf.random.stateless_uniform(tf.stack([count, len(PARAMETERS)]), seed)

    def symmetric(column: int, half_width: float) -> tf.Tensor:
        return (2.0 * u[:, column] - 1.0) * half_width

    rows, columns = shape
    return tf.stack([
        symmetric(0, settings.rotation_range),
        symmetric(1, settings.height_shift_range * rows),
        symmetric(2, settings.width_shift_range * columns),
        symmetric(3, settings.shear_range),
        1.0 + symmetric(4, settings.zoom_range),
        1.0 + symmetric(5, settings.zoom_range),
        tf.cast(u[:, 6] < 0.5, tf.float32) * float(settings.horizontal_flip),
        tf.cast(u[:, 7] < 0.5, tf.float32) * float(settings.vertical_flip),
    ], axis=1)


def _affine(rows: list[list[tf.Tensor | float]], like: tf.Tensor) -> tf.Tensor:
    """N x 3 x 3 matrices from two rows of per-image (or constant) entries."""
    ones, zeros = tf.ones_like(like), tf.zeros_like(like)
    entries = [[ones * value if isinstance(value, float) else value for value in row]
               for row in rows] + [[zeros, zeros, ones]]
    return tf.stack([tf.stack(row, axis=-1) for row in entries], axis=-2)


def transforms(parameters: tf.Tensor, shape: tuple[int, int]) -> tf.Tensor:
    """Projective transforms (N x 8, output pixel to input pixel) of :func:`random_parameters`.

    The matrix is ``apply_affine_transform``'s -- rotation, shift, shear, zoom,
    about the image centre -- in (x, y) = (column, row) pixel coordinates, as the
    generator Keras 3 keeps applies it, followed by the flips (which the generator
    applies after its resampling; here they are part of the one matrix). The 2020
    generator (keras-preprocessing 1.1) applied the same matrix in (row, column)
    coordinates: rotation the other way, tx/ty and zx/zy on the other axes -- the
    same distribution, as every range is symmetric and the two shift ranges are
    equal on a square image.
    """
    theta, tx, ty, shear, zx, zy, flip_h, flip_v = tf.unstack(parameters, axis=1)
    rows, columns = shape
    cx, cy = (columns - 1) / 2.0, (rows - 1) / 2.0
    theta, shear = theta * (math.pi / 180.0), shear * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    matrix = tf.linalg.matmul
    m = _affine([[1.0, 0.0, cx], [0.0, 1.0, cy]], theta)
    m = matrix(m, _affine([[cos, -sin, 0.0], [sin, cos, 0.0]], theta))
    m = matrix(m, _affine([[1.0, 0.0, tx], [0.0, 1.0, ty]], theta))
    m = matrix(m, _affine([[1.0, -tf.sin(shear), 0.0], [0.0, tf.cos(shear), 0.0]], theta))
    m = matrix(m, _affine([[zx, 0.0, 0.0], [0.0, zy, 0.0]], theta))
    m = matrix(m, _affine([[1.0, 0.0, -cx], [0.0, 1.0, -cy]], theta))
    # a flip of the output is x -> (columns - 1) - x (or y), exact on the pixel grid
    sign_x, sign_y = 1.0 - 2.0 * flip_h, 1.0 - 2.0 * flip_v
    m = matrix(m, _affine([[sign_x, 0.0, flip_h * (columns - 1)],
                           [0.0, sign_y, flip_v * (rows - 1)]], theta))
    return tf.reshape(m, (-1, 9))[:, :8]


def apply(images: tf.Tensor, parameters: tf.Tensor) -> tf.Tensor:
    """Images (N x H x W x C float32) transformed by ``parameters``: one bilinear
    resampling, nearest fill (``ImageDataGenerator``'s ``order=1``, ``fill_mode='nearest'``)."""
    shape = (int(images.shape[1]), int(images.shape[2]))
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms(parameters, shape),
        output_shape=tf.constant(shape, tf.int32), fill_value=tf.constant(0.0),
        interpolation="BILINEAR", fill_mode="NEAREST")


def augment_batch(images: tf.Tensor, seed: tf.Tensor,
                  settings: Augmentation = PAPER_AUGMENTATION) -> tf.Tensor:
    """The paper's augmentation of a batch (N x H x W x C float32), from a stateless seed."""
    shape = (int(images.shape[1]), int(images.shape[2]))
    return apply(images, random_parameters(seed, tf.shape(images)[0], shape, settings))


def _load_gray(path: bytes, size: int, interpolation: str) -> np.ndarray:
    gray = preprocess.read_gray8(Path(path.decode()))
    return preprocess.resize_gray8(gray, size, interpolation)[:, :, None]  # type: ignore[arg-type]


def dataset(
    records: Sequence[Record],
    input_size: int,
    batch_size: int,
    augment: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    cache: str | Path | None = "",
    interpolation: str = preprocess.DEFAULT_INTERPOLATION,
) -> tf.data.Dataset:
    """Batches of (images N x S x S x 3 float32 in [0, 1], one-hot labels N x 3).

    Parameters
    ----------
    records
        Labelled images.
    input_size
        Side of the network's square input, pixels.
    batch_size
        Images per batch.
    augment
        Apply the paper's augmentation (:func:`augment_batch`), new draws every epoch.
    shuffle, seed
        Shuffle every epoch and draw the augmentation, reproducibly.
    cache
        ``""`` keeps decoded images in memory, a path caches them on disk, None
        does not cache (each epoch decodes again).
    interpolation
        Resizing method of :mod:`model.preprocess` (the model card's).
    """
    if not records:
        raise ValueError("no records")
    paths = [str(r.path) for r in records]
    labels = [CLASS_KEYS.index(r.label) for r in records]
    data = tf.data.Dataset.from_tensor_slices((paths, labels))

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.numpy_function(
            lambda p: _load_gray(p, input_size, interpolation), [path], tf.uint8,
            stateful=False)
        image.set_shape((input_size, input_size, 1))
        return image, label

    data = data.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache is not None:
        data = data.cache(str(cache))
    if shuffle:
        data = data.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(batch_size, drop_remainder=False)
    # a stateless seed per batch, new every epoch and the same in every run
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)

    def finish(batch: tuple[tf.Tensor, tf.Tensor], pair: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor]:
        images, label = batch
        x = tf.cast(images, tf.float32) / 255.0
        if augment:
            x = tf.clip_by_value(augment_batch(x, pair), 0.0, 1.0)
        return tf.repeat(x, 3, axis=-1), tf.one_hot(label, NUM_CLASSES)

    return (tf.data.Dataset.zip((data, seeds))
            .map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))


#: Pixels between the tiles of :func:`preview`.
PREVIEW_GAP = 4


def preview_records(records: Iterable[Record], count: int, seed: int = 0) -> list[Record]:
    """``count`` records to preview, the classes in turn, chosen reproducibly."""
    records = list(records)
    rng = np.random.default_rng(seed)
    by_class = [[r for r in records if r.label == key] for key in CLASS_KEYS]
    queues = [list(rng.permutation(len(group))) for group in by_class]
    limit = min(count, sum(len(group) for group in by_class))
    chosen: list[Record] = []
    while len(chosen) < limit:
        for group, queue in zip(by_class, queues, strict=True):
            if queue and len(chosen) < limit:
                chosen.append(group[int(queue.pop())])
    return chosen


def preview(
    records: Sequence[Record],
    out: Path,
    augmentations: int = 5,
    input_size: int = 300,
    seed: int = 0,
    interpolation: str = preprocess.DEFAULT_INTERPOLATION,
) -> tuple[int, int]:
    """Write a PNG grid of what the network is shown: a row per record, its input
    without augmentation first, then ``augmentations`` draws of :func:`augment_batch`.

    Parameters
    ----------
    records
        The images of the rows, in order.
    out
        The PNG file to write.
    augmentations
        Augmented columns after the original.
    input_size
        Side of each tile, the network's input size.
    seed
        Seed of the draws.
    interpolation
        Resizing method of :mod:`model.preprocess`.

    Returns
    -------
    The (width, height) of the PNG.
    """
    if not records:
        raise ValueError("no records")
    step = input_size + PREVIEW_GAP
    width, height = (augmentations + 1) * step - PREVIEW_GAP, len(records) * step - PREVIEW_GAP
    grid = np.full((height, width), 255, np.uint8)
    for row, record in enumerate(records):
        gray = _load_gray(str(record.path).encode(), input_size, interpolation)
        x = tf.repeat(tf.constant(gray[None], tf.float32) / 255.0, augmentations, axis=0)
        drawn = augment_batch(x, tf.constant([seed, row], tf.int64)).numpy()
        tiles = [gray[:, :, 0]] + [np.round(np.clip(t[:, :, 0], 0, 1) * 255).astype(np.uint8)
                                   for t in drawn]
        for column, tile in enumerate(tiles):
            grid[row * step:row * step + input_size,
                 column * step:column * step + input_size] = tile
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out, format="PNG")
    return width, height
