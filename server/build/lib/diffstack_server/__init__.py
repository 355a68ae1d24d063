"""diffstack's gRPC service: generation with dynamic batching, diagnostics, health and metrics.

``create_server(settings, engine=None)`` builds a server for the CLI, tests and benchmarks alike;
``serve(settings)`` runs one until SIGTERM/SIGINT and drains it; ``main_serve(argv)`` is
``python -m diffstack_server``, the same command as ``diffstack serve`` (see :mod:`diffstack_server.cli`).
"""

from diffstack_server.app import DiffstackServer, create_server, serve, serve_async
from diffstack_server.background import BackgroundServer
from diffstack_server.cli import main_serve

__all__ = ["BackgroundServer", "DiffstackServer", "create_server", "main_serve", "serve", "serve_async"]
