"""bench/join_wheels.sh on fake parts: Ray's tarball split over two part folders and a wheel of its
needs in a third join, check and install; a missing chunk stops it at once, saying so."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARBALL = "ray-2.60.0-serve.tar.xz"


def _fake_ray_tarball() -> bytes:
    """An xz tarball of a package named ray with a serve module, as the real one is laid out."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, text in {"ray/__init__.py": "__version__ = '9.9'\n", "ray/serve/__init__.py": ""}.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _wheel(folder: Path) -> None:
    """A minimal pure-Python wheel (one of ray[serve]'s needs, for the test)."""
    files = {
        "needed_by_ray.py": "VALUE = 1\n",
        "needed_by_ray-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: needed-by-ray\nVersion: 1.0\n",
        "needed_by_ray-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + "needed_by_ray-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / "needed_by_ray-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in {**files, "needed_by_ray-1.0.dist-info/RECORD": record}.items():
            wheel.writestr(name, text)


def _parts(root: Path) -> Path:
    data = _fake_ray_tarball()
    parts = root / ".whl-ray"
    for index, chunk in enumerate((data[: len(data) // 2], data[len(data) // 2 :])):
        folder = parts / f"part{index + 1}"
        folder.mkdir(parents=True)
        (folder / f"{TARBALL}.{index:02d}").write_bytes(chunk)
    (parts / "part2" / f"{TARBALL}.sha256").write_text(hashlib.sha256(data).hexdigest())
    (parts / "part3").mkdir()
    _wheel(parts / "part3")
    return parts


def _join(parts: Path, target: Path) -> subprocess.CompletedProcess[str]:
    environment = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "join_wheels.sh"), str(parts), str(target)],
        capture_output=True, text=True, timeout=120, env=environment,
    )  # fmt: skip


def test_the_parts_join_into_an_importable_ray_with_its_needs(tmp_path: Path) -> None:
    done = _join(_parts(tmp_path), tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert "join_wheels: ray 9.9 with serve" in done.stdout
    assert (tmp_path / "site" / "needed_by_ray.py").is_file()


def test_a_missing_chunk_stops_it_saying_so(tmp_path: Path) -> None:
    parts = _parts(tmp_path)
    (parts / "part1" / f"{TARBALL}.00").unlink()
    done = _join(parts, tmp_path / "site")
    assert done.returncode == 1
    assert "do not make ray's tarball" in done.stderr
    assert not (tmp_path / "site" / "ray").exists()
