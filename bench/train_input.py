"""Training input speed: our tf.data pipeline against the authors' ImageDataGenerator.

Both decode, resize to 300x300 and apply the paper's augmentation (flips,
rotation 0-360, zoom 5 %, shift 5 %, shear 0.05) to the same images, batch 20,
in the same run: our pipeline through ``model.preprocess`` with a cache of
decoded images (first epoch cold, later epochs from the cache), the authors'
``ImageDataGenerator.flow_from_dataframe`` (from tf-keras, as Keras 3 dropped it)
reading the files every epoch. Also times one training step of the
concatenated network at batch 20, so the input rate can be compared with the
rate training consumes images. Ends with one ``bench:`` line.
Usage: python bench/train_input.py [--quick] [--input-size 300]
Needs the ``bench`` extra (tf-keras, pandas, scipy): pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "cxr-dev"

from training import data, sources  # noqa: E402
from training.sources import Record  # noqa: E402


def records(count: int) -> list[Record]:
    """The shared dev PNGs (or synthetic 512 px PNGs when ../shared is absent)."""
    if (SHARED / "labels.csv").is_file():
        found = list(sources.csv_list(SHARED / "labels.csv"))
    else:
        from PIL import Image

        folder = Path(tempfile.mkdtemp(prefix="bench-train-input-"))
        atexit.register(shutil.rmtree, folder, True)  # synthetic images
        rng = np.random.default_rng(0)
        found = []
        for i in range(count):
            path = folder / f"{i}.png"
            Image.fromarray((rng.random((512, 440)) * 255).astype(np.uint8)).save(path)
            found.append(Record(path, ("covid", "normal", "pneumonia")[i % 3], str(i), "synthetic"))
    return (found * (count // len(found) + 1))[:count]


def ours(items: list[Record], size: int, batch: int, epochs: int) -> list[float]:
    """Images/s per epoch of our pipeline (epoch 1 fills the cache)."""
    pipeline = data.dataset(items, size, batch, augment=True, shuffle=True, seed=0, cache="")
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        seen = sum(int(images.shape[0]) for images, _ in pipeline)
        rates.append(seen / (time.perf_counter() - start))
    return rates


def authors(items: list[Record], size: int, batch: int, epochs: int) -> float:
    """Images/s of the authors' generator (their notebook's settings)."""
    import pandas as pd
    from tf_keras.preprocessing.image import ImageDataGenerator

    frame = pd.DataFrame({"filename": [str(r.path) for r in items],
                          "class": [r.label for r in items]})
    generator = ImageDataGenerator(
        horizontal_flip=True, vertical_flip=True, rescale=1.0 / 255, zoom_range=0.05,
        rotation_range=360, width_shift_range=0.05, height_shift_range=0.05, shear_range=0.05,
    ).flow_from_dataframe(frame, x_col="filename", y_col="class", target_size=(size, size),
                          batch_size=batch, class_mode="categorical", shuffle=True, seed=0)
    start = time.perf_counter()
    seen = 0
    for _ in range(epochs * len(generator)):
        images, _ = next(generator)
        seen += len(images)
    return seen / (time.perf_counter() - start)


def train_step_seconds(size: int, batch: int, steps: int) -> float:
    """Median seconds of one training step of the concatenated network (after warm-up)."""
    import keras

    from model import network

    model = network.build("concatenated", size, seed=0)
    model.compile(optimizer=keras.optimizers.Nadam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, batch)]
    model.train_on_batch(x, y)  # traces
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and steps")
    parser.add_argument("--input-size", type=int, default=300)
    args = parser.parse_args()
    size, batch = args.input_size, 20
    count, epochs, steps = (60, 2, 2) if args.quick else (300, 3, 3)
    items = records(count)
    print(f"{len(items)} images, {size}x{size}, batch {batch}, {os.cpu_count()} CPUs", flush=True)
    rates = ours(items, size, batch, epochs)
    cached = statistics.median(rates[1:]) if len(rates) > 1 else rates[0]
    print(f"{'our pipeline, epoch 1 (decode)':<36} {rates[0]:8.1f} img/s\n"
          f"{'our pipeline, later epochs (cache)':<36} {cached:8.1f} img/s", flush=True)
    theirs = authors(items, size, batch, 1)
    print(f"{'authors ImageDataGenerator':<36} {theirs:8.1f} img/s", flush=True)
    # Tracing the 300 px training graph alone takes minutes on 2 cores: --quick
    # times the step at 128 px (which overstates how fast training eats images).
    step_size = 128 if args.quick else size
    step = train_step_seconds(step_size, batch, steps)
    consumed = batch / step
    print(f"{f'training step, concatenated {step_size}px, bs 20':<36} {step:8.2f} s/step = "
          f"{consumed:.1f} img/s")
    print(f"pipeline / generator: {cached / theirs:.1f}x (target >= 2); pipeline / training: "
          f"{cached / consumed:.1f}x (target >= 3)")
    print(f"bench: pipeline_img_s={cached:.2f} pipeline_cold_img_s={rates[0]:.2f} "
          f"generator_img_s={theirs:.2f} ratio={cached / theirs:.2f} train_step_s={step:.3f} "
          f"train_img_s={consumed:.3f} input_over_train={cached / consumed:.1f}")


if __name__ == "__main__":
    main()
