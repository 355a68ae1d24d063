"""Beyond one GPU (issue 13): FLUX.1 split across the GPUs of one host, and SD1.5 as Ray Serve replicas.

``cp-flux`` (2 GPUs, about 4 minutes):

1. ``steps``: torchrun starts one process per GPU (``python -m torch.distributed.run --standalone
   --nproc_per_node 2 bench/cp_steps.py``): FLUX.1 1024² batch 1 bf16 step time on one GPU, Ulysses-2
   and ring-2, eager, with each one's drift from the one-GPU output.
2. ``grpc``: ``python -m diffstack_server --config ...`` with ``server.context_parallel = 2`` (the
   server spawns its own two ranks): the composed stack, whose ``compile_model`` slot measures one GPU
   eager against Ulysses-2 compiled at batch 1, and a 20-step 1024² image through gRPC.

``replicas-sd15``: SD1.5 behind Ray Serve (``server.replicas``) with 1 and then 2 replicas, 32 clients
in closed loops; needs ``ray[serve]`` (see bench/join_wheels.sh), else the stage says so and skips.

Every process started here inherits NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1. ``--smoke`` runs both on the CPU (gloo ranks, tiny models).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.e2e import PROMPT, save_model
from bench.harness import Run, log, release_memory
from bench.serving import ServerProcess, free_port

GROUP_ENVIRONMENT = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
GPUS = 2
IMAGE_STEPS = 20
REPLICA_CLIENTS = 32


def group_environment() -> dict[str, str]:
    """This process's environment with the multi-GPU settings every launched process must have."""
    os.environ.update(GROUP_ENVIRONMENT)
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


# -------------------------------------------------------------------------------------------------
# cp-flux
# -------------------------------------------------------------------------------------------------


def cp_flux_stage(run: Run) -> Callable[[dict[str, Any]], None]:
    def body(record: dict[str, Any]) -> None:
        record["workload"] = {"label": "FLUX.1 1024x1024 batch 1 bf16, random weights, 2 ranks"}
        record["launch"] = (
            "steps: python -m torch.distributed.run --standalone --nproc_per_node 2 bench/cp_steps.py; "
            "grpc: python -m diffstack_server --config X (server.context_parallel = 2 spawns the ranks)"
        )
        if not run.smoke:
            import torch

            if torch.cuda.device_count() < GPUS:
                record.update(
                    status="skipped", reason=f"needs {GPUS} GPUs, found {torch.cuda.device_count()}"
                )
                return
        rows: list[dict[str, Any]] = []
        record["rows"] = rows
        parts: dict[str, Any] = {}
        record["parts"] = parts
        run.part(parts, "steps", 60, lambda r: _cp_steps(run, r, rows))
        run.part(parts, "grpc", 150, lambda r: _cp_grpc(run, r, rows))
        log("[done] cp-flux: " + "; ".join(f"{row['variant']}" for row in rows))

    return body


def _cp_steps(run: Run, record: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    out = run.work / "cp-steps.json"
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={GPUS}",
        str(Path(__file__).with_name("cp_steps.py")),
        "--out",
        str(out),
        *(["--smoke"] if run.smoke else []),
    ]
    record["command"] = " ".join(command)
    limit = max(30.0, min(150.0, run.budget.left() - 160))
    try:
        finished = subprocess.run(
            command, env=group_environment(), capture_output=True, text=True, timeout=limit
        )
        record["exit_code"] = finished.returncode
        tail = finished.stdout[-1500:] + finished.stderr[-2500:]
    except subprocess.TimeoutExpired as exc:
        record["timed_out_s"] = limit
        tail = str(exc.stderr or "")[-2500:]
    if not out.exists():
        raise RuntimeError(f"cp_steps.py wrote nothing: {tail}")
    measured = json.loads(out.read_text())
    record["steps"] = measured
    if record.get("exit_code"):
        record["log_tail"] = tail
    for row in measured["rows"]:
        rows.append({**row, "variant": f"step: {row['variant']}"})


def _cp_grpc(run: Run, record: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from diffstack_client import DiffstackClient

    models = save_model(run, "flux").parent
    release_memory()  # the saved pipeline's GPU blocks go back before the ranks load it
    port = free_port()
    config = _cp_config(run, models, port)
    server = ServerProcess(config, run.work / "server-cp-flux.log")
    group_environment()
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        with DiffstackClient(target, timeout=60) as client:
            deadline = time.monotonic() + max(30.0, run.budget.left() - 25)
            _wait_serving(client, server, deadline)
            record["to_serving_s"] = time.perf_counter() - server.started
            stack = client.stack()
            record["stack"] = _compile_slot(stack)
            _stack_rows(record["stack"], rows)
            size = 64 if run.smoke else 1024
            steps = 4 if run.smoke else IMAGE_STEPS
            times = []
            for seed in range(3):
                began = time.perf_counter()
                client.generate(PROMPT, steps=steps, width=size, height=size, seed=seed, timeout=120)
                times.append(time.perf_counter() - began)
            record["image_s"] = times
            rows.append(
                {
                    "variant": f"2 GPUs, {steps}-step {size}² image through gRPC (context-parallel server)",
                    "s": statistics.median(times[1:]),
                    "notes": f"first {times[0]:.2f} s; start to SERVING {record['to_serving_s']:.0f} s",
                }
            )
    finally:
        record["stop"] = server.stop(timeout=30)
        record["log_tail"] = server.tail(4000)


def _cp_config(run: Run, models: Path, port: int) -> Path:
    cpu = '\ndevice = "cpu"' if run.smoke else ""
    options = "allow_cpu = true" if run.smoke else 'compile = true\nmodes = "ulysses"'
    text = f"""# written by bench/multigpu.py: FLUX.1 split over {GPUS} GPUs
[engine]
models_dir = "{models}"
default_model = "flux"{cpu}

[plugins]
allow = ["sdpa", "schedules", "plain_encoder", "eager", "context_parallel"]

[plugins.options.context_parallel]
{options}

[compose]
batch = 1
decisions_dir = "{run.work / "cp-decisions"}"
measure = "always"

[server]
host = "127.0.0.1"
port = {port}
metrics = false
log_format = "json"
batch_size = 1
warm_batches = false
grace_seconds = 5.0
context_parallel = {GPUS}
collective_timeout_s = 300
"""
    path = run.work / "server-cp-flux.toml"
    path.write_text(text)
    return path


def _wait_serving(client: Any, server: ServerProcess, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"the server exited while starting: {server.tail()}")
        try:
            client.wait_until_serving(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            return
        except Exception:
            continue
    raise TimeoutError(f"not SERVING within the budget: {server.tail()}")


def _compile_slot(stack: Any) -> dict[str, Any]:
    import dataclasses

    for slot in dataclasses.asdict(stack).get("slots", []):
        if slot.get("slot") == "compile_model":
            return {"chosen": slot.get("chosen", []), "candidates": slot.get("candidates", [])}
    return {}


def _stack_rows(slot: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The server's own measurements: each compile_model candidate's step at batch 1."""
    chosen = slot.get("chosen", [])
    for candidate in slot.get("candidates", []):
        if candidate.get("time_ms") is None:
            continue
        name = str(candidate.get("offer"))
        if name in chosen and name.startswith("context_parallel"):
            label = f"2 GPUs, composed stack ({name})"
        elif name in chosen:
            label = f"server compose chose {name} (one GPU; context parallelism lost or failed)"
        else:
            label = f"server compose: {name}"
        rows.append(
            {
                "variant": label,
                "ms": candidate["time_ms"],
                "drift": candidate.get("numeric_error"),
                "compile_s": candidate.get("setup_s"),
                "notes": "; ".join(candidate.get("notes") or []) or candidate.get("reason") or "",
            }
        )


# -------------------------------------------------------------------------------------------------
# replicas-sd15
# -------------------------------------------------------------------------------------------------


def replicas_stage(run: Run) -> Callable[[dict[str, Any]], None]:
    def body(record: dict[str, Any]) -> None:
        record["workload"] = {
            "label": f"SD1.5 512², {4 if run.smoke else 20} steps, eager stack, Ray Serve replicas, "
            f"{REPLICA_CLIENTS} clients in closed loops"
        }
        try:
            import diffstack_ray  # noqa: F401  (brings ray[serve])
        except ImportError as exc:
            record.update(
                status="skipped", reason=f"ray[serve] is not installed ({exc}): bench/join_wheels.sh"
            )
            return
        rows: list[dict[str, Any]] = []
        record["rows"] = rows
        parts: dict[str, Any] = {}
        record["parts"] = parts
        models = save_model(run, "sd15").parent
        release_memory()  # the replicas need the GPUs this process built the model on
        for replicas in (1, 2):
            run.part(parts, f"replicas_{replicas}", 50, lambda r, n=replicas: _replicas(run, models, n, r))
        speeds = {n: parts[f"replicas_{n}"].get("images_per_s") for n in (1, 2)}
        for n, speed in speeds.items():
            if speed:
                rows.append({"variant": f"{n} replica(s), {REPLICA_CLIENTS} clients", "images_per_s": speed})
        if speeds[1] and speeds[2]:
            rows.append({"variant": "2 replicas vs 1", "x": speeds[2] / speeds[1]})

    return body


def _replicas(run: Run, models: Path, replicas: int, record: dict[str, Any]) -> None:
    from diffstack_client import DiffstackClient

    port = free_port()
    config = run.work / f"server-replicas-{replicas}.toml"
    cpu = '\ndevice = "cpu"' if run.smoke else ""
    config.write_text(
        f"""# written by bench/multigpu.py: SD1.5 as {replicas} Ray Serve replica(s)
[engine]
models_dir = "{models}"
default_model = "sd15"{cpu}

[plugins]
deny = ["torch_compile"]

[compose]
decisions_dir = "{run.work / "replica-decisions"}"

[server]
port = {port}
metrics = false
log_format = "json"
batch_size = 8
replicas = {replicas}
"""
    )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    server = ServerProcess(config, run.work / f"server-replicas-{replicas}.log")
    group_environment()
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        with DiffstackClient(target, timeout=60) as client:
            _wait_serving(client, server, time.monotonic() + max(30.0, run.budget.left() - 30))
        record["to_serving_s"] = time.perf_counter() - server.started
        steps = 4 if run.smoke else 20
        seconds = 6.0 if run.smoke else 20.0
        _closed_loop(target, steps, min(seconds, 3.0), 0)  # warm: every replica sees the batched shapes
        images, elapsed, latencies = _closed_loop(target, steps, seconds, 100_000)
        record.update(images=images, seconds=elapsed, images_per_s=images / elapsed)
        record["latency_p50_s"] = statistics.median(latencies) if latencies else None
    finally:
        record["stop"] = server.stop(timeout=30)
        record["log_tail"] = server.tail(3000)


def _closed_loop(target: str, steps: int, seconds: float, seed_base: int) -> tuple[int, float, list[float]]:
    """``REPLICA_CLIENTS`` clients, each asking again as soon as answered, for ``seconds``."""
    from diffstack_client import DiffstackClient

    barrier = threading.Barrier(REPLICA_CLIENTS)
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at: list[float] = []

    def client_loop(index: int) -> int:
        images = 0
        with DiffstackClient(target, timeout=120) as client:
            barrier.wait(60)
            if not stop_at:
                stop_at.append(time.perf_counter() + seconds)
            i = 0
            while time.perf_counter() < stop_at[0]:
                began = time.perf_counter()
                result = client.generate(PROMPT, steps=steps, seed=seed_base + index * 1000 + i)
                with lock:
                    latencies.append(time.perf_counter() - began)
                images += len(result.images)
                i += 1
        return images

    began = time.perf_counter()
    with ThreadPoolExecutor(REPLICA_CLIENTS) as pool:
        images = sum(pool.map(client_loop, range(REPLICA_CLIENTS)))
    return images, time.perf_counter() - began, latencies
