"""What the node imports is what `make run` installs.

`make run` and the image install ``deploy/requirements.lock`` alone (no extras); the
tests run on the test lock, which holds more. A library the node imports but only the
test lock has passes every test and breaks `make run` (python-hl7 did). This reads
every import of the node's packages and checks its distribution against the node's
lock.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Imported only by commands and backends that need an extra: NNCF (extra quantize,
#: for `model quantize`), NVIDIA's management library (extra gpu, read only on a GPU,
#: where its absence is handled), the other Keras backends.
OPTIONAL = {"nncf", "pynvml", "torch", "jax"}
FIRST_PARTY = {"dicom_node", "model", "training"}


def _imports(package: str) -> set[str]:
    """The top-level module names ``package`` imports anywhere (also inside functions)."""
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def _locked(lock: Path) -> set[str]:
    """Normalised distribution names pinned in a pip-compile lock."""
    pinned = re.findall(r"^([A-Za-z0-9_.\-]+)==", lock.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[-_.]+", "-", name).lower() for name in pinned}


def test_every_library_the_node_imports_is_in_the_nodes_lock() -> None:
    locked = _locked(ROOT / "deploy" / "requirements.lock")
    distributions = packages_distributions()
    missing = {}
    for package in ("dicom_node", "model"):
        for name in sorted(_imports(package) - FIRST_PARTY - OPTIONAL
                           - set(sys.stdlib_module_names)):
            owners = {re.sub(r"[-_.]+", "-", owner).lower()
                      for owner in distributions.get(name, [name])}
            if not owners & locked:
                missing[f"{package}: import {name}"] = sorted(owners)
    assert missing == {}
