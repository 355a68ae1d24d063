"""A real inductor compile of a tiny UNet on the CPU, then a "restart" that loads it from disk.

The slowest test of the plugins (~40 s on two cores): one cold compile, one warm one, each in its
own process so inductor's in-memory caches cannot help the second.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("compile_tiny_unet.py")


def run_once(cache_dir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiled_unet_matches_eager_and_a_restart_loads_it_from_disk(tmp_path: Path) -> None:
    cold = run_once(tmp_path)
    assert cold["probe"] == f"mode default, cache {tmp_path}"
    assert cold["error"] <= 0.02  # the host's compile tolerance
    assert cold["misses"] >= 1 and cold["compile_seconds"] > 0
    assert cold["notes"][0] == "channels_last"
    assert cold["notes"][1] == "fused QKV projections"
    assert cold["notes"][2].startswith("no compiled artifacts yet")
    [artifact] = (tmp_path / "artifacts").glob("tiny-sd1-*.bin")
    assert artifact.stat().st_size > 0 and any((tmp_path / "inductor").iterdir())

    warm = run_once(tmp_path)
    assert warm["error"] == cold["error"]
    assert warm["notes"][2].startswith(f"loaded 2 compiled artifacts from {artifact}")
    assert warm["misses"] == 0 and warm["hits"] >= 1
