"""Settings precedence: file < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from diffstack.config import load_settings


def test_flags_beat_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "diffstack.toml"
    path.write_text("[server]\nport = 1\nqueue_size = 5\nmax_batch = 3\n")
    monkeypatch.setenv("DIFFSTACK_SERVER__PORT", "2")
    monkeypatch.setenv("DIFFSTACK_SERVER__QUEUE_SIZE", "6")
    settings = load_settings(path, server={"port": 3})
    assert (settings.server.port, settings.server.queue_size, settings.server.max_batch) == (3, 6, 3)


def test_unknown_fields_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "diffstack.toml"
    path.write_text("[server]\nprot = 1\n")
    with pytest.raises(ValidationError):
        load_settings(path)
