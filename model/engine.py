"""Inference engine: load an artifact once (hash verified), warm up, batched predict.

Backends:

* ``keras-fp32`` (default): the Keras model called directly inside the
  backend's compiled function (``tf.function`` on TensorFlow, without XLA,
  which is slower on a CPU; ``jax.jit``; eager ``torch.no_grad``), never
  ``model.predict``, whose per-call overhead dominates at small batches.
  Runs on the GPU when TensorFlow sees one (``device = "auto"``).
* ``keras-bf16`` / ``keras-fp16``: the same network rebuilt under the
  ``mixed_bfloat16`` / ``mixed_float16`` policy (weights and outputs float32). On a
  GPU with tensor cores these are the fast paths; on a CPU fp16 is emulated
  (slow) and bf16 is fast only with AMX.
* ``openvino-fp32`` / ``openvino-bf16``: the model exported as a SavedModel and
  compiled by OpenVINO for the CPU; bf16 is faster only where the CPU has
  AVX-512 BF16 or AMX. Check parity with :func:`parity` first.
* ``openvino-int8``: an int8 artifact (``dicom-node model quantize``,
  :mod:`model.quantize`), an OpenVINO IR whose parity with its fp32 source is on
  its card. An int8 artifact is always served by this backend, whatever the
  setting says, and this backend serves nothing else. It needs neither
  TensorFlow nor Keras to load.

With ``evidence=True`` the compiled forward pass has a second output, the
``fusion_conv`` activations, from which :meth:`Engine.predict_with_maps` computes
each image's class-activation maps (:mod:`model.evidence`) in the same pass;
:meth:`Engine.predict` then drops them. Without it (the default) the compiled
pass is exactly the classifier's.

On a GPU (TensorFlow) the forward pass is compiled with XLA (``xla=None``: on a GPU,
never on a CPU, where it measured 3.5x slower), TensorFlow takes GPU memory as it
needs it rather than all of it at start, and the automatic batch size is the
largest power of two up to :data:`MAX_GPU_BATCH` whose activations, measured on
the device, fit in half of the GPU's free memory (:func:`batch_for_memory`).

OpenVINO on a CPU of several threads runs a batch that splits evenly into one
part a thread as that many streams of one thread each (:func:`openvino_streams`),
and takes :data:`OPENVINO_LANES` calls at once (:attr:`Engine.lanes`): the
node's worker keeps that many batches in the network, so that a stream that
finished its part starts on the next batch instead of waiting for the others.

Batches are padded to a fixed set of shapes -- powers of two up to
``batch_size``, and ``batch_size`` -- so a compiled function is traced once per
shape and never again, and a batch of 3 costs 4 images of compute, not 16.
Figures: docs/performance.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from model import card as model_card
from model import evidence as model_evidence
from model import network

LOGGER = logging.getLogger(__name__)

Backend = Literal["keras-fp32", "keras-bf16", "keras-fp16", "openvino-fp32",
                  "openvino-bf16", "openvino-int8"]
BACKENDS: tuple[Backend, ...] = ("keras-fp32", "keras-bf16", "keras-fp16", "openvino-fp32",
                                 "openvino-bf16", "openvino-int8")
#: The Keras dtype policy of each Keras backend.
KERAS_POLICIES = {"keras-fp32": "float32", "keras-bf16": "mixed_bfloat16",
                  "keras-fp16": "mixed_float16"}
Device = Literal["auto", "cpu", "gpu"]
#: Automatic batch sizes. On a CPU the network runs fastest per image in small
#: batches (larger ones fall out of cache), and small batches keep latency and
#: the worker's pipeline short; a GPU needs large batches to fill.
#: Figures: docs/performance.md.
CPU_BATCH = 4
#: How many forward passes an OpenVINO engine takes at once (each with requests of its
#: own): two, so that one batch's streams can start while the other's finish.
OPENVINO_LANES = 2
#: A GPU's batch when its memory cannot be measured (no nvidia-ml-py, not TensorFlow).
GPU_BATCH = 32
#: The largest automatic GPU batch: beyond it a GPU's throughput no longer grows
#: measurably for this network, while the worker's batches wait longer to fill.
MAX_GPU_BATCH = 128
#: The share of the GPU's free memory the automatic batch may fill with activations;
#: the rest is left to cuDNN's workspaces and to other processes on the GPU.
GPU_MEMORY_SHARE = 0.5
#: The layer whose activations the class-activation maps are computed from, and the
#: Dense layer that weighs them (:mod:`model.evidence`).
FEATURES_LAYER = "fusion_conv"
HEAD_LAYER = "predictions"

#: A compiled forward pass: a padded batch in, the model's outputs out (probabilities,
#: then with evidence the features), float32.
Call = Callable[[NDArray[np.float32]], tuple[NDArray[np.float32], ...]]


def resolve_batch_size(batch_size: int, device: str) -> int:
    """``batch_size``, or for 0 the automatic one for ``device`` ("cpu" or "gpu"); on a
    GPU the engine then replaces :data:`GPU_BATCH` by a measured one where it can."""
    return batch_size or (GPU_BATCH if device == "gpu" else CPU_BATCH)


def batch_for_memory(free_bytes: int, per_image_bytes: int, cap: int = MAX_GPU_BATCH,
                     share: float = GPU_MEMORY_SHARE) -> int:
    """The largest power of two up to ``cap`` whose activations fit in ``share`` of
    ``free_bytes``; at least 1.

    Parameters
    ----------
    free_bytes
        The GPU's free memory.
    per_image_bytes
        The activations' memory per image (0 or less: not measured, and the answer is
        :data:`GPU_BATCH`).
    cap
        The largest batch.
    share
        The share of ``free_bytes`` the activations may fill.
    """
    if per_image_bytes <= 0:  # nothing measured (noise): the fixed default, not the cap
        return min(GPU_BATCH, cap)
    batch = 1
    while batch * 2 <= cap and batch * 2 * per_image_bytes <= share * free_bytes:
        batch *= 2
    return batch


def gpu_free_bytes() -> int | None:
    """Free memory of the GPU TensorFlow calls GPU:0, from NVIDIA's management library
    (the ``gpu`` extra's nvidia-ml-py); None when it cannot be read."""
    try:
        import pynvml
    except ImportError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    try:
        pynvml.nvmlInit()
        try:
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(visible))
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, a MIG device, an unusual CUDA_VISIBLE_DEVICES
        LOGGER.warning("could not read the GPU's free memory", exc_info=True)
        return None


@dataclass(frozen=True)
class Parity:
    """How far a backend's outputs are from the fp32 reference on the same inputs."""

    top1_agreement: float
    max_abs_diff: float


def configure_threads(threads: int) -> None:
    """Set TensorFlow's thread pools (0: one per core); only effective before TF starts."""
    if threads <= 0:
        return
    try:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
    except (ImportError, RuntimeError) as exc:
        LOGGER.debug("thread settings not applied: %s", exc)


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin can compute in bf16 on this machine."""
    try:
        import openvino as ov

        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:
        return False
    return "BF16" in capabilities


def gpu_available() -> bool:
    """Whether the Keras backend sees a GPU."""
    import keras

    backend = keras.config.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
    except Exception:  # a broken CUDA install must not stop CPU inference
        LOGGER.warning("could not query GPUs; using the CPU", exc_info=True)
    return False


def _outputs(out: Any) -> tuple[NDArray[np.float32], ...]:
    """A model call's output(s) as float32 arrays, in the model's output order."""
    import keras

    parts = out if isinstance(out, (list, tuple)) else (out,)
    return tuple(np.asarray(keras.ops.convert_to_numpy(part), dtype=np.float32)
                 for part in parts)


def _gpu_memory_on_demand() -> None:
    """Let TensorFlow take GPU memory as it needs it, not all of it at start (a node
    may share its GPU); effective only before TensorFlow first uses the GPU."""
    try:
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except (ImportError, RuntimeError, ValueError) as exc:
        LOGGER.debug("GPU memory growth not set: %s", exc)


def _compiled(model: Any, xla: bool = False) -> Call:
    """The model's forward pass, compiled the way each Keras backend runs fastest;
    ``xla``: TensorFlow's XLA compiler (JAX always compiles with XLA)."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x: model(x, training=False), jit_compile=xla,
                         reduce_retracing=False)
        return lambda x: _outputs(fn(tf.constant(x)))
    if backend == "jax":
        import jax

        jitted = jax.jit(lambda x: model(x, training=False))
        return lambda x: _outputs(jitted(x))
    import torch

    def torch_call(x: NDArray[np.float32]) -> tuple[NDArray[np.float32], ...]:
        with torch.no_grad():
            out = model(torch.from_numpy(x), training=False)
        return _outputs(out)

    return torch_call


def with_features(model: Any) -> Any:
    """``model`` with a second output: the activations of :data:`FEATURES_LAYER`, as
    float32 (under mixed precision they are computed in bf16). Same layers, same
    weights, one forward pass for both."""
    import keras

    features = keras.ops.cast(model.get_layer(FEATURES_LAYER).output, "float32")
    return keras.Model(model.input, [model.output, features], name=model.name)


def head_weights(model: Any) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The Dense kernel and bias of :data:`HEAD_LAYER` (float32 under every policy)."""
    import keras

    head = model.get_layer(HEAD_LAYER)
    return (np.asarray(keras.ops.convert_to_numpy(head.kernel), dtype=np.float32),
            np.asarray(keras.ops.convert_to_numpy(head.bias), dtype=np.float32))


class Engine:
    """A loaded model ready for batched prediction."""

    def __init__(
        self,
        artifact: Path,
        backend: Backend = "keras-fp32",
        device: Device = "auto",
        batch_size: int = 0,
        threads: int = 0,
        cache_dir: Path | None = None,
        evidence: bool = False,
        xla: bool | None = None,
    ) -> None:
        """``evidence``: compile the forward pass with the features output too, for
        :meth:`predict_with_maps` (without it, that method refuses). ``xla``: compile
        the Keras backends' forward pass with XLA (None: on a GPU only)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend: {backend!r} is not one of {BACKENDS}")
        if batch_size < 0:
            raise ValueError("batch_size must be at least 1 (or 0: automatic)")
        self.card = model_card.verify(artifact)
        self.artifact = artifact
        if self.card.precision == "int8" and backend != "openvino-int8":
            LOGGER.info("model %s %s is int8: served by openvino-int8, not %s",
                        self.card.name, self.card.display_version, backend)
            backend = "openvino-int8"
        elif self.card.precision != "int8" and backend == "openvino-int8":
            raise ValueError("backend openvino-int8 serves int8 artifacts only; make one "
                             "from this model with 'dicom-node model quantize'")
        self.backend = backend
        self.input_size = self.card.input_size
        self._threads = threads or (os.cpu_count() or 1)
        configure_threads(threads)
        self.device = self._choose_device(device)
        self.xla = (self.device == "gpu") if xla is None else xla
        self._measure_batch = batch_size == 0 and self.device == "gpu"
        self.batch_size = resolve_batch_size(batch_size, self.device)
        self._cache_dir = cache_dir
        self.shapes = batch_shapes(self.batch_size)
        #: How many calls of :meth:`predict` (or :meth:`predict_with_maps`) may run at
        #: once, from as many threads, to keep every core busy: more than one only
        #: for OpenVINO (:data:`OPENVINO_LANES`); each call alone still uses every core.
        self.lanes = 1
        self.evidence = evidence
        #: The Dense kernel and bias the maps are computed with (set by loading, when
        #: ``evidence``), and the maps' h x w.
        self._head: tuple[NDArray[np.float32], NDArray[np.float32]] | None = None
        self.map_size: tuple[int, int] = (0, 0)
        #: The OpenVINO IR the openvino backends compiled (None for the Keras ones).
        self.ir: Path | None = None
        started = time.perf_counter()
        self._calls = self._load()
        LOGGER.info("model %s %s loaded (%s on %s) in %.1f s", self.card.name,
                    self.card.display_version, backend, self.device,
                    time.perf_counter() - started)

    def _choose_device(self, device: Device) -> str:
        has_gpu = self.backend.startswith("keras") and device != "cpu" and gpu_available()
        if device == "gpu" and not has_gpu:
            raise RuntimeError("device = gpu, but no GPU is visible to the Keras backend "
                               "(the openvino backends run on the CPU)")
        if has_gpu:
            _gpu_memory_on_demand()
            return "gpu"
        if self.backend == "keras-fp16":
            LOGGER.warning("keras-fp16 on a CPU: float16 is emulated there, slower than "
                           "fp32; it is meant for GPUs")
        return "cpu"

    def _load(self) -> dict[int, Call]:
        if self.backend == "openvino-int8":
            return self._int8()
        import keras

        weights = self.artifact / self.card.weights_file
        fp32 = keras.models.load_model(weights, compile=False)
        if self.evidence:
            self._head = head_weights(fp32)
            h, w = fp32.get_layer(FEATURES_LAYER).output.shape[1:3]
            self.map_size = (int(h), int(w))
        if self.backend in KERAS_POLICIES:
            policy = KERAS_POLICIES[self.backend]
            served = (fp32 if policy == "float32" else
                      _rebuild_with_policy(fp32, self.card, policy))
            call = self._on_device(_compiled(self._served(served), self.xla))
            if self._measure_batch:
                self.batch_size = self._gpu_batch(call)
                self.shapes = batch_shapes(self.batch_size)
            return dict.fromkeys(self.shapes, call)
        return self._openvino(self._served(fp32))

    def _gpu_batch(self, call: Call) -> int:
        """The automatic GPU batch: :func:`batch_for_memory` with the activations'
        bytes per image measured on the device (TensorFlow's peak memory at batch 2
        less that at batch 1); :data:`GPU_BATCH` where they cannot be measured."""
        import keras

        free = gpu_free_bytes()
        if free is None or keras.config.backend() != "tensorflow":
            return GPU_BATCH
        import tensorflow as tf

        peaks = []
        try:
            for n in (1, 2):
                x = np.zeros((n, self.input_size, self.input_size, 3), dtype=np.float32)
                call(x)  # the first call traces and compiles: its scratch memory is not
                tf.config.experimental.reset_memory_stats("GPU:0")  # the activations'
                call(x)
                peaks.append(int(tf.config.experimental.get_memory_info("GPU:0")["peak"]))
        except (RuntimeError, ValueError) as exc:
            LOGGER.warning("GPU memory not measured (%s): batches of %d", exc, GPU_BATCH)
            return GPU_BATCH
        per_image = peaks[1] - peaks[0]
        batch = batch_for_memory(free, per_image)
        LOGGER.info("GPU: %.1f GiB free, %.0f MiB of activations an image: batches of %d",
                    free / 2**30, per_image / 2**20, batch)
        return batch

    def _served(self, model: Any) -> Any:
        """What is compiled: the classifier, or with ``evidence`` the classifier with
        the features output."""
        return with_features(model) if self.evidence else model

    def _on_device(self, call: Call) -> Call:
        import keras

        if keras.config.backend() != "tensorflow":
            return call
        import tensorflow as tf

        name = "/GPU:0" if self.device == "gpu" else "/CPU:0"

        def placed(x: NDArray[np.float32]) -> tuple[NDArray[np.float32], ...]:
            with tf.device(name):
                return call(x)

        return placed

    def _openvino(self, fp32: Any) -> dict[int, Call]:
        precision = "bf16" if self.backend == "openvino-bf16" else "f32"
        if precision == "bf16" and not bf16_supported():
            LOGGER.warning("openvino-bf16: this CPU has no BF16 support (no AVX-512 BF16/AMX); "
                           "OpenVINO computes in fp32, at fp32 speed")
        # The map size is known from the Keras model already.
        self.ir = self._openvino_ir(fp32)
        return self._compile_openvino(self.ir, precision, read_map_size=False)

    def _int8(self) -> dict[int, Call]:
        """The int8 IR, compiled. It always has the features output (so that one file
        serves both kinds of engine); without ``evidence`` it is dropped."""
        xml = self.ir = self.artifact / model_card.INT8_GRAPH_FILE
        if self.evidence:
            with np.load(self.artifact / model_card.HEAD_FILE) as head:
                self._head = (np.asarray(head["kernel"], dtype=np.float32),
                              np.asarray(head["bias"], dtype=np.float32))
        # Non-quantized operations in fp32 whatever the CPU: measured no faster in
        # bf16 on an AMX machine (docs/performance.md), and closer to the source.
        calls = self._compile_openvino(xml, "f32", read_map_size=self.evidence)
        if self.evidence:
            return calls

        def probabilities_only(call: Call) -> Call:
            return lambda x: call(x)[:1]

        return {batch: probabilities_only(call) for batch, call in calls.items()}

    def _compile_openvino(self, xml: Path, precision: str, read_map_size: bool
                          ) -> dict[int, Call]:
        """One compiled request per batch shape of the IR at ``xml``; with
        ``read_map_size``, :attr:`map_size` from its features output."""
        import openvino as ov

        core = ov.Core()
        calls: dict[int, Call] = {}
        # Two lanes only where some batch runs in streams: one stream of every thread
        # has no batch end to idle at.
        streamed = any(openvino_streams(batch, self._threads) > 1 for batch in self.shapes)
        lanes = OPENVINO_LANES if streamed else 1
        for batch in self.shapes:
            streams = openvino_streams(batch, self._threads)
            if streams == 1:
                config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                          "INFERENCE_NUM_THREADS": str(self._threads)}
            else:
                config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": str(streams),
                          "INFERENCE_NUM_THREADS": str(self._threads)}
            ov_model = core.read_model(xml)
            ov_model.reshape([batch // streams, self.input_size, self.input_size, 3])
            if read_map_size:
                self.map_size = tuple(int(d) for d in  # type: ignore[assignment]
                                      openvino_outputs_shapes(ov_model)[-1][1:3])
            compiled = core.compile_model(ov_model, "CPU", config)
            groups = [[compiled.create_infer_request() for _ in range(streams)]
                      for _ in range(lanes)]
            calls[batch] = _streamed(groups, batch // streams)
        self.lanes = lanes
        return calls

    def _openvino_ir(self, fp32: Any) -> Path:
        """The OpenVINO IR of this artifact, converted once and cached by weights hash."""
        import openvino as ov

        cache = self._cache_dir or self.artifact / ".openvino"
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError:
            # Not a shared folder under /tmp, whose cached IR anyone could have put there
            # and this engine would serve as the card's model: a private one (0700) of
            # this process's own, converted again at each start.
            cache = Path(tempfile.mkdtemp(prefix="dicom-node-openvino-"))
        # The evidence variant (two outputs) is another model: another file.
        suffix = "-evidence" if self.evidence else ""
        xml = cache / f"{self.card.sha256[:16]}{suffix}.xml"
        if xml.is_file():
            return xml
        ov.save_model(to_openvino(fp32), str(xml), compress_to_fp16=False)
        return xml

    def warmup(self) -> None:
        """Run each fixed batch shape once (traces and compiles before real traffic)."""
        for batch in self.shapes:
            self._calls[batch](np.zeros((batch, self.input_size, self.input_size, 3),
                                        dtype=np.float32))

    def predict(self, images: NDArray[np.float32]) -> NDArray[np.float32]:
        """Probabilities (N x 3, class order of :mod:`model.classes`) for N images."""
        outputs = [self._run(chunk)[0] for chunk in self._chunks(images)]
        if not outputs:
            return np.zeros((0, len(self.card.classes)), dtype=np.float32)
        return np.concatenate(outputs)

    def predict_with_maps(self, images: NDArray[np.float32]
                          ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Probabilities (N x 3) and class-activation maps (N x h x w x 3, logit
        contributions per position, :func:`model.evidence.class_maps`) for N images,
        from one forward pass. Needs an engine made with ``evidence=True``."""
        if self._head is None:
            raise RuntimeError("predict_with_maps needs an Engine made with evidence=True")
        kernel, bias = self._head
        probabilities, maps = [], []
        for chunk in self._chunks(images):
            # Per chunk: the features (400 KB an image at 300 px) are not kept.
            probs, features = self._run(chunk)
            probabilities.append(probs)
            maps.append(model_evidence.class_maps(features, kernel, bias))
        if not probabilities:
            return (np.zeros((0, len(self.card.classes)), dtype=np.float32),
                    np.zeros((0, *self.map_size, len(self.card.classes)), dtype=np.float32))
        return np.concatenate(probabilities), np.concatenate(maps)

    def _chunks(self, images: NDArray[np.float32]) -> list[NDArray[np.float32]]:
        """``images`` checked, in chunks of at most ``batch_size``."""
        images = np.asarray(images, dtype=np.float32)
        expected = (self.input_size, self.input_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected N x {expected}, got {images.shape}")
        return [images[start:start + self.batch_size]
                for start in range(0, len(images), self.batch_size)]

    def _run(self, chunk: NDArray[np.float32]) -> tuple[NDArray[np.float32], ...]:
        n = len(chunk)
        batch = next(shape for shape in self.shapes if shape >= n)
        if n < batch:
            pad = np.zeros((batch - n, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, pad])
        return tuple(out[:n] for out in self._calls[batch](np.ascontiguousarray(chunk)))


def to_openvino(model: Any) -> Any:
    """A Keras model as an OpenVINO model (``openvino.Model``), through a SavedModel."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        return ov.convert_model(str(saved))


def openvino_streams(batch: int, threads: int) -> int:
    """How many OpenVINO streams a batch runs in: one a thread when the batch splits
    evenly into one part a thread, else one stream of every thread.

    In one stream of several threads every layer ends at a barrier, where the
    threads wait (spinning) for the slowest: on a node whose other threads
    (decoding, SRs, sending) take a core for a while, each such moment stalls
    the whole stream. Streams of one thread each have no barrier; a preempted
    stream is only late. Figures: docs/performance.md.
    """
    return threads if threads > 1 and batch >= threads and batch % threads == 0 else 1


def _streamed(groups: list[list[Any]], part: int) -> Call:
    """A call that runs ``len(group)`` parts of ``part`` images at once, one in each
    request (stream) of a free group, and joins their outputs. Each of the
    ``len(groups)`` calls that may run at once has a group of its own; OpenVINO
    runs their requests as streams come free, so a stream that finishes its part
    first starts on the next call's."""
    free: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
    for group in groups:
        free.put(group)

    def streamed(x: NDArray[np.float32]) -> tuple[NDArray[np.float32], ...]:
        requests = free.get()
        try:
            if len(requests) == 1:  # outputs copied (infer's default)
                return openvino_outputs(requests[0].infer([x]))
            started = []
            try:
                for i, request in enumerate(requests):
                    request.start_async([x[i * part:(i + 1) * part]])
                    started.append(request)
                for request in requests:
                    request.wait()
            except BaseException:
                # None of the group may still be running when the next call takes it.
                for request in started:
                    with contextlib.suppress(Exception):
                        request.wait()
                raise
            outputs = [openvino_outputs(request.results) for request in requests]
            # Joined, that is copied, before the requests are free for another call.
            return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))
        finally:
            free.put(requests)

    return streamed


def openvino_outputs(result: Any) -> tuple[NDArray[np.float32], ...]:
    """An OpenVINO request's outputs as float32 arrays in the Keras model's order: the
    converted model's order is OpenVINO's, but the probabilities (N x 3) come before
    the features (N x h x w x k) by rank."""
    return tuple(sorted((np.asarray(out, dtype=np.float32) for out in result.values()),
                        key=np.ndim))


def openvino_outputs_shapes(ov_model: Any) -> list[tuple[int, ...]]:
    """The static output shapes of an OpenVINO model, in :func:`openvino_outputs`' order."""
    shapes = [tuple(int(d) for d in out.get_partial_shape().to_shape())
              for out in ov_model.outputs]
    return sorted(shapes, key=len)


def batch_shapes(batch_size: int) -> tuple[int, ...]:
    """The padded batch shapes: 1, 2, 4, ... below ``batch_size``, and ``batch_size``."""
    shapes = {batch_size}
    size = 1
    while size < batch_size:
        shapes.add(size)
        size *= 2
    return tuple(sorted(shapes))


def _rebuild_with_policy(fp32: Any, card: model_card.ModelCard, policy: str) -> Any:
    """The same architecture under another dtype policy, with the fp32 weights."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        rebuilt = network.build(card.architecture, card.input_size)  # type: ignore[arg-type]
    finally:
        keras.config.set_dtype_policy(previous)
    rebuilt.set_weights(fp32.get_weights())
    return rebuilt


def parity(reference: Engine, candidate: Engine, images: NDArray[np.float32]) -> Parity:
    """Top-1 agreement and largest probability difference of ``candidate`` vs ``reference``."""
    return compare(reference.predict(images), candidate.predict(images))


def compare(reference: NDArray[np.float32], candidate: NDArray[np.float32]) -> Parity:
    """Top-1 agreement and largest probability difference of two models' probabilities
    (N x classes) on the same images."""
    agreement = float(np.mean(np.argmax(reference, axis=1) == np.argmax(candidate, axis=1)))
    return Parity(agreement, float(np.max(np.abs(reference - candidate))))
