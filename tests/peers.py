"""Real DICOM peers driven by the tests: DCMTK's storescu and storescp, Orthanc."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.loopback import free_port, wait_for_port

from helpers.environment import CALLING_AE, DCMTK_ENV, NODE_AE, missing, require_tool
from helpers.files import log_so_far
from helpers.processes import terminate

#: storescu proposes uncompressed syntaxes unless told which compressed one to offer.
_PROPOSE = {
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLosslessSV1: "-xs",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
}
#: Debian's orthanc-dicomweb installs its plugin here.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_RESPONSE = re.compile(r"Received Store Response \((?P<status>[^)]*)\)")


@dataclass
class StorescuRun:
    returncode: int
    output: str
    responses: list[str]

    @property
    def all_success(self) -> bool:
        return bool(self.responses) and all(r == "Success" for r in self.responses)


def require_file(path: Path, package: str) -> str:
    """``path`` as a string if it exists; skip locally, fail in CI otherwise."""
    if not path.is_file():
        missing(f"{path} is absent (Debian package {package}; `make test` installs it)")
    return str(path)


def propose_flag(path: Path) -> list[str]:
    """The storescu flag that proposes the file's own (compressed) transfer syntax."""
    try:
        syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    except Exception:
        return []
    flag = _PROPOSE.get(syntax)
    return [flag] if flag else []


def storescu(port: int, files: list[Path], calling: str = CALLING_AE, called: str = NODE_AE,
             extra: list[str] | None = None, timeout: float = 120) -> StorescuRun:
    """Send ``files`` on one association with DCMTK storescu (Nagle off, as DCMTK needs)."""
    exe = require_tool("storescu")
    args = [exe, "-v", "-nh", "-aet", calling, "-aec", called, *(extra or []),
            "127.0.0.1", str(port), *map(str, files)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **DCMTK_ENV})
    output = proc.stdout + proc.stderr
    return StorescuRun(proc.returncode, output,
                       [m.group("status") for m in _RESPONSE.finditer(output)])


def send_each(port: int, files: list[Path], **kw: object) -> list[StorescuRun]:
    """One storescu run per file, each proposing the file's own transfer syntax."""
    return [storescu(port, [f], extra=propose_flag(f), **kw) for f in files]  # type: ignore[arg-type]


class Storescp:
    """DCMTK storescp as a (possibly faulty) PACS: ``faults`` are its switches."""

    def __init__(self, folder: Path, port: int, faults: list[str] | None = None,
                 ae_title: str = "PACS", log: bool = False) -> None:
        """``log``: its verbose log in ``log_path``, beside ``folder`` (what it was sent
        and what it did about it); off, nothing is kept."""
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_path = folder.parent / f"{folder.name}.log"
        with (self.log_path.open("ab") if log else open(os.devnull, "wb")) as out:
            self.proc = subprocess.Popen(
                [require_tool("storescp"), *(["-v"] if log else []), "-aet", ae_title,
                 "-od", str(folder), *(faults or []), str(port)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **DCMTK_ENV},
            )
        wait_for_port(port, proc=self.proc)

    @property
    def log(self) -> str:
        """What it logged so far (with ``log``)."""
        return log_so_far(self.log_path)

    def stop(self) -> None:
        terminate(self.proc, 15)

    def received_uids(self) -> list[str]:
        """SOP Instance UIDs of every complete file received (one entry per file)."""
        return self.received_in(self.folder)

    @staticmethod
    def received_in(folder: Path) -> list[str]:
        """SOP Instance UIDs of the readable DICOM files in ``folder``."""
        uids = []
        for path in sorted(folder.iterdir()):
            try:
                uids.append(str(dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            except Exception:
                continue
        return uids


class Orthanc:
    """Debian's Orthanc on free ports, remote access off, talked to over 127.0.0.1 only.

    Orthanc 1.10 cannot choose its bind address; with RemoteAccessAllowed false
    its REST API refuses non-loopback clients, and the tests never send it
    anything from elsewhere.

    ``dicomweb`` loads Debian's DICOMweb plugin (package orthanc-dicomweb) at
    :attr:`stow_url`; ``lua`` is the text of a Lua script Orthanc runs (its
    ``ReceivedInstanceFilter`` decides what is stored).

    ``settings`` is a configuration to run as shipped (deploy/orthanc/orthanc.json): its
    policies are kept, while what ties it to a machine -- folders, ports, plugins, HTTP
    access, the AE title (``ae_title``), the modalities and the Lua scripts -- is the
    test's. ``modalities`` is the DicomModalities table; ``lua_files`` are Lua scripts
    Orthanc runs from where they are (a shipped file, not a copy), before ``lua``.
    """

    def __init__(self, folder: Path, ae_title: str = "ORTHANC", dicomweb: bool = False,
                 lua: str | None = None, settings: dict[str, Any] | None = None,
                 modalities: dict[str, Any] | None = None,
                 lua_files: list[Path] | None = None) -> None:
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.ae_title = ae_title
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "dicom-node-tests", "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "OverwriteInstances": False, **(settings or {}),
            # Never from ``settings``: loopback only, remote access off, free ports.
            "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "Plugins": [], "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": ae_title, "DicomPort": self.dicom_port,
            "DicomModalities": modalities or {}, "LuaScripts": [],
        }
        if dicomweb:
            config["Plugins"] = [require_file(DICOMWEB_PLUGIN, "orthanc-dicomweb")]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        config["LuaScripts"] = [str(path) for path in lua_files or []]
        if lua is not None:
            (folder / "scripts.lua").write_text(lua)
            config["LuaScripts"].append(str(folder / "scripts.lua"))
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log_path = folder / "orthanc.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen([require_tool("Orthanc"), str(folder / "orthanc.json")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.http_port, proc=self.proc)
            wait_for_port(self.dicom_port, proc=self.proc)
        except Exception:
            self.stop()
            raise

    @property
    def stow_url(self) -> str:
        """The DICOMweb service root (STOW-RS at ``{stow_url}/studies``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}",
                                    timeout=30) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"[", b"{") else body

    @property
    def log_text(self) -> str:
        """What Orthanc has written to its log so far (its Lua scripts' print among it)."""
        return log_so_far(self.log_path)

    def instances(self) -> list[Dataset]:
        """Every stored instance, parsed (header and content)."""
        return [dcmread(BytesIO(self.get(f"/instances/{i}/file")), stop_before_pixels=True)
                for i in self.get("/instances")]

    def stop(self) -> None:
        terminate(self.proc, 30)
        self.log.close()


@dataclass
class Canned:
    """One scripted HTTP answer: status, headers and body."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class FakeStow:
    """A scripted STOW-RS origin server on 127.0.0.1: every POST gets :attr:`answer`
    (after reading the whole request); :attr:`posts` counts them, :attr:`headers` are
    the last request's."""

    def __init__(self, answer: Canned) -> None:
        self.answer = answer
        self.posts = 0
        self.headers: dict[str, str] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fake.posts += 1
                fake.headers = dict(self.headers.items())
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                        self.rfile.read(size + 2)
                    self.rfile.readline()
                else:
                    self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(fake.answer.status)
                for name, value in fake.answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(fake.answer.body)))
                self.end_headers()
                self.wfile.write(fake.answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
