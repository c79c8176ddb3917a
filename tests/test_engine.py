"""The inference engine: fixed batch shapes, backends, parity, integrity."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from model import engine, evidence
from model.card import ModelIntegrityError

pytestmark = pytest.mark.slow


def images(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def fp32(small_artifact: Path) -> engine.Engine:
    loaded = engine.Engine(small_artifact, batch_size=4, device="cpu")
    loaded.warmup()
    return loaded


def test_predict_gives_probabilities_for_any_count(fp32: engine.Engine) -> None:
    for n in (1, 3, 4, 9):
        out = fp32.predict(images(n))
        assert out.shape == (n, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
        assert (out >= 0).all()
    assert fp32.predict(np.zeros((0, 96, 96, 3), dtype=np.float32)).shape == (0, 3)


def test_result_does_not_depend_on_batch_company(fp32: engine.Engine) -> None:
    batch = images(6)
    together = fp32.predict(batch)
    alone = np.concatenate([fp32.predict(batch[i:i + 1]) for i in range(6)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_matches_keras_reference(fp32: engine.Engine, small_artifact: Path) -> None:
    reference = keras.models.load_model(small_artifact / "model.keras", compile=False)
    x = images(3, seed=4)
    np.testing.assert_allclose(fp32.predict(x), reference(x, training=False), atol=1e-6)


def test_batch_shapes_are_powers_of_two_and_the_maximum() -> None:
    assert engine.batch_shapes(16) == (1, 2, 4, 8, 16)
    assert engine.batch_shapes(12) == (1, 2, 4, 8, 12)
    assert engine.batch_shapes(1) == (1,)


def test_wrong_input_shape_is_refused(fp32: engine.Engine) -> None:
    with pytest.raises(ValueError, match="expected"):
        fp32.predict(images(1, size=64))


def _tensorflow_sees_a_gpu() -> bool:
    """Asked of TensorFlow itself, not through engine.gpu_available."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def test_automatic_device_is_what_this_machine_has(small_artifact: Path) -> None:
    # No fixture choice: the engine decides, on this machine's real hardware.
    chosen = engine.Engine(small_artifact)
    has_gpu = _tensorflow_sees_a_gpu()
    assert engine.gpu_available() is has_gpu
    assert chosen.device == ("gpu" if has_gpu else "cpu")
    assert chosen.batch_size == (engine.GPU_BATCH if has_gpu else engine.CPU_BATCH)
    assert chosen.predict(images(1)).shape == (1, 3)
    if has_gpu:
        assert engine.Engine(small_artifact, device="gpu").device == "gpu"
    else:  # asked for a GPU it does not have: refused, never a silent CPU fallback
        with pytest.raises(RuntimeError, match="no GPU"):
            engine.Engine(small_artifact, device="gpu")


@pytest.mark.parametrize(("backend", "device", "has_gpu", "expected"), [
    ("keras-fp32", "auto", True, "gpu"),
    ("keras-fp32", "gpu", True, "gpu"),
    ("keras-fp32", "cpu", True, "cpu"),
    ("keras-bf16", "auto", True, "gpu"),
    ("keras-fp16", "auto", True, "gpu"),
    ("keras-fp16", "auto", False, "cpu"),  # emulated there (a warning), but it runs
    ("openvino-fp32", "auto", True, "cpu"),  # OpenVINO runs on the CPU only
    ("openvino-fp32", "gpu", True, RuntimeError),
    ("keras-fp32", "auto", False, "cpu"),
    ("keras-fp32", "cpu", False, "cpu"),
    ("keras-fp32", "gpu", False, RuntimeError),
])
def test_device_decision(small_artifact: Path, monkeypatch: pytest.MonkeyPatch,
                         backend: engine.Backend, device: engine.Device,
                         has_gpu: bool, expected: str | type[Exception]) -> None:
    # Both sides of gpu_available() on one machine; loading the weights is beside the point.
    monkeypatch.setattr(engine, "gpu_available", lambda: has_gpu)
    monkeypatch.setattr(engine.Engine, "_load", lambda self: {})
    if not isinstance(expected, str):
        with pytest.raises(expected, match="no GPU"):
            engine.Engine(small_artifact, backend=backend, device=device)
        return
    chosen = engine.Engine(small_artifact, backend=backend, device=device)
    assert chosen.device == expected
    assert chosen.batch_size == (engine.GPU_BATCH if expected == "gpu" else engine.CPU_BATCH)
    assert chosen.xla is (expected == "gpu")  # XLA on a GPU only, unless told
    assert engine.Engine(small_artifact, backend=backend, device=device, xla=False).xla is False


@pytest.mark.parametrize(("free_gib", "per_image_mib", "expected"), [
    (140, 300, 128),  # an H200: capped
    (22, 300, 32),  # a 24 GB card: 11 GiB for activations, 37 images, a power of two
    (7, 300, 8),
    (0.2, 300, 1),  # never below one image
    (16, 0, 32),  # nothing measured per image: the fixed default, never the cap
])
def test_gpu_batch_fills_half_the_free_memory(free_gib: float, per_image_mib: int,
                                              expected: int) -> None:
    batch = engine.batch_for_memory(int(free_gib * 2**30), per_image_mib * 2**20)
    assert batch == expected
    if per_image_mib and 1 < batch < engine.MAX_GPU_BATCH:
        assert batch * per_image_mib * 2**20 <= engine.GPU_MEMORY_SHARE * free_gib * 2**30
        assert 2 * batch * per_image_mib * 2**20 > engine.GPU_MEMORY_SHARE * free_gib * 2**30


#: Each OpenVINO conversion takes about 20 s on 2 cores: the bf16 path's tests are under
#: `long`, since its fp32 path, converted the same way, stays in the suite.
BF16_OPENVINO = pytest.mark.long


# OpenVINO fp32 under long too: the class-map test below converts it the same way and
# checks its maps against the fp32 reference's, and its probabilities against its maps.
@pytest.mark.parametrize(("backend", "tolerance"), [pytest.param("openvino-fp32", 1e-5,
                                                                 marks=BF16_OPENVINO),
                                                    ("keras-bf16", 2e-2),
                                                    ("keras-fp16", 2e-2),
                                                    pytest.param("openvino-bf16", 2e-2,
                                                                 marks=BF16_OPENVINO)])
def test_backend_parity(fp32: engine.Engine, small_artifact: Path, tmp_path: Path,
                        backend: engine.Backend, tolerance: float) -> None:
    other = engine.Engine(small_artifact, backend=backend, batch_size=4, cache_dir=tmp_path)
    result = engine.parity(fp32, other, images(5, seed=9))
    assert result.max_abs_diff <= tolerance
    assert result.top1_agreement >= 0.8
    if "16" in backend:  # it really computes in 16 bits, not fp32 again
        assert result.max_abs_diff > 0


def test_tampered_artifact_is_not_loaded(small_artifact: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bad"
    shutil.copytree(small_artifact, copy)
    (copy / "model.keras").write_bytes(b"not a model")
    with pytest.raises(ModelIntegrityError):
        engine.Engine(copy)


@pytest.fixture(scope="module")
def fp32_evidence(small_artifact: Path) -> engine.Engine:
    return engine.Engine(small_artifact, batch_size=4, device="cpu", evidence=True)


#: Per backend: how far its maps may be from fp32's (relative to their largest value),
#: and how far their sums from its own logit differences (OpenVINO's bf16 computes the
#: Dense layer in bf16 too; the maps are computed in fp32 from its features).
MAP_TOLERANCES = [("keras-fp32", 1e-5, 1e-6), ("openvino-fp32", 1e-4, 1e-6),
                  ("keras-bf16", 5e-2, 1e-6),
                  pytest.param("openvino-bf16", 5e-2, 2e-4, marks=BF16_OPENVINO)]


@pytest.mark.parametrize(("backend", "tolerance", "logit_tolerance"), MAP_TOLERANCES)
def test_maps_come_with_the_probabilities_predict_gives(
        fp32_evidence: engine.Engine, small_artifact: Path, tmp_path: Path,
        backend: engine.Backend, tolerance: float, logit_tolerance: float) -> None:
    # Two threads: OpenVINO runs a batch of 4 as two streams of 2 images, and 1 image
    # as one stream of both threads.
    other = engine.Engine(small_artifact, backend=backend, batch_size=4, device="cpu",
                          cache_dir=tmp_path, evidence=True, threads=2)
    x = images(5, seed=11)  # two chunks, the second one padded
    probabilities, maps = other.predict_with_maps(x)
    # OpenVINO takes two calls at once (two lanes), where its batches run in streams.
    assert other.lanes == (2 if backend.startswith("openvino") else 1)
    if backend.startswith("openvino"):
        # Each image's part of a streamed batch is its own, in its place.
        one_by_one = [other.predict_with_maps(x[i:i + 1]) for i in range(4)]
        np.testing.assert_allclose(probabilities[:4], np.concatenate([p for p, _ in one_by_one]),
                                   rtol=0, atol=1e-6)
        np.testing.assert_allclose(maps[:4], np.concatenate([m for _, m in one_by_one]),
                                   rtol=0, atol=1e-5 * float(np.abs(maps).max()))
    assert probabilities.dtype == maps.dtype == np.float32
    assert maps.shape == (5, *other.map_size, 3) and other.map_size == (3, 3)
    # One forward pass for both: the probabilities are predict's, of the same engine.
    np.testing.assert_array_equal(probabilities, other.predict(x))
    # The maps are the backend's own logits, spread over the positions.
    _, bias = engine.head_weights(keras.models.load_model(small_artifact / "model.keras",
                                                          compile=False))
    z = evidence.logits(maps, bias)
    log_p = np.log(probabilities)
    np.testing.assert_allclose(z - z[:, :1], log_p - log_p[:, :1], atol=logit_tolerance)
    # And equal the fp32 reference's maps within the backend's precision.
    _, reference = fp32_evidence.predict_with_maps(x)
    scale = float(np.abs(reference).max())
    assert float(np.abs(maps - reference).max()) <= tolerance * scale


def test_openvino_streams_split_a_batch_one_part_a_thread() -> None:
    assert engine.openvino_streams(4, 2) == 2
    assert engine.openvino_streams(8, 4) == 4
    assert engine.openvino_streams(2, 2) == 2
    # A single image, a batch smaller than the threads or not divisible by them, or a
    # single thread: one stream of every thread.
    assert engine.openvino_streams(1, 2) == 1
    assert engine.openvino_streams(2, 4) == 1
    assert engine.openvino_streams(6, 4) == 1
    assert engine.openvino_streams(4, 1) == 1


def test_a_streamed_call_that_fails_waits_for_the_requests_it_started() -> None:
    # A batch split into OpenVINO streams, one request each: when one request cannot
    # start, those already started are waited for before the call raises, so that the
    # next call given the same requests finds none of them still running.
    import openvino as ov
    import openvino.opset13 as ops

    # A real OpenVINO model whose part of 8 rows takes tens of milliseconds: the first
    # request is still running when the second fails to start.
    x = ops.parameter([8, 1024], np.float32, name="x")
    layer, rng = x, np.random.default_rng(0)
    for _ in range(96):
        weights = (rng.standard_normal((1024, 1024)) / 32).astype(np.float32)
        layer = ops.tanh(ops.matmul(layer, ops.constant(weights), False, False))
    compiled = ov.Core().compile_model(ov.Model([layer], [x], "chain"), "CPU", {
        "NUM_STREAMS": "2", "INFERENCE_NUM_THREADS": "2"})
    # One group of two requests: every call takes the same two.
    requests = [compiled.create_infer_request() for _ in range(2)]
    call = engine._streamed([requests], 8)
    batch = np.random.default_rng(1).random((16, 1024), dtype=np.float32)
    expected = call(batch)
    with pytest.raises(RuntimeError):
        call(batch[:15])  # the second request's part is seven rows: it cannot start
    assert all(request.wait_for(0) for request in requests)  # none still running
    again = call(batch)  # and the same requests serve the next call
    for got, want in zip(again, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_engine_without_evidence_gives_no_maps(fp32: engine.Engine) -> None:
    with pytest.raises(RuntimeError, match="evidence=True"):
        fp32.predict_with_maps(images(1))


def test_evidence_engine_predicts_as_the_plain_one(fp32: engine.Engine,
                                                   fp32_evidence: engine.Engine) -> None:
    x = images(3, seed=12)
    np.testing.assert_allclose(fp32_evidence.predict(x), fp32.predict(x), atol=1e-6)
    probabilities, maps = fp32_evidence.predict_with_maps(x[:0])
    assert probabilities.shape == (0, 3) and maps.shape == (0, 3, 3, 3)
