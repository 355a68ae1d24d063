"""The process group of a context-parallel server: its rendezvous, its control channel, its heartbeats.

One ``torch.distributed.TCPStore``, hosted by rank 0, carries three things beside the collectives'
rendezvous: the device work rank 0 publishes for the others to follow (``op/N``, in order), each
follower's word that it finished op N (``done/N/RANK``), and every rank's heartbeat (``beat/RANK``).
The store is used for these rather than a collective because a follower may wait idle for hours
between requests, longer than any collective's timeout should be, while a collective that waits
that long is a failure. Nothing here blocks without a bound: every wait has a timeout and says which
rank it waited for.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
import torch.distributed as dist

log = structlog.get_logger("diffstack.server.group")

GROUP_ENVIRONMENT = {
    # NVLink SHARP multicast hangs or fails on the lent H200 machines; PyTorch and NVSHMEM must not try it.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
"""Set in every process of a group before torch initialises NCCL."""

HEARTBEAT_S = 1.0


class GroupFailed(RuntimeError):
    """A rank died, fell silent or failed an op: the group can no longer run a step together."""


@dataclass(frozen=True)
class GroupAddress:
    """Where rank 0 hosts the store: every rank's way into the group."""

    host: str
    port: int
    world: int


@dataclass(frozen=True)
class Op:
    """One piece of device work rank 0 publishes: ``kind`` is an engine method, ``args`` its arguments."""

    kind: str
    args: tuple[Any, ...] = ()


class Group:
    """This process's membership: its rank, the store, the control channel and the heartbeats."""

    def __init__(self, address: GroupAddress, rank: int, *, timeout_s: float, silent_s: float) -> None:
        self.address = address
        self.rank = rank
        self.timeout_s = timeout_s
        self.silent_s = silent_s
        self.store = self._connect(is_master=rank == 0)
        self._published = 0
        self._followed = 0
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    @property
    def world(self) -> int:
        return self.address.world

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _connect(self, *, is_master: bool) -> dist.TCPStore:
        return dist.TCPStore(
            self.address.host,
            self.address.port,
            self.address.world,
            is_master=is_master,
            timeout=timedelta(seconds=self.timeout_s),
            wait_for_workers=False,
        )

    def init_process_group(self, backend: str) -> None:
        """Join the collectives' group (NCCL on GPUs, gloo on CPUs) over the same store."""
        for name, value in GROUP_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        dist.init_process_group(
            backend,
            store=dist.PrefixStore("collectives", self.store),
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=self.timeout_s),
        )

    # -- heartbeats ------------------------------------------------------------------------------

    def start_heartbeats(self, on_silence: Callable[[str], None]) -> None:
        """Beat every second; call ``on_silence(reason)`` once when a rank this one watches (the
        leader watches every follower, a follower the leader) falls silent or its store is gone."""
        self._beats = threading.Thread(
            target=self._beat, args=(on_silence,), name=f"diffstack-heartbeat-{self.rank}", daemon=True
        )
        self._beats.start()

    def _beat(self, on_silence: Callable[[str], None]) -> None:
        store = self._connect(is_master=False)  # a client of its own: stores are not shared across threads
        watched = [r for r in range(self.world) if r != self.rank] if self.is_leader else [0]
        started = time.time()
        while not self._stop.is_set():
            try:
                store.set(f"beat/{self.rank}", str(time.time()))
                silent = [r for r in watched if _last_beat(store, r, started) < time.time() - self.silent_s]
            except Exception as exc:  # the store went with rank 0
                on_silence(f"the group's store is gone ({type(exc).__name__}: {exc})")
                return
            if silent:
                on_silence(f"rank {silent[0]} sent no heartbeat for {self.silent_s:.0f} s")
                return
            self._stop.wait(HEARTBEAT_S)

    def stop(self) -> None:
        self._stop.set()

    # -- the control channel -----------------------------------------------------------------------

    def publish(self, op: Op) -> int:
        """Rank 0: hand ``op`` to every follower; returns its number for :meth:`wait_done`."""
        self._published += 1
        self.store.set(f"op/{self._published}", pickle.dumps(op))  # type: ignore[arg-type]  # bytes work; stubs say str
        return self._published

    def wait_done(self, number: int) -> None:
        """Rank 0: wait (bounded) until every follower has finished op ``number``; GroupFailed if one
        failed it or did not finish in ``timeout_s``."""
        keys = [f"done/{number}/{r}" for r in range(1, self.world)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout_s))
        except Exception as exc:
            missing = [k.rsplit("/", 1)[1] for k in keys if not self.store.check([k])]
            raise GroupFailed(
                f"rank {', '.join(missing)} did not finish op {number} in {self.timeout_s:.0f} s"
            ) from exc
        for key in keys:
            answer = self.store.get(key).decode()
            self.store.delete_key(key)
            if answer != "ok":
                raise GroupFailed(f"rank {key.rsplit('/', 1)[1]} failed op {number}: {answer}")
        self.store.delete_key(f"op/{number}")

    def next_op(self, alive: Callable[[], bool]) -> Op:
        """A follower: the next op rank 0 published, waiting as long as ``alive()`` says the group
        lives (a blocking read, woken at once by the op or by rank 0's store going away)."""
        self._followed += 1
        key = f"op/{self._followed}"
        while True:
            if not alive():
                raise GroupFailed("the group failed while this rank waited for work")
            try:
                payload = self.store.get(key)
                break
            except dist.DistStoreError as exc:
                if "timeout" not in str(exc).lower():
                    raise GroupFailed(f"the group's store failed: {exc}") from exc
            except (RuntimeError, ConnectionError) as exc:
                raise GroupFailed(f"the group's store is gone: {exc}") from exc
        op = pickle.loads(payload)
        if not isinstance(op, Op):
            raise GroupFailed(f"op {self._followed} is {type(op).__name__}, not an Op")
        return op

    def done(self, answer: str = "ok") -> None:
        """A follower: report the op it last took as finished (``ok``) or failed (the reason)."""
        self.store.set(f"done/{self._followed}/{self.rank}", answer)


def _last_beat(store: dist.TCPStore, rank: int, since: float) -> float:
    """When ``rank`` last beat (a rank that has not beaten yet counts from ``since``)."""
    key = f"beat/{rank}"
    return float(store.get(key).decode()) if store.check([key]) else since
