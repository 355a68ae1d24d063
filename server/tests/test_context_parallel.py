"""``diffstack serve --context-parallel 2`` on the CPU: two gloo ranks of a tiny FLUX.

The group's control channel on its own (ops in order, a follower's failure or silence reported, never
waited on forever), then the real server: rank 0 serves, rank 1 follows each batch in lockstep, the
image is the one a single process makes for the same seed, and a killed rank turns health NOT_SERVING
and requests UNAVAILABLE within the heartbeat timeout, with no hang.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from diffstack.testing import save_tiny_model
from diffstack.types import Family
from diffstack_client import DiffstackClient, ServiceError
from diffstack_server.group import Group, GroupAddress, GroupFailed, Op

WAIT_S = 120.0  # two ranks each import torch and diffusers, load and compose on two shared cores
HEARTBEAT_S = 3.0
PROMPT, SEED, STEPS = "a red circle on a blue square", 7, 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -------------------------------------------------------------------------------------------------
# The control channel
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[Group, Group]]:
    address = GroupAddress("127.0.0.1", free_port(), 2)
    leader = Group(address, 0, timeout_s=2.0, silent_s=HEARTBEAT_S)
    follower = Group(address, 1, timeout_s=2.0, silent_s=HEARTBEAT_S)
    yield leader, follower
    leader.stop()
    follower.stop()


def test_a_follower_takes_the_ops_in_order_and_reports_each(pair: tuple[Group, Group]) -> None:
    leader, follower = pair
    first = leader.publish(Op("load", ("tiny",)))
    second = leader.publish(Op("run", (("request",),)))
    assert follower.next_op(lambda: True) == Op("load", ("tiny",))
    follower.done()
    leader.wait_done(first)
    assert follower.next_op(lambda: True) == Op("run", (("request",),))
    follower.done("RuntimeError: out of luck")
    with pytest.raises(GroupFailed, match=r"rank 1 failed op 2: RuntimeError: out of luck"):
        leader.wait_done(second)


def test_a_follower_that_never_answers_fails_the_op_after_the_timeout(pair: tuple[Group, Group]) -> None:
    leader, _ = pair
    number = leader.publish(Op("free_memory"))
    began = time.monotonic()
    with pytest.raises(GroupFailed, match=r"rank 1 did not finish op 1 in 2 s"):
        leader.wait_done(number)
    assert time.monotonic() - began < 10


def test_a_silent_rank_is_reported_once(pair: tuple[Group, Group]) -> None:
    leader, _ = pair  # the follower never beats
    reasons: queue.Queue[str] = queue.Queue()
    leader.start_heartbeats(reasons.put)
    assert "rank 1 sent no heartbeat" in reasons.get(timeout=HEARTBEAT_S + 10)


def test_a_follower_stops_waiting_when_the_group_fails(pair: tuple[Group, Group]) -> None:
    _, follower = pair
    with pytest.raises(GroupFailed, match="the group failed"):
        follower.next_op(lambda: False)


# -------------------------------------------------------------------------------------------------
# The server
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cp-models")
    card = {"weights": "random", "default_width": 64, "default_height": 64, "default_steps": STEPS}
    save_tiny_model(Family.FLUX, folder / "tiny-flux", metadata=card)
    return folder


def config(
    folder: Path, models: Path, plugins: list[str], context_parallel: int, measure: str = "auto"
) -> Path:
    path = folder / f"server-{context_parallel}.toml"
    path.write_text(
        f"""
[engine]
models_dir = "{models}"
default_model = "tiny-flux"
device = "cpu"

[plugins]
allow = {json.dumps(plugins)}

[plugins.options.context_parallel]
allow_cpu = true

[compose]
decisions_dir = "{folder / "decisions"}"
measure = "{measure}"

[server]
port = 0
metrics = false
log_format = "json"
batch_size = 1
grace_seconds = 2.0
context_parallel = {context_parallel}
collective_timeout_s = 30
rank_heartbeat_timeout_s = {HEARTBEAT_S}
"""
    )
    return path


class Server:
    """A server process and the JSON lines its ranks log."""

    def __init__(self, path: Path) -> None:
        environment = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "diffstack_server", "--config", str(path)]
        self.child = subprocess.Popen(
            command, env=environment, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """Two ranks write to one pipe: a line may hold two JSON objects, or a stray warning."""
        assert self.child.stdout is not None
        for line in self.child.stdout:
            for piece in re.split(r"(?<=\})(?=\{)", line.strip()):
                try:
                    self.lines.put(json.loads(piece))
                except ValueError:
                    continue

    def wait_for(self, event: str, **fields: object) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                entry = self.lines.get(timeout=1.0)
            except queue.Empty:
                assert self.child.poll() is None, f"the server exited: {self.seen[-5:]}"
                continue
            self.seen.append(entry)
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                return entry
        raise TimeoutError(f"no {event} {fields} within {WAIT_S} s: {self.seen[-5:]}")

    def stop(self) -> int:
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
        try:
            return self.child.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()
            raise


def generate(client: DiffstackClient) -> tuple[np.ndarray, dict[str, tuple[str, ...]]]:
    """The image's pixels and the stack that served it (a fallback to the reference stack shows)."""
    result = client.generate(PROMPT, seed=SEED, steps=STEPS)
    image = np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.int16)
    return image, result.stack


@pytest.mark.slow
def test_two_cpu_ranks_serve_the_one_process_image_and_a_killed_rank_turns_not_serving(
    flux_models: Path, tmp_path: Path
) -> None:
    # No eager offer: the parallel denoiser is the stack's only way to execute, so it runs.
    plugins = ["sdpa", "schedules", "plain_encoder", "context_parallel"]
    single = Server(config(tmp_path, flux_models, plugins, 0))
    try:
        port = single.wait_for("listening")["port"]
        single.wait_for("serving")
        with DiffstackClient(f"127.0.0.1:{port}", timeout=WAIT_S) as client:
            alone, _ = generate(client)
            assert client.stack().summary()["compile_model"] == ()  # the offers declined: one process
    finally:
        assert single.stop() == 0

    group = Server(config(tmp_path, flux_models, plugins, 2))
    try:
        ranks = {e["rank"]: e["pid"] for e in (group.wait_for("rank_joined") for _ in range(2))}
        port = group.wait_for("listening")["port"]
        group.wait_for("serving")
        with DiffstackClient(f"127.0.0.1:{port}", timeout=WAIT_S) as client:
            stack = client.stack()
            assert stack.summary()["compile_model"] == ("context_parallel_ulysses",)
            together, served_by = generate(client)
            assert served_by["compile_model"] == ("context_parallel_ulysses",), served_by  # no fallback
            assert np.abs(together - alone).max() <= 1  # the same image, to a rounding of 8 bits

            os.kill(ranks[1], signal.SIGKILL)
            deadline = time.monotonic() + HEARTBEAT_S + 20
            while client.health() == "SERVING":
                assert time.monotonic() < deadline, "still SERVING after rank 1 died"
                time.sleep(0.2)
            assert client.health() == "NOT_SERVING"
            began = time.monotonic()
            with pytest.raises(ServiceError) as refused:
                client.generate(PROMPT, seed=SEED + 1, steps=STEPS)
            assert refused.value.code is grpc.StatusCode.UNAVAILABLE
            assert "rank 1" in refused.value.message
            assert time.monotonic() - began < 5  # refused at once, not after a collective's timeout
    finally:
        assert group.stop() == 0


@pytest.mark.slow
def test_the_ranks_measure_again_together_when_one_of_them_lost_its_kept_decision(
    flux_models: Path, tmp_path: Path
) -> None:
    # Measured (so kept) on a CPU too; each rank keeps its decision in its own folder.
    path = config(
        tmp_path, flux_models, ["sdpa", "schedules", "plain_encoder", "context_parallel"], 2, "always"
    )
    first = Server(path)
    try:
        first.wait_for("serving")
    finally:
        assert first.stop() == 0
    kept = tmp_path / "decisions"
    assert any((kept / "rank0").iterdir()) and any((kept / "rank1").iterdir())
    shutil.rmtree(kept / "rank1")  # rank 0 alone would restore while rank 1 measures: a deadlock

    second = Server(path)
    try:
        port = second.wait_for("listening")["port"]
        second.wait_for("serving")
        with DiffstackClient(f"127.0.0.1:{port}", timeout=WAIT_S) as client:
            stack = client.stack()
            assert not stack.restored  # both ranks measured again
            assert stack.summary()["compile_model"] == ("context_parallel_ulysses",)
            _, served_by = generate(client)
            assert served_by["compile_model"] == ("context_parallel_ulysses",), served_by
    finally:
        assert second.stop() == 0
    assert any((kept / "rank1").iterdir())  # and kept it again
