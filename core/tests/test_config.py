"""Settings precedence: file < environment < flags."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from diffstack.config import EngineSettings, cpu_threads, load_settings


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


def test_engine_threads_default_to_half_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert cpu_threads(EngineSettings()) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu_threads(EngineSettings()) == 1
    assert cpu_threads(EngineSettings(threads=5)) == 5
    with pytest.raises(ValidationError):
        EngineSettings(threads=-1)


def test_the_engine_applies_its_thread_count() -> None:
    import torch

    from diffstack.engine import Engine
    from diffstack.plugins import PluginHost

    before = torch.get_num_threads()
    try:
        Engine(load_settings(None, engine={"threads": 1}), PluginHost())
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("section", "field"), [("engine", "warmup_steps"), ("server", "batch_measure_steps")]
)
def test_start_up_work_beyond_the_step_limit_is_refused_at_load(section: str, field: str) -> None:
    with pytest.raises(ValidationError, match=rf"{section}\.{field} \(5\) exceeds limits\.max_steps \(4\)"):
        load_settings(None, limits={"max_steps": 4}, **{section: {field: 5}})
    load_settings(
        None, limits={"max_steps": 4}, engine={"warmup_steps": 4}, server={"batch_measure_steps": 4}
    )
