"""The deployment files hold together without Docker (which the suite cannot run).

* deploy/compose.yaml (read with Debian's yq) mounts files that exist, its node config is
  valid :class:`Settings`, and it, deploy/orthanc/orthanc.json and the Lua script agree on
  AE titles, hosts and ports;
* both Dockerfiles install as `make install` does (the lock with --require-hashes, then
  the package --no-deps), differ only in their lock and NVIDIA settings, and check the
  health endpoint the node serves;
* deploy/requirements-gpu.lock is the node's lock with TensorFlow's CUDA build in place
  of tensorflow-cpu, never both.

tests/integration/test_orthanc_routing.py runs the same Orthanc files with a real node.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from dicom_node.config import Settings, load_settings
from dicom_node.destination import Destination

from helpers.environment import require_tool

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ORTHANC_JSON = DEPLOY / "orthanc" / "orthanc.json"
AUTOROUTE = DEPLOY / "orthanc" / "autoroute.lua"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu"}
LOCKS = {"cpu": "deploy/requirements.lock", "gpu": "deploy/requirements-gpu.lock"}


# --- readers --------------------------------------------------------------------------


def compose(name: str = "compose.yaml") -> dict[str, Any]:
    """A compose file as data (Debian's yq: YAML to JSON; no YAML library in the locks)."""
    out = subprocess.run([require_tool("yq"), ".", str(DEPLOY / name)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a ./path beside compose.yaml, or a volume name)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments out."""
    logical, current = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            logical.append(" ".join(current.split()))
        current = ""
    return [(text.split(" ", 1)[0].upper(), text.split(" ", 1)[1]) for text in logical]


def env_of(dockerfile: Path) -> dict[str, str]:
    """The image's ENV (KEY=VALUE form)."""
    pairs = [arg for op, args in instructions(dockerfile) if op == "ENV"
             for arg in args.split()]
    return dict(pair.split("=", 1) for pair in pairs)


def lua_constant(name: str) -> str:
    match = re.search(rf"^local {name} = '([^']*)'", AUTOROUTE.read_text(), re.MULTILINE)
    assert match, f"{AUTOROUTE} defines no {name}"
    return match.group(1)


def pins(lock: Path) -> dict[str, tuple[str, int]]:
    """Normalised name -> (version, number of hashes) of each pin in a pip-compile lock."""
    found = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock.read_text()):
        match = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", block)
        if match:
            name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            found[name] = (match.group(2), block.count("--hash=sha256:"))
    return found


@pytest.fixture
def node_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """deploy/node/node.toml as the node reads it in the image: the image's ENV, no other
    DICOM_NODE_* variable (the suite sets some)."""
    service = compose()["services"]["node"]
    command = service["command"]
    config = command[command.index("--config") + 1]
    source = mounts(service)[config]
    for name in [n for n in os.environ if n.startswith("DICOM_NODE_")]:
        monkeypatch.delenv(name)
    for name, value in env_of(DOCKERFILES["cpu"]).items():
        if name.startswith("DICOM_NODE_"):
            monkeypatch.setenv(name, value)
    return load_settings(DEPLOY / source)


# --- compose ----------------------------------------------------------------------------


def test_compose_files_parse_and_mount_files_that_exist() -> None:
    base, gpu = compose(), compose("compose.gpu.yaml")
    assert set(base["services"]) == {"node", "orthanc"}
    for service in base["services"].values():
        for target, source in mounts(service).items():
            if source.startswith("./") and source != "./models":  # models: the admin's
                assert (DEPLOY / source).is_file(), f"{target} from {source}"
    build = base["services"]["node"]["build"]
    context = DEPLOY / build["context"]
    assert (context / build["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    assert (context / gpu["services"]["node"]["build"]["dockerfile"]).resolve() == \
        DOCKERFILES["gpu"]
    # Both images keep the one data volume at the image's data directory.
    assert mounts(base["services"]["node"])[env_of(DOCKERFILES["cpu"])[
        "DICOM_NODE_DATA_DIR"]] == "node-data"


def test_compose_node_config_is_valid_and_admits_orthanc(node_settings: Settings) -> None:
    orthanc = json.loads(ORTHANC_JSON.read_text())
    assert node_settings.host == "0.0.0.0"  # reachable from Orthanc's container
    assert orthanc["DicomAet"] in node_settings.allowed_calling_ae
    # Results go back to Orthanc's DICOM port, by its compose service name.
    returns = [Destination.parse(t.address) for t in node_settings.destinations
               if t.kind == "dicom"]
    assert (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"]) in [
        (d.ae_title, d.host, d.port) for d in returns]


def test_node_orthanc_and_lua_script_agree(node_settings: Settings) -> None:
    orthanc = json.loads(ORTHANC_JSON.read_text())
    services = compose()["services"]
    node_entry = orthanc["DicomModalities"][lua_constant("NODE")]
    assert (node_entry["AET"], node_entry["Host"], node_entry["Port"]) == (
        node_settings.ae_title, "node", node_settings.port)
    # Orthanc stores the node's results: from a known AE title that may store...
    calling = node_settings.delivery_calling_ae
    assert orthanc["DicomAlwaysAllowStore"] or any(
        m["AET"] == calling and m.get("AllowStore", True)
        for m in orthanc["DicomModalities"].values())
    # ... and the script never routes them back.
    assert lua_constant("NODE_CALLING_AE") == calling
    # Orthanc runs the script compose mounts, keeps its data on its volume.
    orthanc_mounts = mounts(services["orthanc"])
    assert [orthanc_mounts[path] for path in orthanc["LuaScripts"]] == [
        "./orthanc/autoroute.lua"]
    assert orthanc_mounts["/etc/orthanc/orthanc.json"] == "./orthanc/orthanc.json"
    assert orthanc_mounts[orthanc["StorageDirectory"]] == "orthanc-db"
    # Published: Orthanc's DICOM port; its web interface on the host's loopback only; the
    # node not at all.
    ports = {p.rsplit(":", 1)[1]: p.rsplit(":", 1)[0] for p in services["orthanc"]["ports"]}
    assert str(orthanc["DicomPort"]) in ports
    assert ports[str(orthanc["HttpPort"])].startswith("127.0.0.1:")
    assert "ports" not in services["node"]


# --- images ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_dockerfile_installs_as_make_install_does(kind: str) -> None:
    steps = instructions(DOCKERFILES[kind])
    runs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    lock = LOCKS[kind]
    assert runs == [f"pip install --no-cache-dir --require-hashes -r {lock}",
                    "pip install --no-cache-dir --no-deps . && mkdir -p /data && "
                    "chown 10001:10001 /data"]
    assert (ROOT / lock).is_file()
    copied = steps.index(("COPY", f"{lock} ./{lock}"))
    assert copied < steps.index(("RUN", runs[0]))
    # `make install`: the same two steps (with the node's lock; editable there).
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LOCK := deploy/requirements\.lock$", makefile, re.MULTILINE)
    recipe = makefile.split("\ninstall:", 1)[1].split("\n\n", 1)[0]
    assert "pip install --quiet --require-hashes -r $(LOCK)" in recipe
    assert "pip install --quiet --no-deps -e ." in recipe


def test_cpu_and_gpu_images_differ_only_in_their_lock_and_nvidia_settings() -> None:
    def same_parts(kind: str) -> list[tuple[str, str]]:
        kept = []
        for op, args in instructions(DOCKERFILES[kind]):
            args = args.replace(LOCKS[kind], "LOCK")
            if op == "ENV":
                args = " ".join(a for a in args.split() if not a.startswith("NVIDIA_"))
            if op == "HEALTHCHECK":  # the GPU one waits longer for CUDA and XLA
                args = re.sub(r"--start-period=\S+ ", "", args)
            kept.append((op, args))
        return kept

    assert same_parts("cpu") == same_parts("gpu")
    assert env_of(DOCKERFILES["gpu"])["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_image_runs_as_non_root_and_checks_the_health_endpoint(
        kind: str, node_settings: Settings) -> None:
    steps = dict(instructions(DOCKERFILES[kind]))
    user = steps["USER"].split(":")
    assert all(part.isdigit() and int(part) != 0 for part in user)
    check = re.search(r"urlopen\('([^']+)'", steps["HEALTHCHECK"])
    assert check is not None
    url = urlsplit(check.group(1))
    # The node's status endpoint as the compose config leaves it, on the loopback.
    assert (url.hostname, url.port, url.path) == (
        node_settings.metrics_host, node_settings.metrics_port, "/healthz")
    assert '"/healthz"' in (ROOT / "dicom_node" / "health.py").read_text()


# --- the GPU lock ------------------------------------------------------------------------


def test_gpu_lock_is_the_node_lock_with_tensorflows_cuda_build() -> None:
    node, gpu = pins(ROOT / LOCKS["cpu"]), pins(ROOT / LOCKS["gpu"])
    assert "tensorflow-cpu" not in gpu and "tensorflow" not in node
    assert gpu["tensorflow"][0] == node["tensorflow-cpu"][0]
    assert {name: pin[0] for name, pin in gpu.items() if name in node} == {
        name: pin[0] for name, pin in node.items() if name != "tensorflow-cpu"}
    assert {"nvidia-ml-py", "nvidia-cudnn-cu12", "nvidia-cublas-cu12"} <= set(gpu)
    # pip --require-hashes refuses a pin without one.
    assert all(hashes for _, hashes in gpu.values())
    # The extra asks for the CUDA build of the TensorFlow minor the node is locked to.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cpu_range = next(d for d in project["dependencies"] if d.startswith("tensorflow-cpu"))
    cuda_range = next(d for d in project["optional-dependencies"]["gpu"]
                      if d.startswith("tensorflow[and-cuda]"))
    assert cuda_range.removeprefix("tensorflow[and-cuda]") == cpu_range.removeprefix(
        "tensorflow-cpu")
