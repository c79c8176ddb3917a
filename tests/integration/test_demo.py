"""`make demo` runs: PACS, node, samples, results, and it says when the model is untrained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEMO = Path(__file__).resolve().parents[2] / "deploy" / "demo.py"


# Suite time (34 s): `long`; `make demo` is a convenience, its parts (model install,
# serve, storescu, SR) are each tested in the suite.
@pytest.mark.long
def test_demo_with_a_given_model(small_artifact: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(DEMO), "--model", str(small_artifact),
                             "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "UNTRAINED" in out and "UNVALIDATED MODEL - NOT FOR CLINICAL USE" in out
    assert "study results:" in out
    rows = [line for line in out.splitlines() if line.startswith("job ")]
    assert len(rows) == 3 and all("sr -> " in row and "evidence -> " in row
                                  and row.count("(done)") == 2 and "covid=" in row
                                  for row in rows)
    # Each evidence image as a PNG to look at, at the source image's size.
    pngs = sorted((tmp_path / "out").glob("evidence-job-*.png"))
    assert len(pngs) == 3 and all(f"evidence image: {p}" in out for p in pngs)
    for path in pngs:
        with Image.open(path) as image:
            assert image.mode == "RGB" and min(image.size) >= 256
