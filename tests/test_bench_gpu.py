"""bench/gpu.sh, checked where there is no GPU: its --cpu-check runs every step but the
install of the gpu extra, on the CPU, and writes the one results file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Minutes: the engine at three precisions, a training step, and the e2e bench --quick.
pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_gpu_script_runs_on_the_cpu_and_writes_one_results_file(tmp_path: Path) -> None:
    results = tmp_path / "gpu-results.txt"
    done = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--cpu-check", str(results)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    text = results.read_text()
    assert done.returncode == 0, text[-3000:] + done.stderr[-2000:]
    assert "CPU check: figures mean nothing" in text
    benches = [line for line in text.splitlines() if line.startswith("bench: ")]
    assert len(benches) == 2, benches  # bench/gpu.py, then bench/e2e.py
    engine_figures = dict(pair.split("=") for pair in benches[0][len("bench: "):].split())
    assert engine_figures["gpu"] == "0"
    for key in ("fp32_img_s", "fp16_img_s", "bf16_img_s", "train_bs4_img_s", "auto_batch"):
        assert float(engine_figures[key]) > 0, key
    assert engine_figures["auto_batch"] == "4"  # the CPU's automatic batch
    assert re.search(r"bench: latency_p50_s=[0-9.]+ ", benches[1])
    assert "== done in" in text
