"""Shared fixtures: a real node process on a free loopback port, data, a small model.

Helpers live in the ``helpers`` package (tests import them from there, never from
this file or from other test modules); this file only holds fixtures.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Nodes started by the tests (in this process and as children) serve no status endpoint
# unless a test asks for one on a free port: two at once would want the default 9112.
os.environ["DICOM_NODE_METRICS_PORT"] = "0"

from dicom_node import libraries
from dicom_node.config import Settings
from dicom_node.loopback import free_port
from dicom_node.node import Node

from dicom_factory import (
    SHARED_CXR,
    SHARED_CXR_FILES,
    SHARED_DICOM,
    SHARED_DICOM_FILES,
    make_cxr_dev,
    make_dicom_samples,
)
from helpers.environment import CALLING_AE, require_files
from helpers.processes import NodeProcess


@pytest.fixture(scope="session", autouse=True)
def library_settings() -> None:
    """pynetdicom's and pydicom's process-wide settings, as the node and the CLI set
    them (tests that use StorageSCP or delivery directly rely on them)."""
    libraries.configure()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start in-process nodes (settings overridden by keyword), stopped at the end."""
    started: list[Node] = []

    def factory(**overrides: Any) -> Node:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "var",
            "port": free_port(),
            "allowed_calling_ae": [CALLING_AE],
            "min_free_disk_mb": 0,
        }
        values.update(overrides)
        node = Node(Settings(**values))
        node.start()
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A started node that accepts calling AE ``STORESCU``."""
    process = NodeProcess(tmp_path / "var").start()
    try:
        yield process
    finally:
        process.stop()


def _shared_or_synthetic(shared: Path, required: tuple[str, ...], what: str,
                         make: Callable[[Path], Path],
                         factory: pytest.TempPathFactory) -> Path:
    """``shared`` when present (every required file in it: else skip locally, fail in
    CI); without it (a fresh clone), synthetic stand-ins made once per session."""
    if shared.is_dir():
        return require_files(shared, required, what)
    return make(factory.mktemp(f"synthetic-{shared.name}"))


@pytest.fixture(scope="session")
def shared_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real chest DICOMs (shared/data/dicom), or synthetic ones of the same names and
    kinds."""
    return _shared_or_synthetic(SHARED_DICOM, SHARED_DICOM_FILES, "the shared DICOM files",
                                make_dicom_samples, tmp_path_factory)


@pytest.fixture(scope="session")
def shared_cxr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cxr-dev set (PNGs and labels.csv, 50 per class), or a synthetic one."""
    return _shared_or_synthetic(SHARED_CXR, SHARED_CXR_FILES, "the cxr-dev set",
                                make_cxr_dev, tmp_path_factory)


def _untrained_artifact(tmp_path_factory: pytest.TempPathFactory, architecture: str
                        ) -> Path:
    """An untrained ``architecture`` network at 96x96 with the paper's head, saved as an
    artifact (card name and version the same for every architecture)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from model import card, network

    out = tmp_path_factory.mktemp("artifact") / f"{architecture}96"
    card.save_artifact(network.build(architecture, 96, seed=7), out,
                       {"version": "0.0.1", "architecture": architecture, "input_size": 96,
                        "trained": False})
    return out


@pytest.fixture(scope="session")
def small_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained concatenated network at 96x96, saved as an artifact (built once)."""
    return _untrained_artifact(tmp_path_factory, "concatenated")


@pytest.fixture(scope="session")
def serving_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained Xception network at 96x96 -- the paper's head on one backbone, the
    same card name and version as ``small_artifact`` -- saved as an artifact (built once).

    For the tests of what a node does around its model (queue, leases, study results,
    delivery, audit, metrics), where the architecture is beside the point: a node loads
    and warms it up in about 3 s on 2 cores, the concatenated network in about 9, and
    these tests load a model some thirty times. The concatenated network is served by
    the engine's tests and by a node end to end with ``small_artifact``
    (tests/integration/test_pipeline.py).
    """
    return _untrained_artifact(tmp_path_factory, "xception")


@pytest.fixture
def global_policy() -> Iterator[None]:
    """Leaves Keras' global dtype policy as it found it (tests that build under
    mixed precision)."""
    import keras

    before = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(before)


@pytest.fixture
def strict_pydicom() -> Iterator[None]:
    """Every object built in the test must be standard-valid (as highdicom's own tests
    do): pydicom's reading and writing validation raise, then are restored."""
    from pydicom import config as pydicom_config

    reading = pydicom_config.settings.reading_validation_mode
    writing = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        pydicom_config.settings.reading_validation_mode = reading
        pydicom_config.settings.writing_validation_mode = writing
