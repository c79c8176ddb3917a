"""Inference speed: our engine's backends against the paper's evaluation loop, same run.

Prints images/s and ms/image at batch 1 and 16 for each backend, the paper's
own loop (per image: read, resize, ``model.predict`` on one image), the ratio,
the fraction of this machine's measured fp32 matmul peak that the fp32 path
reaches, and each fast path's parity with fp32 (top-1 agreement, largest
probability difference). The network is untrained (weights=None): speed does
not depend on the weight values, parity does -- re-check parity on trained
weights before switching backends. Ends with one ``bench:`` line.
Usage: python bench/inference.py [--quick] [--input-size 300] [--backends a,b]
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

from model import card, engine, network, preprocess  # noqa: E402

SHARED_PNG = ROOT.parent / "shared" / "data" / "cxr-dev"


def matmul_peak(n: int = 4096, repeat: int = 5) -> tuple[float, float]:
    """Measured fp32 GFLOP/s of an n x n matmul: (NumPy/OpenBLAS, TensorFlow/oneDNN).

    The machine's practical peak is the larger: on AVX2-only CPUs OpenBLAS beats
    TensorFlow's matmul by about 1.5x, so TensorFlow alone would understate it.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    ta, tb = tf.constant(a), tf.constant(b)
    fn = tf.function(lambda x, y: tf.linalg.matmul(x, y))
    numpy_s = timed(lambda: a @ b, repeat, best=True)
    fn(ta, tb).numpy()
    tf_s = timed(lambda: fn(ta, tb).numpy(), repeat, best=True)
    return 2 * n**3 / numpy_s / 1e9, 2 * n**3 / tf_s / 1e9


def sample_images(size: int, count: int) -> tuple[list[Path], np.ndarray]:
    """Real chest PNGs when ../shared is there, else synthetic gradients saved as PNG."""
    paths = sorted(SHARED_PNG.glob("*.png"))[:count]
    if len(paths) < count:
        from PIL import Image

        folder = Path(tempfile.mkdtemp(prefix="bench-inference-"))
        atexit.register(shutil.rmtree, folder, True)  # synthetic images
        rng = np.random.default_rng(0)
        for i in range(count - len(paths)):
            image = (rng.random((512, 512)) * 255).astype(np.uint8)
            path = folder / f"synthetic{i}.png"
            Image.fromarray(image).save(path)
            paths.append(path)
    return paths, np.stack([preprocess.load(p, size) for p in paths])


def timed(call: object, repeat: int, best: bool = False) -> float:
    """Median (or best) seconds of ``repeat`` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def paper_loop(model: object, paths: list[Path], size: int) -> float:
    """The authors' evaluation: per image read, cv2-style resize, /255, predict one image."""
    start = time.perf_counter()
    for path in paths:
        gray = preprocess.image_gray8(path)
        img = np.repeat(preprocess.resize_gray8(gray, size)[:, :, None], 3, axis=2)
        x = img.astype("float32") / 255.0
        np.argmax(model.predict(np.expand_dims(x, 0), verbose=0)[0])  # type: ignore[attr-defined]
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and backends (~1-2 min)")
    parser.add_argument("--input-size", type=int, default=300)
    parser.add_argument("--arch", default="concatenated")
    parser.add_argument("--backends", default=None, help="comma-separated; default: all")
    args = parser.parse_args()
    quick = args.quick
    backends = (args.backends.split(",") if args.backends else
                ["keras-fp32", "openvino-bf16"] if quick else list(engine.BACKENDS))
    threads = os.cpu_count() or 1
    size = args.input_size
    import keras

    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    atexit.register(shutil.rmtree, work, True)  # the model, the images
    model = network.build(args.arch, size, seed=0)
    gflop = 2 * network.multiply_accumulates(model) / 1e9
    artifact = work / "artifact"
    card.save_artifact(model, artifact, {"version": "bench", "architecture": args.arch,
                                         "input_size": size, "trained": False})
    paths, batch = sample_images(size, 16)
    numpy_peak, tf_peak = matmul_peak()
    peak = max(numpy_peak, tf_peak)
    bf16_note = ("yes" if engine.bf16_supported() else
                 "NO: openvino-bf16 computes in fp32 here, keras-bf16 emulates bf16 (slower)")
    print(f"CPU bf16 support (OpenVINO): {bf16_note}")
    print(f"{args.arch} {size}x{size}: {gflop:.2f} GFLOP/image; fp32 matmul 4096^3 on "
          f"{threads} threads: NumPy {numpy_peak:.0f}, TensorFlow {tf_peak:.0f} GFLOP/s "
          f"(peak = {peak:.0f}); images: {paths[0].parent.name}", flush=True)

    loaded_model = keras.models.load_model(artifact / "model.keras", compile=False)
    paper_loop(loaded_model, paths[:2], size)  # warm-up, as the authors' first call was
    paper = paper_loop(loaded_model, paths[: 4 if quick else 16], size)
    print(f"{'paper loop (predict per image)':<32} {paper:6.2f} img/s {1000 / paper:7.1f} ms/img",
          flush=True)

    results: dict[str, tuple[float, float]] = {}
    reference: engine.Engine | None = None
    parities: dict[str, engine.Parity] = {}
    for name in backends:
        loaded = engine.Engine(artifact, backend=name, batch_size=16,  # type: ignore[arg-type]
                               cache_dir=work / "ov")
        loaded.warmup()
        one = timed(lambda e=loaded: e.predict(batch[:1]), 3 if quick else 10)
        sixteen = timed(lambda e=loaded: e.predict(batch), 1 if quick else 5) / len(batch)
        results[name] = (1 / one, 1 / sixteen)
        print(f"{name:<32} bs1 {1 / one:6.2f} img/s {one * 1000:7.1f} ms/img   "
              f"bs16 {1 / sixteen:6.2f} img/s {sixteen * 1000:7.1f} ms/img", flush=True)
        if name == "keras-fp32":
            reference = loaded
        elif reference is not None:
            parities[name] = engine.parity(reference, loaded, batch)
            p = parities[name]
            print(f"{'':<32} parity vs keras-fp32: top-1 {p.top1_agreement:.3f}, "
                  f"max |dp| {p.max_abs_diff:.2e}", flush=True)

    fp32 = max(results.get("keras-fp32", (0, 0)))
    fp32_ov = max(results.get("openvino-fp32", (0, 0)))
    best_name, best = max(((n, max(v)) for n, v in results.items()), key=lambda t: t[1])
    fast = max((max(v) for n, v in results.items() if n != "keras-fp32"), default=0.0)
    fp32_best = max(fp32, fp32_ov)
    fraction = fp32_best * gflop / peak
    print(f"best: {best_name} {best:.2f} img/s = {best / paper:.1f}x the paper's loop; "
          f"fp32 reaches {100 * fraction:.0f}% of the measured matmul peak "
          f"(targets: fp32 >= 85%, fast path >= 12 img/s, >= 4x the paper's loop)")
    parity_top1 = min((p.top1_agreement for p in parities.values()), default=1.0)
    parity_diff = max((p.max_abs_diff for p in parities.values()), default=0.0)
    print(f"bench: paper_img_s={paper:.3f} fp32_img_s={fp32:.3f} "
          f"fp32_openvino_img_s={fp32_ov:.3f} fast_img_s={fast:.3f} best_img_s={best:.3f} "
          f"speedup={best / paper:.2f} fp32_peak_fraction={fraction:.3f} "
          f"peak_gflops={peak:.1f} tf_matmul_gflops={tf_peak:.1f} "
          f"parity_top1={parity_top1:.3f} parity_max_diff={parity_diff:.2e} "
          f"cpu_bf16={int(engine.bf16_supported())}")


if __name__ == "__main__":
    main()
