"""The ``serve`` command, for ``diffstack serve`` and ``python -m diffstack_server`` alike.

The server adds it to the core's command line through the ``diffstack.commands`` entry point, so the
core never imports the server. Both spellings take the same flags, declared once below.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from diffstack.cli import (
    COMMON_FLAGS,
    SettingFlag,
    Subcommands,
    add_setting_flags,
    add_verbosity_flags,
    log_level,
    quiet_libraries,
    settings_from_args,
)
from diffstack.config import Settings

SERVE_FLAGS = (
    *COMMON_FLAGS,
    SettingFlag("--host", "server", "host", "address to listen on (default 127.0.0.1)"),
    SettingFlag("--port", "server", "port", "gRPC port (0 picks a free one; default 50051)", int),
    SettingFlag(
        "--metrics-port",
        "server",
        "metrics_port",
        "Prometheus /metrics port (default 9464; 0 picks one)",
        int,
    ),
    SettingFlag("--model", "engine", "default_model", "the default model: a name inside --models-dir"),
    SettingFlag("--log-format", "server", "log_format", "log lines as", choices=("auto", "json", "console")),
    SettingFlag(
        "--replicas",
        "server",
        "replicas",
        "N Ray Serve replicas behind one port (diffstack-ray; default 0: one process)",
        int,
    ),
    SettingFlag(
        "--context-parallel",
        "server",
        "context_parallel",
        "N processes, one per GPU, splitting each step (diffstack-context-parallel; default 0: one)",
        int,
    ),
)
"""Every flag of ``serve``: the core's common ones and the server's own."""

DESCRIPTION = "Serve diffstack over gRPC until SIGTERM or SIGINT, then drain."


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """The serve flags: every SettingFlag, and ``--no-metrics`` (``server.metrics = false``)."""
    add_setting_flags(parser, SERVE_FLAGS)
    parser.add_argument(
        "--no-metrics",
        dest="server.metrics",
        action="store_const",
        const=False,
        default=argparse.SUPPRESS,
        help="serve no Prometheus /metrics",
    )
    add_verbosity_flags(parser)
    # A server says what it decided at start-up (the stack, the ports): info, unlike one-shot commands.
    parser.set_defaults(default_log_level=logging.INFO)


def register_commands(commands: Subcommands) -> None:
    """The ``diffstack.commands`` entry point: adds ``diffstack serve``."""
    parser = commands.add_parser("serve", help="run the gRPC server", description=DESCRIPTION)
    add_serve_flags(parser)
    parser.set_defaults(command=_serve)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from diffstack_server.app import serve

    level = log_level(args)
    quiet_libraries(level)
    if settings.server.replicas:
        return _serve_replicas(settings, level)
    if settings.server.context_parallel > 1:
        from diffstack_server.parallel import serve_parallel

        return serve_parallel(settings, level)
    return serve(settings, level)


def _serve_replicas(settings: Settings, level: int) -> int:
    from diffstack.logs import configure_logging

    try:
        from diffstack_ray import run_replicas  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise SystemExit(
            "--replicas needs the diffstack-ray distribution (pip install -e ./serve-ray)"
        ) from None
    configure_logging(settings.server.log_format, level)
    result: int = run_replicas(settings)
    return result


def module_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m diffstack_server``: the serve flags, nothing else."""
    parser = argparse.ArgumentParser(prog=f"python -m {__package__}", description=DESCRIPTION)
    add_serve_flags(parser)
    return parser


def main_serve(argv: Sequence[str] | None = None) -> int:
    """``python -m diffstack_server [flags]``: parse the serve flags, load settings, serve."""
    args = module_parser().parse_args(argv)
    return _serve(args, settings_from_args(args))
