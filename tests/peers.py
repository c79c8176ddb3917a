"""Real DICOM peers driven by the tests: DCMTK's storescu."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
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

from conftest import CALLING_AE, NODE_AE, require_tool

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
_RESPONSE = re.compile(r"Received Store Response \((?P<status>[^)]*)\)")


@dataclass
class StorescuRun:
    returncode: int
    output: str
    responses: list[str]

    @property
    def all_success(self) -> bool:
        return bool(self.responses) and all(r == "Success" for r in self.responses)


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
                          env={**os.environ, "TCP_NODELAY": "1"})
    output = proc.stdout + proc.stderr
    return StorescuRun(proc.returncode, output,
                       [m.group("status") for m in _RESPONSE.finditer(output)])


def send_each(port: int, files: list[Path], **kw: object) -> list[StorescuRun]:
    """One storescu run per file, each proposing the file's own transfer syntax."""
    return [storescu(port, [f], extra=propose_flag(f), **kw) for f in files]  # type: ignore[arg-type]
