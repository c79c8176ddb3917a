"""Fuzzing the receive path with atheris: bytes -> pydicom -> intake (every element, the
rules, the pixel budget and decode) -> preprocessing -> SR, as the node runs them.

Each stage must refuse bad input the way the node expects, never otherwise:

* parsing: anything (the SCP answers a data set pynetdicom cannot decode with 0xC210);
* ``intake.decode_elements``: only ``UndecodableDataset``;
* ``intake.decide``: only ``PolicyRefused``;
* ``intake.decode_pixels``: only ``UndecodableDataset``, ``DatasetMismatch`` or
  ``PixelBudgetExceeded``;
* ``preprocess.dicom_tensor``, for what intake acknowledged for classification:
  nothing (the sender was told the image was accepted, so preprocessing must not
  fail it later), and a finite tensor in [0, 1] of the requested shape;
* the SR: any exception (the worker fails that job with the reason) -- but no hang,
  no crash of the interpreter, no memory blow-up: libFuzzer's -timeout and
  -rss_limit_mb catch those.

Anything else is a crash: libFuzzer writes the input as ``crash-<sha1>``. Find what
it does, fix the node, and add a function to ``tests/dicom_factory.py`` that makes
such an input from a synthetic image, listed in ``fuzz_regressions`` (the inputs are
made again by the tests, not kept as files); ``tests/test_fuzz.py`` replays them all
before it fuzzes. Run for an hour, from the seeds::

    .venv/bin/python tests/fuzz/receive.py --make-corpus /tmp/corpus
    .venv/bin/python tests/fuzz/receive.py -rss_limit_mb=2048 -timeout=20 \
        -max_total_time=3600 -artifact_prefix=/tmp/ /tmp/corpus
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from io import BytesIO
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

#: Set in the process that fuzzes (see ``_own_peak_rss``).
CHILD = "DICOM_NODE_FUZZ_CHILD"


def _own_peak_rss() -> None:
    """Fuzz in a child of this small process, so that -rss_limit_mb measures the fuzzer.

    libFuzzer's RSS limit reads the peak that ``getrusage`` reports, and Linux carries
    into it, across ``exec``, the peak of the process that started this one (CPython
    starts children with ``vfork``, which shares its parent's memory until ``exec``).
    Started by a pytest that had loaded TensorFlow models, the harness read 2,211 MB
    before its first input and blamed whichever input ran next for an out-of-memory.
    A child started from here inherits this interpreter's own few megabytes instead.
    """
    if os.environ.get(CHILD):
        return
    try:
        run = subprocess.run([sys.executable, *sys.argv], env={**os.environ, CHILD: "1"},
                             check=False)
    except KeyboardInterrupt:  # the child had the same Ctrl-C and has stopped
        sys.exit(130)
    sys.exit(run.returncode if run.returncode >= 0 else 128 - run.returncode)


if __name__ == "__main__":
    _own_peak_rss()

with atheris.instrument_imports(include=["dicom_node", "model", "pydicom", "highdicom"]):
    import numpy as np
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from dicom_node import intake, libraries
    from dicom_node.config import IntakeRules
    from dicom_node.errors import (
        DatasetMismatch,
        PixelBudgetExceeded,
        PolicyRefused,
        UndecodableDataset,
    )
    from dicom_node.report import Classification, ReportBuilder
    from dicom_node.scp import TRANSFER_SYNTAXES
    from model import preprocess
    from model.card import ModelCard

#: Small enough that a fuzzed size cannot take the harness's memory; the rules are
#: the node's defaults.
MAX_PIXELS = 2**22
INPUT_SIZE = 32
RULES = IntakeRules()
REPORTS = ReportBuilder(ModelCard(version="fuzz", architecture="concatenated",
                                  input_size=INPUT_SIZE, sha256="0" * 64, trained=False))
RESULT = Classification("normal", {"covid": 0.1, "normal": 0.8, "pneumonia": 0.1})
libraries.configure()


def check(data: bytes) -> None:
    """Run ``data`` through the receive path; raise (a crash) only on what the node does
    not expect."""
    try:
        ds = dcmread(BytesIO(data), force=True)
    except Exception:
        return  # refused as undecodable
    try:
        intake.decode_elements(ds)
    except UndecodableDataset:
        return
    try:
        decision = intake.decide(ds, RULES)
    except PolicyRefused:
        return
    if decision.disposition is not intake.Disposition.QUEUE:
        return
    syntax = ds.file_meta.get("TransferSyntaxUID") if "file_meta" in ds.__dict__ else None
    if syntax not in TRANSFER_SYNTAXES:
        return  # the SCP's data set carries a transfer syntax it negotiated, one of these
    try:
        intake.decode_pixels(ds, MAX_PIXELS)
    except (UndecodableDataset, DatasetMismatch, PixelBudgetExceeded):
        return
    # Acknowledged for classification: preprocessing must now succeed. (A refusal here
    # would be an image the sender was told was accepted, and that the worker fails.)
    tensor = preprocess.dicom_tensor(ds, INPUT_SIZE)
    if tensor.shape != (INPUT_SIZE, INPUT_SIZE, 3) or not np.all(np.isfinite(tensor)) \
            or tensor.min() < 0 or tensor.max() > 1:
        raise AssertionError(f"preprocessing returned {tensor.shape}, "
                             f"range {tensor.min()}..{tensor.max()}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            REPORTS.build(ds, RESULT, generate_uid(), generate_uid())
        except Exception:
            return  # the worker fails the job with the reason


def make_corpus(folder: Path) -> None:
    """The seeds and every regression input, as files in ``folder``."""
    from dicom_factory import fuzz_regressions, fuzz_seeds

    folder.mkdir(parents=True, exist_ok=True)
    for name, data in {**fuzz_seeds(), **fuzz_regressions()}.items():
        (folder / name).write_bytes(data)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
