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

import logging
import os
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

_IMAGENET_FILES = {
    "xception": "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50v2": "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


def _backbone_weights(name: str, weights: str) -> str | None:
    """``None`` or ``"imagenet"`` -- the latter only where Keras' cache already holds it."""
    if weights != "imagenet":
        return None
    home = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    cached = home / "models" / _IMAGENET_FILES[name]
    if not cached.is_file():
        raise FileNotFoundError(
            f"ImageNet weights for {name} are not in the Keras cache ({cached}); this "
            "machine cannot download them. Copy the file there (see README, 'Weights')."
        )
    return "imagenet"


def _backbone(name: str, inputs: Any, weights: str) -> keras.Model:
    loaded = _backbone_weights(name, weights)
    if name == "xception":
        return keras.applications.Xception(include_top=False, weights=loaded,
                                           input_tensor=inputs)
    return keras.applications.ResNet50V2(include_top=False, weights=loaded, input_tensor=inputs)


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
        Seed of the random initialisation.

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
        kernel_initializer=keras.initializers.RandomNormal(0.0, HEAD_INIT_STDDEV, seed=seed),
        # Under mixed precision the softmax stays in float32 (Keras' guidance).
        dtype="float32" if mixed else None,
        name="predictions",
    )(x)
    model = keras.Model(inputs, outputs, name=architecture)
    if weights not in ("none", "imagenet"):
        model.load_weights(weights)
        LOGGER.info("loaded weights from %s", Path(weights).name)
    return model


def feature_map_shape(model: keras.Model) -> tuple[int, ...]:
    """Shape of the tensor entering the 1x1 fusion convolution (without the batch axis)."""
    return tuple(model.get_layer("fusion_conv").input.shape[1:])


def multiply_accumulates(model: keras.Model) -> int:
    """Analytic multiply-accumulate count of one forward pass (convolutions and dense)."""
    total = 0
    for layer in _all_layers(model):
        if isinstance(layer, layers.SeparableConv2D):
            out = layer.output.shape
            k = layer.kernel_size[0] * layer.kernel_size[1]
            cin = layer.input.shape[-1]
            total += out[1] * out[2] * cin * (k + layer.filters)
        elif isinstance(layer, layers.DepthwiseConv2D):
            out = layer.output.shape
            total += out[1] * out[2] * out[3] * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, layers.Conv2D):
            out = layer.output.shape
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += out[1] * out[2] * out[3] * k * layer.input.shape[-1]
        elif isinstance(layer, layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return int(total)


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    found: list[keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
        else:
            found.append(layer)
    return found
