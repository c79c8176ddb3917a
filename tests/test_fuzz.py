"""The receive-path fuzzer (tests/fuzz/receive.py) in the suite: a short, seeded run from
valid seeds that first replays every input it ever found to crash the receive path
(made again by ``dicom_factory.fuzz_regressions``). The long, exploring run is
documented in the harness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_factory import fuzz_regressions, fuzz_seeds

HARNESS = Path(__file__).parent / "fuzz" / "receive.py"

pytestmark = pytest.mark.slow

#: libFuzzer's memory limit for the run, in MB (the seeded run peaks near 400 MB).
RSS_LIMIT_MB = 1024

#: Started by pytest, the harness inherits pytest's peak RSS (over 2 GB once the model
#: tests have run): this launcher reaches past the limit first, then becomes the harness,
#: so that the harness must measure its own memory on every machine and in any order.
LAUNCHER = f"""
import os, sys
peak = bytearray({RSS_LIMIT_MB + 100} * 2**20)
peak[::4096] = b"x" * len(peak[::4096])
del peak
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def test_the_crashes_found_so_far_then_a_short_fuzzing_run_find_nothing(tmp_path: Path
                                                                         ) -> None:
    corpus, regressions = tmp_path / "corpus", tmp_path / "regressions"
    for folder, inputs in ((corpus, fuzz_seeds()), (regressions, fuzz_regressions())):
        folder.mkdir()
        for name, data in inputs.items():
            (folder / name).write_bytes(data)
    # libFuzzer runs every input of both folders first (a regression that crashes again
    # ends the run there), then 600 mutations from a fixed seed, so that the suite
    # checks the same inputs on every machine (exploring is for the long runs, see the
    # harness); new inputs go to the first folder.
    run = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(HARNESS), f"-rss_limit_mb={RSS_LIMIT_MB}",
         "-timeout=20", "-seed=1", "-runs=600", "-max_total_time=120",
         f"-artifact_prefix={tmp_path}/", str(corpus), str(regressions)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONHASHSEED": "0"})  # sets iterated in the same order
    found = sorted(p.name for p in tmp_path.iterdir()
                   if p.name.startswith(("crash", "oom", "timeout", "slow-unit")))
    assert run.returncode == 0 and not found, (found, run.stderr[-3000:])
    # Every seed and every regression input was run.
    total = len(fuzz_seeds()) + len(fuzz_regressions())
    assert f"seed corpus: files: {total} " in run.stderr, run.stderr[-3000:]
    assert "Done" in run.stderr


def test_the_fuzzers_inputs_are_the_same_bytes_on_every_run() -> None:
    """The short run's fixed seed checks the same inputs everywhere only if the files it
    starts from are the same bytes each time (new UIDs would move every offset)."""
    digest = ("import hashlib, sys; sys.path.insert(0, 'tests'); "
              "from dicom_factory import fuzz_regressions, fuzz_seeds; "
              "print(hashlib.sha256(repr(sorted({**fuzz_seeds(), "
              "**fuzz_regressions()}.items())).encode()).hexdigest())")
    runs = {subprocess.run([sys.executable, "-c", digest], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed},
                           cwd=Path(__file__).parent.parent).stdout
            for seed in ("1", "2")}
    assert len(runs) == 1 and len(runs.pop()) == 65
