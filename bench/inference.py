"""Inference speed: our engine's backends against the paper's evaluation loop, same run.

Prints images/s at batch 1, 4 and 16 for each backend; the paper's own loop (per
image: read, resize, ``model.predict`` on one image); and the ratios the targets
are about, all measured in this one run:

* int8 over fp32 (``openvino-int8`` / ``openvino-fp32``, the same toolkit);
* the best path over the paper's loop;
* the fp32 path over the machine's measured fp32 matmul peak (the best of NumPy's
  OpenBLAS, TensorFlow's and OpenVINO's oneDNN on 4096^3, measured before and
  after the engines: this VM's speed drifts);
* where the fp32 time goes: OpenVINO's per-layer profile (``PERF_COUNT``) at batch
  4, summed by kind of operation (1x1, k x k and depthwise convolutions, the rest),
  each kind's share of the time and of the multiply-accumulates, and the GFLOP/s
  it reaches; the same for int8.

The int8 model is made by the product's own path (:mod:`model.quantize`, see
``bench/models.py``) from a network whose head is fitted so its outputs are
confident (mean top probability about 0.9 on the parity images); its parity with
fp32 on 100 images held out from calibration, and whether ``model install`` would
accept it, are printed beside the speeds, with each bf16 path's parity. Making it
takes about 3 minutes (``--no-int8`` skips it: untrained network, no int8).
Ends with one ``bench:`` line.
Usage: python bench/inference.py [--quick] [--input-size 300] [--backends a,b] [--no-int8]
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

import models  # noqa: E402  (bench/models.py)

from model import card, engine, network, preprocess  # noqa: E402

SHARED_PNG = ROOT.parent / "shared" / "data" / "cxr-dev"


def matmul_peak(n: int = 4096, repeat: int = 5) -> dict[str, float]:
    """Measured fp32 GFLOP/s of an n x n matmul by NumPy (OpenBLAS), TensorFlow and
    OpenVINO (both oneDNN), each the best of ``repeat``.

    The machine's practical peak is the largest: which library wins differs between
    CPUs (OpenBLAS beat TensorFlow by 1.5x on AVX2-only machines), so one alone
    could understate it.
    """
    import openvino as ov
    import openvino.opset13 as ops
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    ta, tb = tf.constant(a), tf.constant(b)
    fn = tf.function(lambda x, y: tf.linalg.matmul(x, y))
    fn(ta, tb).numpy()
    left = ops.parameter([n, n], np.float32)
    compiled = ov.Core().compile_model(
        ov.Model([ops.matmul(left, ops.constant(b), False, False)], [left]), "CPU",
        {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    request.infer([a])
    flop = 2 * n**3 / 1e9
    return {"numpy": flop / timed(lambda: a @ b, repeat, best=True),
            "tensorflow": flop / timed(lambda: fn(ta, tb).numpy(), repeat, best=True),
            "openvino": flop / timed(lambda: request.infer([a]), repeat, best=True)}


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


def operation_kind(node_type: str, exec_type: str) -> str:
    """The kind of an OpenVINO CPU operation in the profile, as
    :func:`model.network.multiply_accumulates_by_kind` counts them; ``other`` for
    operations without multiply-accumulates (pooling, element-wise, padding,
    concatenation, layout reorders)."""
    if node_type == "GroupConvolution":
        return "depthwise"
    if node_type == "Convolution":
        return "pointwise" if "1x1" in exec_type else "spatial"
    if node_type in ("FullyConnected", "MatMul"):
        return "dense"
    return "other"


def profile(xml: Path, size: int, batch: int, precision: str, macs: dict[str, int],
            seconds: float) -> tuple[float, dict[str, tuple[float, str]]]:
    """OpenVINO's per-layer profile of the IR at ``xml``, summed by kind:
    (images/s while profiling, kind -> (ms per image, the kernels it ran))."""
    import collections

    import openvino as ov

    core = ov.Core()
    ov_model = core.read_model(xml)
    ov_model.reshape([batch, size, size, 3])
    compiled = core.compile_model(ov_model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).random((batch, size, size, 3), dtype=np.float32)
    request.infer([x])
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        request.infer([x])
        calls += 1
    rate = calls * batch / (time.perf_counter() - start)
    per_kind: dict[str, float] = collections.Counter()
    kernels: dict[str, set[str]] = collections.defaultdict(set)
    for info in request.profiling_info:  # the last call's
        kind = operation_kind(info.node_type, info.exec_type)
        per_kind[kind] += info.real_time.total_seconds() * 1000 / batch
        if info.real_time.total_seconds() > 0:
            kernels[kind].add(info.exec_type)
    return rate, {kind: (per_kind[kind], ",".join(sorted(kernels[kind])))
                  for kind in (*macs, "other") if kind in per_kind}


def print_profile(title: str, rate: float, rows: dict[str, tuple[float, str]],
                  macs: dict[str, int], peak: float) -> None:
    total_ms = sum(ms for ms, _ in rows.values())
    total_macs = sum(macs.values())
    print(f"{title}: {rate:.2f} img/s while profiled; layers sum to {total_ms:.0f} ms/img")
    print(f"  {'kind':<10} {'ms/img':>7} {'time':>6} {'MACs':>6} {'GFLOP/s':>8} "
          f"{'of peak':>8}  kernels")
    for kind, (ms, kernels) in rows.items():
        flop = 2 * macs.get(kind, 0) / 1e9
        rate_kind = flop / (ms / 1000) if ms and flop else 0.0
        print(f"  {kind:<10} {ms:7.1f} {100 * ms / total_ms:5.1f}% "
              f"{100 * macs.get(kind, 0) / total_macs:5.1f}% {rate_kind:8.0f} "
              f"{100 * rate_kind / peak:7.0f}%  {kernels}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and backends (~5 min)")
    parser.add_argument("--input-size", type=int, default=300)
    parser.add_argument("--arch", default="concatenated")
    parser.add_argument("--backends", default=None, help="comma-separated; default: all")
    parser.add_argument("--no-int8", action="store_true",
                        help="untrained network, no int8 model (skips its 3 minutes)")
    args = parser.parse_args()
    quick, size = args.quick, args.input_size
    with_int8 = not args.no_int8
    bf16 = engine.bf16_supported()
    backends = (args.backends.split(",") if args.backends else
                [b for b in engine.BACKENDS  # keras-fp16 is for GPUs (emulated here)
                 if b != "keras-fp16" and (not quick or b != "keras-bf16")])
    if not with_int8:
        backends = [b for b in backends if b != "openvino-int8"]
    threads = os.cpu_count() or 1
    import keras

    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    atexit.register(shutil.rmtree, work, True)  # the models, the images
    made: models.Int8Models | None = None
    if with_int8:
        made = models.int8_models(work, size, args.arch)
        artifact = made.fp32
        print(f"models: head fitted (mean top probability {made.fit_mean_top:.3f} on the "
              f"labelled images) in {made.fit_s:.0f} s; int8 made by model.quantize in "
              f"{made.quantize_s:.0f} s", flush=True)
    else:
        artifact = work / "artifact"
        card.save_artifact(network.build(args.arch, size, seed=0), artifact,  # type: ignore[arg-type]
                           {"version": "bench", "architecture": args.arch,
                            "input_size": size, "trained": False})
    loaded_model = keras.models.load_model(artifact / "model.keras", compile=False)
    macs = network.multiply_accumulates_by_kind(loaded_model)
    gflop = 2 * sum(macs.values()) / 1e9
    paths, batch = sample_images(size, 16)
    peaks = matmul_peak()
    print(f"CPU bf16 support (OpenVINO): "
          f"{'yes' if bf16 else 'NO: the bf16 paths compute in fp32 or emulate bf16'}")
    print(f"{args.arch} {size}x{size}: {gflop:.2f} GFLOP/image; fp32 matmul 4096^3 on "
          f"{threads} threads: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
          + f" GFLOP/s; images: {paths[0].parent.name}", flush=True)

    paper_loop(loaded_model, paths[:2], size)  # warm-up, as the authors' first call was
    paper = paper_loop(loaded_model, paths[: 8 if quick else 16], size)
    print(f"{'paper loop (predict per image)':<24} {paper:6.2f} img/s", flush=True)

    results: dict[str, float] = {}
    irs: dict[str, Path] = {}  # the IR each OpenVINO backend compiled, for the profile
    reference: engine.Engine | None = None
    parities: dict[str, engine.Parity] = {}
    for name in backends:
        served = made.int8 if name == "openvino-int8" and made is not None else artifact
        loaded = engine.Engine(served, backend=name, batch_size=16,  # type: ignore[arg-type]
                               cache_dir=work / "ov")
        loaded.warmup()
        rates = {}
        for size_n in (1, 4, 16):
            repeat = (2 if quick else 5) if size_n == 16 else (3 if quick else 10)
            rates[size_n] = size_n / timed(lambda e=loaded, n=size_n: e.predict(batch[:n]),
                                           repeat)
        results[name] = max(rates.values())
        if loaded.ir is not None:
            irs[name] = loaded.ir
        print(f"{name:<24} " + "   ".join(f"bs{n} {r:6.2f} img/s" for n, r in rates.items()),
              flush=True)
        if name == "keras-fp32":
            reference = loaded
        elif reference is not None:
            parities[name] = engine.parity(reference, loaded, batch)
            p = parities[name]
            print(f"{'':<24} parity vs keras-fp32 on {len(batch)} images: top-1 "
                  f"{p.top1_agreement:.3f}, max |dp| {p.max_abs_diff:.2e}", flush=True)
        if loaded is not reference:
            del loaded

    later = matmul_peak()
    peaks = {k: (v + later[k]) / 2 for k, v in peaks.items()}
    peak = max(peaks.values())
    fp32 = results.get("keras-fp32", 0.0)
    fp32_ov = results.get("openvino-fp32", 0.0)
    int8 = results.get("openvino-int8", 0.0)
    best_name, best = max(results.items(), key=lambda t: t[1])
    fraction = max(fp32, fp32_ov) * gflop / peak
    int8_ratio = int8 / fp32_ov if fp32_ov else 0.0

    print(f"matmul peak (mean of before and after): {peak:.0f} GFLOP/s")
    profiled = {"openvino-fp32": "openvino-fp32 profile, batch 4",
                "openvino-int8": "openvino-int8 profile, batch 4 (GFLOP/s as int8 operations)"}
    rows_of: dict[str, dict[str, tuple[float, str]]] = {}
    for name, title in profiled.items():
        if name in irs:
            rate, rows_of[name] = profile(irs[name], size, 4, "f32", macs, 4 if quick else 10)
            print_profile(title, rate, rows_of[name], macs, peak)
    rows_fp32 = rows_of.get("openvino-fp32", {})
    conv_ms = sum(rows_fp32[k][0] for k in ("pointwise", "spatial") if k in rows_fp32)
    conv_flop = 2 * (macs["pointwise"] + macs["spatial"]) / 1e9
    conv_rate = conv_flop / (conv_ms / 1000) if conv_ms else 0.0
    rest_share = 1 - conv_ms / sum(ms for ms, _ in rows_fp32.values()) if conv_ms else 0.0

    record = card.verify(made.int8).quantization if made is not None else None
    gate = (int(not card.INT8_PARITY.failures(record)) if record is not None else 0)
    if record is not None:
        print(f"int8 parity with fp32 ({record.validation_images} images held out from "
              f"{record.calibration_images} calibration images; fp32 mean top probability "
              f"{record.mean_top_probability:.3f}): top-1 {record.top1_agreement:.3f}, "
              f"largest probability difference {record.max_probability_difference:.4f}; "
              f"model install would {'accept' if gate else 'REFUSE'} it (bounds: top-1 >= "
              f"{card.INT8_PARITY.min_top1_agreement}, difference <= "
              f"{card.INT8_PARITY.max_probability_difference})")
    print(f"best: {best_name} {best:.2f} img/s = {best / paper:.1f}x the paper's loop "
          f"(target >= 5); int8 / fp32 = {int8_ratio:.2f} (target >= 2); fp32 reaches "
          f"{100 * fraction:.0f}% of the measured matmul peak (target >= 85%); its 1x1 and "
          f"k x k convolutions run at {conv_rate:.0f} GFLOP/s "
          f"({100 * conv_rate / peak:.0f}% of the peak) and everything else takes "
          f"{100 * rest_share:.0f}% of its time")
    bf16_parities = [p for n, p in parities.items() if "bf16" in n]
    int8_top1 = record.top1_agreement if record else 0.0
    int8_diff = record.max_probability_difference if record else 0.0
    mean_top = record.mean_top_probability if record else 0.0
    print(f"bench: paper_img_s={paper:.3f} fp32_img_s={fp32:.3f} "
          f"fp32_openvino_img_s={fp32_ov:.3f} int8_img_s={int8:.3f} best_img_s={best:.3f} "
          f"int8_over_fp32={int8_ratio:.3f} speedup={best / paper:.2f} "
          f"fp32_peak_fraction={fraction:.3f} conv_peak_fraction={conv_rate / peak:.3f} "
          f"non_conv_time_fraction={rest_share:.3f} peak_gflops={peak:.1f} "
          f"numpy_gflops={peaks['numpy']:.1f} tf_matmul_gflops={peaks['tensorflow']:.1f} "
          f"openvino_matmul_gflops={peaks['openvino']:.1f} "
          f"parity_int8_top1={int8_top1:.3f} parity_int8_max_diff={int8_diff:.4f} "
          f"parity_mean_top={mean_top:.3f} int8_install_ok={gate} "
          f"parity_bf16_top1={min((p.top1_agreement for p in bf16_parities), default=1.0):.3f} "
          f"parity_bf16_max_diff={max((p.max_abs_diff for p in bf16_parities), default=0.0):.2e} "
          f"cpu_bf16={int(bf16)}")


if __name__ == "__main__":
    main()
