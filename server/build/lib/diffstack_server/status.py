"""``diffstack status --target HOST:PORT``: a running server's health, stack and statistics.

The server distribution adds this command to the core's command line through the
``diffstack.commands`` entry point, for the hosts where grpcurl cannot be installed. It asks through
the Python client, as any other program would.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from diffstack.cli import Subcommands, stack_summary
from diffstack_client import DiffstackClient, ServiceError
from diffstack_client._common import DEFAULT_TARGET


def register_commands(commands: Subcommands) -> None:
    """The ``diffstack.commands`` entry point: adds ``diffstack status``."""
    status = commands.add_parser(
        "status",
        help="show a running server's health, stack and statistics",
        description="Ask a running diffstack server for its health, its stack and its statistics.",
    )
    status.add_argument("--target", default=DEFAULT_TARGET, help=f"HOST:PORT (default: {DEFAULT_TARGET})")
    status.add_argument("--admin-token", help="the server's admin token, if it has one")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds per call (default: 5)")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(command=run_status)


def run_status(args: argparse.Namespace, _settings: object = None) -> int:
    """Print the server's status; 0 when it is SERVING, 1 when it is not or cannot be reached."""
    with DiffstackClient(args.target, admin_token=args.admin_token, timeout=args.timeout) as client:
        try:
            health = client.health()
            if health != "SERVING":
                print(f"{args.target}: {health}", file=sys.stderr)
                return 1
            stack = client.stack()
            stats = client.stats()
        except ServiceError as error:
            print(f"error: {args.target}: {error}", file=sys.stderr)
            return 1
    if args.json:
        numbers = {
            "queue_depth": stats.queue_depth,
            "in_flight": stats.in_flight,
            "requests_served": stats.requests_served,
            "requests_failed": stats.requests_failed,
            "images_served": stats.images_served,
            "uptime_s": stats.uptime_s,
            "latency_s": {"p50": stats.latency.p50, "p90": stats.latency.p90, "p99": stats.latency.p99},
        }
        print(json.dumps({"target": args.target, "health": health, "stack": asdict(stack), "stats": numbers}))
        return 0
    latency = stats.latency
    print(f"{args.target}: {health}, up {stats.uptime_s:.0f} s")
    print(f"model {stack.model} ({stack.family}, {stack.device}, {stack.dtype})")
    print(f"stack: {stack_summary(stack.summary())}")
    print(
        f"queue {stats.queue_depth}, in flight {stats.in_flight}; served {stats.requests_served} requests "
        f"({stats.images_served} images), {stats.requests_failed} failed"
    )
    if latency.count:
        print(f"latency p50 {latency.p50:.2f} s, p90 {latency.p90:.2f} s, p99 {latency.p99:.2f} s")
    return 0
