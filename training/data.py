"""The training input pipeline: tf.data over :mod:`model.preprocess`, the paper's augmentation.

Each image is decoded and resized once through ``model.preprocess`` -- the same
function the node uses on DICOM -- in parallel, kept as 8-bit gray in a cache
(memory, or a file for data larger than RAM), then augmented on the fly and
prefetched. The augmentation is the authors' ``ImageDataGenerator`` settings
(Table 2 and their notebook): horizontal and vertical flips, rotation over the
full 0-360 degrees, zoom 5 %, width and height shift 5 %, shear 0.05 degrees,
nearest fill -- with Keras 3 preprocessing layers instead of the deprecated
generator. Images are scaled by 1/255 and put on three channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
from keras import layers

from model import preprocess
from model.classes import CLASS_KEYS, NUM_CLASSES
from training.sources import Record

#: The authors' ImageDataGenerator shear_range, in degrees.
SHEAR_DEGREES = 0.05


def augmentation(seed: int | None = None) -> list[layers.Layer]:
    """The paper's augmentation as Keras 3 layers (applied to H x W x 1 images in [0, 1])."""
    shear = math.tan(math.radians(SHEAR_DEGREES))
    return [
        layers.RandomFlip("horizontal_and_vertical", seed=seed),
        # factor 0.5 of a full turn each way: any angle in 0-360 degrees
        layers.RandomRotation(0.5, fill_mode="nearest", seed=seed),
        layers.RandomZoom(0.05, 0.05, fill_mode="nearest", seed=seed),
        layers.RandomTranslation(0.05, 0.05, fill_mode="nearest", seed=seed),
        layers.RandomShear(x_factor=shear, y_factor=shear, fill_mode="nearest", seed=seed),
    ]


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
        Apply the paper's augmentation.
    shuffle, seed
        Shuffle every epoch, reproducibly.
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
    transforms = augmentation(seed) if augment else []

    def finish(images: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(images, tf.float32) / 255.0
        for transform in transforms:
            x = transform(x, training=True)
        x = tf.clip_by_value(x, 0.0, 1.0)
        return tf.repeat(x, 3, axis=-1), tf.one_hot(label, NUM_CLASSES)

    return data.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
