"""structlog set-up shared by the CLI and the server: JSON when not a terminal, always on stderr.

One stream, one format: records of the standard library's ``logging`` (what transformers, diffusers,
accelerate and grpc write) and ``warnings`` go through structlog's renderer too (its
``ProcessorFormatter``), so a JSON log stream holds nothing but JSON lines. transformers and
diffusers install a plain-text handler of their own and stop propagation when they are imported; the
libraries are far too slow to import here only to undo that (seconds, before the server's port could
open), so their root loggers are created first, of a class that keeps records flowing to the root
handler. In JSON mode, progress bars are off (their carriage returns are not log lines).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Literal

import structlog

LIBRARY_LOGGERS = ("transformers", "diffusers", "accelerate", "huggingface_hub", "torch", "grpc")
"""Library root loggers whose records join the project's stream instead of printing their own."""
PROGRESS_BAR_SWITCHES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
"""Environment switches read when transformers/huggingface_hub and tqdm are imported (JSON mode)."""


def configure_logging(
    log_format: Literal["auto", "json", "console"] = "auto", level: int = logging.INFO
) -> None:
    """Route structlog and stdlib logging to stderr (stdout stays for command output) in one format."""
    as_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    shared: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Look sys.stderr up at each call, not once: it may be replaced later (test capture, daemons).
        logger_factory=lambda *_: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(renderer, shared, level)
    if as_json:
        _progress_bars_off()


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of each record."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _JoinedLibraryLogger(logging.Logger):
    """A library's root logger that ignores the library's own plain-text stream handler and its
    attempt to stop propagation, so its records reach the root handler like everyone else's."""

    @property
    def propagate(self) -> bool:
        return True

    @propagate.setter
    def propagate(self, _value: bool) -> None:
        pass

    def addHandler(self, hdlr: logging.Handler) -> None:
        if type(hdlr) is not logging.StreamHandler:
            super().addHandler(hdlr)


def _route_standard_logging(
    renderer: structlog.types.Processor, shared: list[structlog.types.Processor], level: int
) -> None:
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(previous)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        _join(name)


def _join(name: str) -> None:
    """Make the library root logger ``name`` propagate to the root handler, now and after its import."""
    existing = logging.Logger.manager.loggerDict.get(name)
    if isinstance(existing, logging.Logger):  # the library is imported already: undo its set-up
        for own in [h for h in existing.handlers if type(h) is logging.StreamHandler]:
            existing.removeHandler(own)
        existing.propagate = True
        return
    previous = logging.getLoggerClass()
    logging.setLoggerClass(_JoinedLibraryLogger)
    try:
        logging.getLogger(name)
    finally:
        logging.setLoggerClass(previous)


def _progress_bars_off() -> None:
    for key, value in PROGRESS_BAR_SWITCHES.items():
        os.environ.setdefault(key, value)
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):
        imported = sys.modules.get(module)
        if imported is not None:
            imported.disable_progress_bar()
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        hub.disable_progress_bars()
