"""The receive-path fuzzer (tests/fuzz/receive.py) in the suite: a short, seeded run from
valid seeds that first replays every crash input ever found (tests/fuzz/crashes/). The
long, exploring run is documented in the harness."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_factory import (
    chest_image,
    cr_monochrome1,
    dx_16bit,
    jpeg2000,
    jpeg_ls,
    part10_bytes,
    rle,
)

HARNESS = Path(__file__).parent / "fuzz" / "receive.py"
CRASHES = Path(__file__).parent / "fuzz" / "crashes"

pytestmark = pytest.mark.slow


def test_the_crashes_found_so_far_then_a_short_fuzzing_run_find_nothing(tmp_path: Path
                                                                         ) -> None:
    crashes = sorted(CRASHES.iterdir())
    assert crashes, "the regression inputs are missing"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k, make in enumerate([chest_image, dx_16bit, cr_monochrome1, jpeg2000, jpeg_ls, rle]):
        (corpus / f"seed-{k}.dcm").write_bytes(part10_bytes(make()))
    # libFuzzer runs every input of both folders first (a crash input that still crashes
    # ends the run there), then 600 mutations from a fixed seed, so that the suite
    # checks the same inputs on every machine (exploring is for the long runs, see the
    # harness); new inputs go to the first folder.
    run = subprocess.run(
        [sys.executable, str(HARNESS), "-rss_limit_mb=2048", "-timeout=20", "-seed=1",
         "-runs=600", "-max_total_time=120", f"-artifact_prefix={tmp_path}/", str(corpus),
         str(CRASHES)], capture_output=True, text=True, timeout=300)
    found = sorted(p.name for p in tmp_path.iterdir()
                   if p.name.startswith(("crash", "oom", "timeout", "slow-unit")))
    assert run.returncode == 0 and not found, (found, run.stderr[-3000:])
    # Every seed and every crash input was run.
    assert f"seed corpus: files: {len(crashes) + 6} " in run.stderr, run.stderr[-3000:]
    assert "Done" in run.stderr
