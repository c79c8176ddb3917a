"""GPU: the engine in fp32, fp16 and bf16 at batch 1 to 128, XLA's effect, the batch
the engine picks for the GPU's memory, and training throughput at 300 px.

Run by ``bench/gpu.sh`` on a machine with an NVIDIA GPU and the ``gpu`` extra
(TensorFlow with CUDA). Every figure is measured in this run on the machine at
hand; ratios (fp16 or bf16 over fp32, XLA on over off, training over inference)
are the ones to compare between machines. The network is the untrained
concatenated one (speed does not depend on the weights); the parity of the reduced
precisions with fp32 printed beside them is on near-chance outputs and says only
that nothing is broken -- ``bench/inference.py`` measures parity on a confident
model.

``--cpu-check`` runs the same code on the CPU at 96 px, batch 1 to 4, one training
step: it checks the script where no GPU is, and its figures mean nothing.
Ends with one ``bench:`` line.
Usage: python bench/gpu.py [--cpu-check] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import card, engine, network  # noqa: E402

PRECISIONS = {"fp32": "keras-fp32", "fp16": "keras-fp16", "bf16": "keras-bf16"}
#: The paper's training batch size.
TRAIN_BATCH = 20


def rate(call: Any, x: np.ndarray, seconds: float) -> float:
    """Images/s of ``call`` on the batch ``x``: the median of calls over ``seconds``
    after one warm-up call (which traces and compiles the shape)."""
    call(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        began = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - began)
    return len(x) / statistics.median(times)


def device_facts(device: str) -> str:
    """What the engine runs on, in words."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device != "gpu" or not gpus:
        return f"CPU, {os.cpu_count()} threads (no GPU used)"
    details = tf.config.experimental.get_device_details(gpus[0])
    free = engine.gpu_free_bytes()
    memory = f", {free / 2**30:.0f} GiB free" if free is not None else ""
    return (f"{details.get('device_name', 'GPU')} (compute capability "
            f"{details.get('compute_capability')}){memory}; {len(gpus)} GPU(s) visible")


def training_rate(size: int, batch: int, steps: int, policy: str) -> float:
    """Images/s of training steps of the concatenated network at ``size`` px under the
    dtype ``policy`` (the policy ``dicom-node train`` uses: mixed_float16 on a GPU),
    compiled as training compiles it (Keras's default, XLA where it applies)."""
    import keras

    with network.dtype_policy(policy):
        model = network.build("concatenated", size, seed=0)
    model.compile(optimizer=keras.optimizers.Nadam(1e-4), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((batch, size, size, 3), dtype=np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, batch)]
    model.train_on_batch(x, y)  # traces and compiles
    model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-check", action="store_true",
                        help="run on the CPU at 96 px (checks the script; figures mean nothing)")
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    args = parser.parse_args()
    check = args.cpu_check
    device = "cpu" if check else "gpu"
    size = 96 if check else 300
    batches = ((1, 2, 4) if check else (1, 8, 32, 128) if args.quick
               else (1, 2, 4, 8, 16, 32, 64, 128))
    seconds = 0.5 if check else (2.0 if args.quick else 5.0)
    if not check and not engine.gpu_available():
        sys.exit("no GPU is visible to TensorFlow: install the gpu extra (bench/gpu.sh), "
                 "or run with --cpu-check")
    print(f"device: {device_facts(device)}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        artifact = work / "model"
        card.save_artifact(network.build("concatenated", size, seed=0), artifact,
                           {"version": "bench", "architecture": "concatenated",
                            "input_size": size, "trained": False})
        x = np.random.default_rng(0).random((max(batches), size, size, 3), dtype=np.float32)
        rates: dict[str, dict[int, float]] = {}
        for name, backend in PRECISIONS.items():
            loaded = engine.Engine(artifact, backend=backend,  # type: ignore[arg-type]
                                   device=device, batch_size=max(batches))
            rates[name] = {}
            for batch in batches:
                rates[name][batch] = rate(loaded.predict, x[:batch], seconds)
            best_batch = max(rates[name], key=rates[name].__getitem__)
            print(f"{name} (XLA {'on' if loaded.xla else 'off'}): "
                  + ", ".join(f"bs{b} {r:.1f}" for b, r in rates[name].items())
                  + f" img/s; best bs{best_batch}", flush=True)
            if name != "fp32":
                reference = engine.Engine(artifact, backend="keras-fp32", device=device,
                                          batch_size=16)
                p = engine.parity(reference, loaded, x[:16])
                print(f"  parity with fp32 (untrained, near chance): top-1 "
                      f"{p.top1_agreement:.2f}, max |dp| {p.max_abs_diff:.1e}", flush=True)
            del loaded

        best = {name: max(r.values()) for name, r in rates.items()}
        fp32_batch = max(rates["fp32"], key=rates["fp32"].__getitem__)
        # The engines above compiled as the device's default (XLA on a GPU, not on a
        # CPU); the other way here, at fp32's best batch.
        other = engine.Engine(artifact, backend="keras-fp32", device=device,
                              batch_size=fp32_batch, xla=check)
        other_rate = rate(other.predict, x[:fp32_batch], seconds)
        del other
        with_xla, without = ((other_rate, best["fp32"]) if check
                             else (best["fp32"], other_rate))
        print(f"fp32 at bs{fp32_batch}: XLA on {with_xla:.1f}, off {without:.1f} img/s "
              f"(on / off = {with_xla / without:.2f})", flush=True)
        automatic = engine.Engine(artifact, device=device).batch_size
        fast = max(("fp16", "bf16"), key=best.__getitem__)
        auto_rate = rates[fast].get(automatic, 0.0)
        print(f"automatic batch on this device: {automatic} ({fast} there: "
              f"{auto_rate:.1f} img/s, {auto_rate / best[fast]:.2f} of its best)", flush=True)

        policy = "float32" if check else "mixed_float16"
        train_batches = (4,) if check else (TRAIN_BATCH, 64)
        train = {b: training_rate(size, b, 1 if check else (3 if args.quick else 10), policy)
                 for b in train_batches}
        print("training, " + ", ".join(f"batch {b}: {r:.1f} img/s" for b, r in train.items())
              + f" ({policy}, {size} px)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"bench: fp32_img_s={best['fp32']:.2f} fp16_img_s={best['fp16']:.2f} "
          f"bf16_img_s={best['bf16']:.2f} fp16_over_fp32={best['fp16'] / best['fp32']:.3f} "
          f"bf16_over_fp32={best['bf16'] / best['fp32']:.3f} "
          f"fp32_bs1_img_s={rates['fp32'][1]:.2f} fp16_bs1_img_s={rates['fp16'][1]:.2f} "
          f"xla_gain={with_xla / without:.3f} auto_batch={automatic} "
          f"auto_batch_fraction={auto_rate / best[fast]:.3f} "
          + " ".join(f"train_bs{b}_img_s={r:.2f}" for b, r in train.items())
          + f" train_over_inference={train[train_batches[0]] / best[fast]:.3f} "
          f"gpu={int(not check)}")


if __name__ == "__main__":
    main()
