"""10,000 fuzzed requests, then a 10,000-request soak, against a real server process on loopback.

    .venv/bin/python tests/reliability/fuzz_soak.py [--fuzz 10000] [--soak 10000] [--clients 8]
        [--out results.json]

Starts ``python -m diffstack_server`` (the real server: its own process, the real engine, baseline
plugins, the tiny SD1 model saved to a temporary models directory, tight request limits so that a
valid request costs little on a CPU), waits for health SERVING, then:

1. fuzz: ``--fuzz`` calls drawn by the strategies of ``fuzzing.py`` (every request field, damaged and
   raw bytes, hostile model names), ``--clients`` at a time; every status code is counted, and each
   INTERNAL/UNKNOWN is kept with its request.
2. soak: ``--soak`` valid generations (unary and streamed with previews, batched and not, prompts of
   every length the limits allow), ``--clients`` at a time; codes counted, throughput, and the
   server's RSS sampled every 1,000 requests.

Then it checks health again, sends SIGTERM and records the exit status. RSS is the server process's
(``/proc/<pid>/status``). Prints a summary and writes every figure as JSON (``--out``); RELIABILITY.md
records them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
import fuzzing

from diffstack.testing import save_tiny_model
from diffstack.types import Family
from diffstack_client import DiffstackClient
from diffstack_client.v1 import generation_pb2, types_pb2

CARD = {"weights": "random", "default_width": 16, "default_height": 16, "default_steps": 1}
CONFIG = """
[engine]
models_dir = "{models}"
default_model = "tiny-sd1"

[plugins]
allow = ["sdpa", "schedules", "plain_encoder", "eager"]

[limits]
max_pixels = 1024
max_steps = 2
max_images = 2

[server]
host = "127.0.0.1"
port = {port}
queue_size = {queue}
max_batch = 4
batch_size = 4
batch_measure_steps = 1
admin_token = "{token}"
batch_wait_ms = 2
preview_interval_s = 0.0
log_format = "json"
"""
PER_EXAMPLE = 25
WORDS = [
    "a",
    "small",
    "large",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "triangle",
    "at",
    "the",
    "top",
    "left",
    "right",
    "on",
    "white",
    "background",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(root: Path, queue: int) -> tuple[subprocess.Popen[bytes], str]:
    save_tiny_model(Family.SD1, root / "models" / "tiny-sd1", metadata=CARD)
    port = _free_port()
    config = root / "diffstack.toml"
    config.write_text(
        CONFIG.format(models=root / "models", port=port, queue=queue, token=fuzzing.ADMIN_TOKEN)
    )
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "diffstack_server", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    target = f"127.0.0.1:{port}"
    with DiffstackClient(target, timeout=10) as client:
        client.wait_until_serving(timeout=600)
    return process, target


def fuzz(channel: grpc.Channel, total: int, clients: int, random_seed: int) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    forbidden: list[dict[str, Any]] = []
    started = time.perf_counter()

    @seed(random_seed)
    @settings(
        max_examples=max(1, total // PER_EXAMPLE),
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(fuzzing.calls(), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def run(batch: list[fuzzing.Call]) -> None:
        for call, code in fuzzing.send_all(channel, batch, clients):
            codes[code] += 1
            if code in fuzzing.FORBIDDEN:
                forbidden.append(
                    {"method": call.method, "code": code, "payload_hex": call.payload[:512].hex()}
                )

    run()
    return {
        "requests": sum(codes.values()),
        "codes": dict(codes.most_common()),
        "forbidden": forbidden,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _soak_call(index: int) -> fuzzing.Call:
    """A valid request of one of a few shapes (sizes, steps, images, streamed with previews); one in ten
    with a deadline too short to finish, so the soak holds cancellations too."""
    words = " ".join(WORDS[(index + i) % len(WORDS)] for i in range(1 + index % 12))
    side = (16, 24, 32)[index % 3]
    spec = types_pb2.GenerationSpec(
        prompt=words, width=side, height=side, steps=1 + index % 2, num_images=1 + index % 2, seeds=[index]
    )
    deadline = 0.02 if index % 10 == 5 else 120.0  # gives up early: cancelled in the queue or mid-run
    if index % 4 == 0:
        payload = generation_pb2.GenerateStreamRequest(
            spec=spec, previews=generation_pb2.PreviewOptions(enabled=True, max_side=32)
        ).SerializeToString()
        return fuzzing.Call(fuzzing.GENERATE_STREAM, payload, deadline)
    return fuzzing.Call(
        fuzzing.GENERATE, generation_pb2.GenerateRequest(spec=spec).SerializeToString(), deadline
    )


def soak(channel: grpc.Channel, pid: int, total: int, clients: int) -> dict[str, Any]:
    codes: Counter[str] = Counter()
    rss = [fuzzing.rss_bytes(pid)]
    started = time.perf_counter()
    for first in range(0, total, 1000):
        batch = [_soak_call(i) for i in range(first, min(total, first + 1000))]
        codes.update(code for _, code in fuzzing.send_all(channel, batch, clients))
        rss.append(fuzzing.rss_bytes(pid))
    seconds = time.perf_counter() - started
    return {
        "requests": sum(codes.values()),
        "codes": dict(codes.most_common()),
        "clients": clients,
        "seconds": round(seconds, 1),
        "requests_per_s": round(total / seconds, 2),
        "rss_mib_every_1000": [round(r / 2**20, 1) for r in rss],
    }


def _internal_errors(lines: list[str]) -> dict[str, int]:
    """The last line of each INTERNAL error's traceback in the server's JSON log, counted."""
    errors: Counter[str] = Counter()
    for line in lines:
        if '"internal_error"' in line:
            record = json.loads(line)
            errors[(record.get("exception") or "?").strip().splitlines()[-1][:300]] += 1
    return dict(errors.most_common())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=10_000)
    parser.add_argument("--soak", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        process, target = start_server(root, args.queue)
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": os.cpu_count(),
        }
        try:
            result["rss_mib_ready"] = round(fuzzing.rss_bytes(process.pid) / 2**20, 1)
            with grpc.insecure_channel(target) as channel, DiffstackClient(target, timeout=60) as client:
                result["fuzz"] = fuzz(channel, args.fuzz, args.clients, args.seed)
                result["health_after_fuzz"] = client.health()
                result["rss_mib_after_fuzz"] = round(fuzzing.rss_bytes(process.pid) / 2**20, 1)
                result["soak"] = soak(channel, process.pid, args.soak, args.clients)
                result["health_after_soak"] = client.health()
                result["alive"] = process.poll() is None
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                result["exit_status"] = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                result["exit_status"] = "killed after 60 s"
            lines = (root / "server.log").read_text(errors="replace").splitlines()
            result["server_log_lines"] = len(lines)
            result["server_log_non_json"] = [line for line in lines if not line.startswith("{")][:20]
            result["internal_errors"] = _internal_errors(lines)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    forbidden = result.get("fuzz", {}).get("forbidden", [])
    return 1 if forbidden or result.get("exit_status") != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
