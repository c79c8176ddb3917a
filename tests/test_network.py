"""The paper's networks: shapes, parameter counts, head, weights files, ImageNet from the
Keras cache, float32 copies of mixed-precision models."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from model import card, network
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
    kinds = network.multiply_accumulates_by_kind(model)
    assert sum(kinds.values()) == network.multiply_accumulates(model)
    assert kinds["dense"] == 102_400 * 3  # the flattened features into three classes
    # Xception's separable convolutions: the depthwise half is small, the 1x1 half large.
    assert kinds["depthwise"] < 0.02 * kinds["pointwise"]
    assert kinds["pointwise"] > kinds["spatial"] > kinds["depthwise"] > kinds["dense"]


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


def test_the_same_seed_builds_the_same_network_every_layer() -> None:
    """``--seed`` builds the same initial network: every weight (backbones and fusion,
    not only the head) is drawn from it, and another seed draws others."""
    first, again, other = (network.build("xception", 71, seed=s).get_weights()
                           for s in (11, 11, 12))
    assert len(first) == len(again) == len(other)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    kernels = [i for i, w in enumerate(first) if w.ndim == 4 and w.std() > 0]
    assert len(kernels) > 10 and not any(np.array_equal(first[i], other[i]) for i in kernels)


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
    assert network.missing_imagenet_files("concatenated") == [
        tmp_path / "models" / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        tmp_path / "models" / "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"]
    with pytest.raises(FileNotFoundError, match="Keras cache"):
        network.build("xception", 96, weights="imagenet")


def imagenet_stand_ins(keras_home: Path, size: int = 71) -> dict[str, keras.Model]:
    """Backbones with random weights saved where Keras keeps the ImageNet files, in their
    (Keras 2 HDF5) layout; the real files are the same layers, so any input size fits."""
    models = keras_home / "models"
    models.mkdir(parents=True, exist_ok=True)
    made = {"xception": keras.applications.Xception(
                include_top=False, weights=None, input_shape=(size, size, 3)),
            "resnet50v2": keras.applications.ResNet50V2(
                include_top=False, weights=None, input_shape=(size, size, 3))}
    for name, model in made.items():
        model.save(models / network.IMAGENET_FILES[name][0])
    return made


def test_imagenet_backbones_from_the_keras_cache(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    stand_ins = imagenet_stand_ins(tmp_path)
    assert network.missing_imagenet_files("concatenated") == []
    built = network.build("concatenated", 96, weights="imagenet")
    ours = {layer.name: layer for layer in built.layers}
    for stand_in in stand_ins.values():
        weighted = [layer for layer in stand_in.layers if layer.weights]
        # Keras numbers its unnamed layers (Xception's shortcut convolutions) per process:
        # compare the named ones, nearly all of them.
        named = [layer for layer in weighted if layer.name in ours]
        assert len(named) >= len(weighted) - 8
        for layer in named:
            for got, expected in zip(ours[layer.name].get_weights(), layer.get_weights(),
                                     strict=True):
                np.testing.assert_array_equal(got, expected)
    # A stand-in is not Keras' published file: loaded (its layers fit), and said so.
    assert "is not Keras' published file" in caplog.text


def _all_policies(model: keras.Model) -> set[str]:
    return {layer.dtype_policy.name for layer in network._all_layers(model)}


def test_mixed_precision_model_serves_float32(tmp_path: Path, global_policy: None) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    mixed = network.build("concatenated", 96, seed=5)
    assert "mixed_float16" in _all_policies(mixed)
    # A head far from uniform, as after training, so the comparison means something.
    head = mixed.get_layer("predictions")
    head.kernel.assign(np.random.default_rng(1).normal(0, 0.2, head.kernel.shape))
    # Statistics as training leaves them: every BatchNorm's moving mean and variance (the
    # non-trainable weights) away from their initial 0 and 1, so a conversion that copied
    # only the trainable weights would be caught.
    rng = np.random.default_rng(2)
    for variable in mixed.non_trainable_weights:
        shape = tuple(variable.shape)
        variable.assign(rng.uniform(0.5, 1.5, shape) if "variance" in variable.path
                        else rng.normal(0, 0.1, shape))
    served = network.as_float32(mixed)
    for kept, made in zip(mixed.non_trainable_weights, served.non_trainable_weights,
                          strict=True):
        np.testing.assert_array_equal(np.asarray(made), np.asarray(kept))
    assert keras.config.dtype_policy().name == "mixed_float16"  # the caller's, untouched
    card.save_artifact(served, tmp_path / "artifact", {
        "version": "0.0.1", "architecture": "concatenated", "input_size": 96, "trained": False})
    keras.mixed_precision.set_global_policy("float32")
    loaded = keras.models.load_model(tmp_path / "artifact" / card.WEIGHTS_FILE, compile=False)
    assert _all_policies(loaded) == {"float32"}
    x = np.random.default_rng(0).random((4, 96, 96, 3), dtype=np.float32)
    expected = np.asarray(mixed(x, training=False), np.float32)
    got = np.asarray(loaded(x, training=False))
    assert got.dtype == np.float32
    assert np.abs(expected - 1 / 3).max() > 0.1  # far from uniform
    np.testing.assert_allclose(got, expected, atol=1e-2)
    print(f"parity: max |mixed - float32| = {np.abs(got - expected).max():.2e}")


def test_class_order_and_codes() -> None:
    assert CLASS_KEYS == ("covid", "normal", "pneumonia")
    assert [c.snomed_code for c in CLASSES] == ["840539006", "17621005", "233604007"]
    assert index_of("COVID-19") == 0 and index_of("Normal") == 1 and index_of("pneumonia") == 2
    with pytest.raises(ValueError):
        index_of("tuberculosis")
