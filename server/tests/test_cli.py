"""``diffstack serve`` and ``python -m diffstack_server``: one command, one set of flags, one mapping."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from diffstack.cli import COMMANDS_GROUP, build_parser, settings_from_args
from diffstack_server.cli import SERVE_FLAGS, module_parser

EVERY_FLAG = [
    *("--config", "{config}"),
    *("--models-dir", "/srv/models", "--device", "cpu", "--host", "0.0.0.0", "--port", "6000"),
    *("--metrics-port", "9100", "--model", "sd15", "--log-format", "json", "--replicas", "2"),
    *("--context-parallel", "2"),
]


def test_the_server_contributes_serve_through_the_entry_point() -> None:
    (serve,) = [ep for ep in entry_points(group=COMMANDS_GROUP) if ep.name == "serve"]
    assert serve.value == "diffstack_server.cli:register_commands"


def test_both_spellings_take_every_flag_and_set_the_same_settings(tmp_path: Path) -> None:
    config = tmp_path / "diffstack.toml"
    config.write_text('[server]\nqueue_size = 3\n[engine]\ndevice = "cuda"\n')
    argv = [arg.format(config=config) for arg in EVERY_FLAG]
    assert len(argv) == 2 * (len(SERVE_FLAGS) + 1), "every serve flag (and --config) is in EVERY_FLAG"

    via_cli = settings_from_args(build_parser().parse_args(["serve", *argv]))
    via_module = settings_from_args(module_parser().parse_args(argv))

    assert via_cli == via_module
    assert via_module.engine.models_dir == Path("/srv/models")
    assert via_module.engine.default_model == "sd15"
    assert via_module.engine.device == "cpu"  # the flag beats the file
    assert via_module.server.queue_size == 3  # the file still counts where no flag says otherwise
    assert (via_module.server.host, via_module.server.port, via_module.server.metrics_port) == (
        "0.0.0.0",
        6000,
        9100,
    )
    assert via_module.server.log_format == "json"
    assert via_module.server.replicas == 2
    assert via_module.server.context_parallel == 2


def test_flags_not_given_leave_the_file_and_environment_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DIFFSTACK_SERVER__PORT", "7001")
    settings = settings_from_args(module_parser().parse_args(["--host", "::"]))
    assert (settings.server.host, settings.server.port) == ("::", 7001)


def test_common_flags_work_before_the_command_too() -> None:
    args = build_parser().parse_args(["--models-dir", "/a", "serve", "--port", "1"])
    assert settings_from_args(args).engine.models_dir == Path("/a")
