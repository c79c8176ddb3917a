"""The paper's networks: shapes, parameter counts, head, weights files."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from model import network
from model.classes import CLASS_KEYS, CLASSES, index_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def concatenated_300() -> keras.Model:
    return network.build("concatenated", 300, seed=0)


def test_concatenated_feature_maps_and_parameters(concatenated_300: keras.Model) -> None:
    model = concatenated_300
    assert model.input_shape == (None, 300, 300, 3)
    assert model.output_shape == (None, 3)
    concat = model.get_layer("concatenate")
    assert [tuple(t.shape[1:]) for t in concat.input] == [(10, 10, 2048), (10, 10, 2048)]
    assert network.feature_map_shape(model) == (10, 10, 4096)
    assert model.count_params() == 48_928_811
    assert model.get_layer("flatten").output.shape[1] == 102_400
    assert network.multiply_accumulates(model) == pytest.approx(15.31e9, rel=0.01)


@pytest.mark.parametrize(("arch", "params"), [("xception", 23_266_859),
                                              ("resnet50v2", 25_970_179)])
def test_single_backbones_with_the_same_head(arch: str, params: int) -> None:
    model = network.build(arch, 300)  # type: ignore[arg-type]
    assert network.feature_map_shape(model) == (10, 10, 2048)
    assert model.count_params() == params


def test_head_is_the_papers(concatenated_300: keras.Model) -> None:
    conv = concatenated_300.get_layer("fusion_conv")
    assert conv.filters == 1024 and tuple(conv.kernel_size) == (1, 1)
    assert conv.activation is keras.activations.linear
    assert concatenated_300.get_layer("dropout").rate == 0.5
    dense = concatenated_300.get_layer("predictions")
    assert dense.units == 3 and dense.activation is keras.activations.softmax
    kernel = np.asarray(dense.kernel)
    assert abs(float(kernel.mean())) < 1e-5
    assert float(kernel.std()) == pytest.approx(0.001, rel=0.02)
    assert not np.asarray(dense.bias).any()


def test_input_size_is_configurable_and_bounded() -> None:
    model = network.build("xception", 128)
    assert model.input_shape == (None, 128, 128, 3)
    with pytest.raises(ValueError, match="input_size"):
        network.build("xception", 64)
    with pytest.raises(ValueError, match="architecture"):
        network.build("vgg16", 300)  # type: ignore[arg-type]


def test_weights_file_round_trip(tmp_path: Path) -> None:
    source = network.build("concatenated", 96, seed=3)
    path = tmp_path / "net.weights.h5"
    source.save_weights(path)
    copy = network.build("concatenated", 96, weights=str(path))
    x = np.random.default_rng(0).random((2, 96, 96, 3), dtype=np.float32)
    np.testing.assert_array_equal(source(x, training=False), copy(x, training=False))


def test_imagenet_without_cache_says_where_to_put_it(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Keras cache"):
        network.build("xception", 96, weights="imagenet")


def test_class_order_and_codes() -> None:
    assert CLASS_KEYS == ("covid", "normal", "pneumonia")
    assert [c.snomed_code for c in CLASSES] == ["840539006", "17621005", "233604007"]
    assert index_of("COVID-19") == 0 and index_of("Normal") == 1 and index_of("pneumonia") == 2
    with pytest.raises(ValueError):
        index_of("tuberculosis")
