"""The test-only fault hook: what it accepts, and that it is off unless asked for."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dicom_node import faults


def test_parse_accepts_a_step_and_an_optional_count() -> None:
    assert faults.parse(None) is None and faults.parse("") is None
    assert faults.parse("renamed") == ("renamed", 1)
    assert faults.parse("committed:7") == ("committed", 7)


@pytest.mark.parametrize("value", ["bogus", "renamed:0", "committed:-1", "received:x"])
def test_parse_refuses_what_is_not_a_step(value: str) -> None:
    with pytest.raises(ValueError):
        faults.parse(value)


def test_off_without_the_variable_and_reached_does_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    code = ("from dicom_node import faults; assert faults.ARMED is None; "
            "[faults.reached(s) for s in faults.STEPS for _ in range(3)]; print('alive')")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and "alive" in run.stdout, run.stderr


def test_armed_it_kills_at_the_nth_time_of_its_step_only() -> None:
    code = ("from dicom_node import faults\n"
            "faults.reached('received'); faults.reached('renamed')\n"
            "print('after 1', flush=True)\n"
            "faults.reached('renamed')\n"
            "print('after 2', flush=True)\n")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, faults.ENV: "renamed:2"},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == -9 and "after 1" in run.stdout and "after 2" not in run.stdout
