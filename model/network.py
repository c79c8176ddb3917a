"""Keras 3 builders of the paper's three networks (Rahimzadeh & Attar 2020, section 2.1).

``concatenated``: Xception and ResNet50V2 (``include_top=False``) on one shared
input; their last feature maps (10x10x2048 each at 300x300) concatenated;
Conv2D 1024 filters 1x1, no activation; Flatten; Dropout 0.5; Dense 3 softmax
with weights drawn from N(0, 0.001) (standard deviation, as in the authors'
``RandomNormal(stddev=0.001)``). ``xception`` and ``resnet50v2`` use one
backbone with the same head. Public Keras API only, so the network also runs
under the JAX or PyTorch backend.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import keras
from keras import layers

from model.classes import NUM_CLASSES

LOGGER = logging.getLogger(__name__)

Architecture = Literal["concatenated", "xception", "resnet50v2"]
ARCHITECTURES: tuple[Architecture, ...] = ("concatenated", "xception", "resnet50v2")
DEFAULT_INPUT_SIZE = 300
#: Smallest input both backbones accept (Xception needs 71).
MIN_INPUT_SIZE = 71
HEAD_INIT_STDDEV = 0.001

#: Keras' published ImageNet files of the backbones (``include_top=False``) and their md5
#: (as ``keras.applications`` pins them).
IMAGENET_FILES = {
    "xception": ("xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "b0042744bf5b25fce3cb969f33bebb97"),
    "resnet50v2": ("resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   "fac2f116257151a9d068a22e544a4917"),
}


def keras_cache() -> Path:
    """Where Keras keeps downloaded weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def backbones(architecture: Architecture) -> tuple[str, ...]:
    """The backbones of ``architecture``, in the order they are built."""
    return ("xception", "resnet50v2") if architecture == "concatenated" else (architecture,)


def missing_imagenet_files(architecture: Architecture) -> list[Path]:
    """The ImageNet files ``architecture`` needs that the Keras cache lacks (none: ready)."""
    return [path for path in (keras_cache() / IMAGENET_FILES[name][0]
                              for name in backbones(architecture)) if not path.is_file()]


def _imagenet_file(name: str) -> Path:
    """The cached ImageNet file of backbone ``name``; this machine never downloads it."""
    cached = keras_cache() / IMAGENET_FILES[name][0]
    if not cached.is_file():
        raise FileNotFoundError(
            f"ImageNet weights for {name} are not in the Keras cache ({cached}); this "
            "machine cannot download them. Copy the file there (see README, 'Weights').")
    digest = hashlib.md5(cached.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != IMAGENET_FILES[name][1]:
        # Still loaded when every layer fits (load_weights checks the shapes): a site may
        # hold its own ImageNet training of the backbone.
        LOGGER.warning("%s is not Keras' published file (md5 %s, expected %s)",
                       cached.name, digest, IMAGENET_FILES[name][1])
    return cached


def _backbone(name: str, inputs: Any, weights: str) -> keras.Model:
    application = (keras.applications.Xception if name == "xception"
                   else keras.applications.ResNet50V2)
    backbone: keras.Model = application(include_top=False, weights=None, input_tensor=inputs)
    if weights == "imagenet":
        # Read from the cache ourselves: keras.applications would try to download a file
        # whose hash it does not know, and reads KERAS_HOME only once, at import.
        path = _imagenet_file(name)
        backbone.load_weights(path)
        LOGGER.info("%s: ImageNet weights from %s", name, path.name)
    return backbone


def build(
    architecture: Architecture = "concatenated",
    input_size: int = DEFAULT_INPUT_SIZE,
    weights: str = "none",
    seed: int | None = None,
) -> keras.Model:
    """Build one of the paper's networks.

    Parameters
    ----------
    architecture
        ``concatenated`` (Xception + ResNet50V2), ``xception`` or ``resnet50v2``.
    input_size
        Side of the square input, pixels (the paper: 300).
    weights
        ``"none"`` (random), ``"imagenet"`` (backbones only, from the local Keras
        cache) or a path to a ``.weights.h5`` / Keras 2 ``.h5`` file for the whole
        network.
    seed
        Seed of the random initialisation of every layer (backbones, fusion and head)
        and of the dropout: the same seed builds the same initial network. Keras draws
        those from its global generator, so a seed sets it
        (``keras.utils.set_random_seed``, which seeds Python's, NumPy's and
        TensorFlow's too, as training wants); without one nothing global is set.

    Raises
    ------
    ValueError
        An unknown architecture, an input below the smallest size, or a weights
        file that does not fit the network.
    FileNotFoundError
        ImageNet weights missing from the Keras cache, or a missing weights file.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: {architecture!r} is not one of {ARCHITECTURES}")
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size: {input_size} is below {MIN_INPUT_SIZE}")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    backbone_weights = "imagenet" if weights == "imagenet" else "none"
    inputs = keras.Input((input_size, input_size, 3), name="image")
    if architecture == "concatenated":
        features = layers.Concatenate(name="concatenate")([
            _backbone("xception", inputs, backbone_weights).output,
            _backbone("resnet50v2", inputs, backbone_weights).output,
        ])
    else:
        features = _backbone(architecture, inputs, backbone_weights).output
    x = layers.Conv2D(1024, 1, padding="same", activation=None, name="fusion_conv")(features)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.5, name="dropout")(x)
    mixed = keras.config.dtype_policy().name.startswith("mixed")
    outputs = layers.Dense(
        NUM_CLASSES,
        activation="softmax",
        kernel_initializer=keras.initializers.RandomNormal(0.0, HEAD_INIT_STDDEV),
        # Under mixed precision the softmax stays in float32 (Keras' guidance).
        dtype="float32" if mixed else None,
        name="predictions",
    )(x)
    model = keras.Model(inputs, outputs, name=architecture)
    if weights not in ("none", "imagenet"):
        model.load_weights(weights)
        LOGGER.info("loaded weights from %s", Path(weights).name)
    return model


@contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under the Keras dtype policy ``name`` (``float32``, ``mixed_float16``,
    ...); the previous global policy is restored on leaving."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def as_float32(model: keras.Model) -> keras.Model:
    """``model`` (one of :func:`build`'s, trained under any policy) rebuilt under the
    float32 policy with its weights: what is served computes in float32 in every layer.

    A model trained under ``mixed_float16`` keeps that policy per layer when saved, so
    an engine loading it would compute in float16 whatever it was asked for. Mixed
    precision keeps its variables in float32, so the copy is exact.

    Raises
    ------
    ValueError
        ``model`` is not one of :func:`build`'s networks (its name is the architecture).
    """
    if model.name not in ARCHITECTURES:
        raise ValueError(f"model: {model.name!r} is not one of {ARCHITECTURES}")
    with dtype_policy("float32"):
        copy = build(model.name, int(model.input_shape[1]))
    copy.set_weights(model.get_weights())
    return copy


def feature_map_shape(model: keras.Model) -> tuple[int, ...]:
    """Shape of the tensor entering the 1x1 fusion convolution (without the batch axis)."""
    return tuple(model.get_layer("fusion_conv").input.shape[1:])


def multiply_accumulates(model: keras.Model) -> int:
    """Analytic multiply-accumulate count of one forward pass (convolutions and dense)."""
    return sum(multiply_accumulates_by_kind(model).values())


#: The kinds :func:`multiply_accumulates_by_kind` counts (the profile in
#: bench/inference.py puts each engine operation in one of them).
MAC_KINDS = ("pointwise", "spatial", "depthwise", "dense")


def multiply_accumulates_by_kind(model: keras.Model) -> dict[str, int]:
    """Multiply-accumulates of one forward pass by kind of operation: ``pointwise``
    (1x1 convolutions, and the pointwise half of Xception's separable ones),
    ``spatial`` (k x k convolutions, k > 1), ``depthwise`` (the depthwise half of
    separable convolutions) and ``dense``."""
    macs = dict.fromkeys(MAC_KINDS, 0)
    for layer in _all_layers(model):
        if isinstance(layer, layers.SeparableConv2D):
            out = layer.output.shape
            k = layer.kernel_size[0] * layer.kernel_size[1]
            cin = layer.input.shape[-1]
            macs["depthwise"] += out[1] * out[2] * cin * k
            macs["pointwise"] += out[1] * out[2] * cin * layer.filters
        elif isinstance(layer, layers.DepthwiseConv2D):
            out = layer.output.shape
            macs["depthwise"] += out[1] * out[2] * out[3] * layer.kernel_size[0] * \
                layer.kernel_size[1]
        elif isinstance(layer, layers.Conv2D):
            out = layer.output.shape
            k = layer.kernel_size[0] * layer.kernel_size[1]
            macs["pointwise" if k == 1 else "spatial"] += (out[1] * out[2] * out[3] * k *
                                                           layer.input.shape[-1])
        elif isinstance(layer, layers.Dense):
            macs["dense"] += layer.input.shape[-1] * layer.units
    return {kind: int(count) for kind, count in macs.items()}


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    found: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
        else:
            found.append(layer)
    return found
