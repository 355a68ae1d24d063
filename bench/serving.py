"""Through the gRPC server on loopback: cold start to SERVING, latency, throughput with dynamic
batching, and a restart with the compile cache and the kept stack decision warm.

The server runs as its own process (``python -m diffstack_server --config ...``), started the way an
operator starts it, so start-up times include imports, loading, composition and compilation, and a
restart is a real new process that has only the on-disk caches. The cold start gets an empty compile
cache folder of its own (the stack decisions are kept inside it, so they start empty too), whatever
earlier stages compiled. The server measures its batch size at start (``server.batch_size = 0``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.e2e import PROMPT, save_model, steps_for
from bench.harness import Run, log
from bench.models import workload

CLIENTS = 8
ESTIMATES = {
    "save": 25,
    "cold_start": 120,
    "loopback": 15,
    "throughput": 110,
    "stop": 15,
    "restart": 60,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One server process with its log file."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.started = time.perf_counter()
        with self.log_path.open("ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "diffstack_server", "--config", str(self.config)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float) -> dict[str, Any]:
        """SIGTERM (drain), then wait; SIGKILL if it does not exit in time."""
        if self.process is None:
            return {}
        began = time.perf_counter()
        result: dict[str, Any] = {}
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                result["killed"] = True
        result.update(exit_code=self.process.returncode, stop_s=time.perf_counter() - began)
        self.process = None
        return result

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Serving:
    def __init__(self, run: Run, key: str, smoke_compile: bool) -> None:
        self.run = run
        self.key = key
        self.workload = workload(key, run.smoke)
        self.steps = steps_for(run)
        self.compile_ok = not run.smoke or smoke_compile
        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.rows: list[dict[str, Any]] = []
        self.server: ServerProcess | None = None
        self.models_dir: Path | None = None
        self.cache = run.work / "server-compile-cache"
        self.logs: list[Path] = []

    def request_kwargs(self, seed: int) -> dict[str, Any]:
        w = self.workload
        return {"steps": self.steps, "width": w.width, "height": w.height, "seed": seed}

    def timeout(self) -> float:
        return max(20.0, self.run.budget.left() - 10)

    def save(self, record: dict[str, Any]) -> None:
        self.models_dir = save_model(self.run, self.key).parent
        record["models_dir"] = str(self.models_dir)

    def _config(self) -> Path:
        assert self.models_dir is not None
        deny = '\ndeny = ["torch_compile"]' if not self.compile_ok else ""
        allow_cpu = "\nallow_cpu = true" if self.run.smoke and self.compile_ok else ""
        text = f"""# written by bench/serving.py
[engine]
models_dir = "{self.models_dir}"
default_model = "{self.key}"

[plugins]{deny}

[plugins.options.torch_compile]
cache_dir = "{self.cache}"{allow_cpu}

[compose]
decisions_dir = "{self.cache / "decisions"}"

[server]
host = "127.0.0.1"
port = {self.port}
metrics_port = {self.metrics_port}
queue_size = 64
log_format = "json"
grace_seconds = 10.0
# No client here enables a wrapper: DeepCache's compile (77 s cold on an H200) stays off the clock.
warm_wrappers = false
"""
        path = self.run.work / f"server-{self.key}{'' if self.compile_ok else '-eager'}.toml"
        path.write_text(text)
        return path

    def boot(self, record: dict[str, Any], name: str) -> None:
        """Start a server process; record seconds to the open port and to SERVING."""
        from diffstack_client import DiffstackClient, ServiceError

        suffix = "" if self.compile_ok else "-eager"
        log_path = self.run.work / f"server-{self.key}{suffix}-{name}.log"
        log_path.unlink(missing_ok=True)
        self.logs.append(log_path)
        self.server = ServerProcess(self._config(), log_path)
        self.server.start()
        deadline = time.monotonic() + self.timeout()
        with DiffstackClient(self.target, timeout=5) as client:
            while time.monotonic() < deadline:
                if not self.server.alive():
                    raise RuntimeError(f"the server exited early: {self.server.tail()}")
                try:
                    record["first_health_answer"] = client.health(timeout=2)
                    break
                except ServiceError:
                    time.sleep(0.05)
            record["port_open_s"] = time.perf_counter() - self.server.started
            while time.monotonic() < deadline:
                if not self.server.alive():
                    raise RuntimeError(f"the server exited while starting: {self.server.tail()}")
                try:
                    client.wait_until_serving(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                    break
                except TimeoutError:
                    continue
            else:
                raise TimeoutError(f"not SERVING within the budget: {self.server.tail()}")
            record["to_serving_s"] = time.perf_counter() - self.server.started
            stack = client.stack()
            record["stack"] = _stack_summary(stack)
            record["stack_restored"] = stack.restored
            record["startup"] = startup_phases(client)

    def wait_warmed(self, record: dict[str, Any]) -> None:
        """Wait until the server forms its full batch size: the sizes it warms after SERVING are
        done (GetStats ``batch_size`` reaches ``startup_batch_size``), so a measurement that follows
        runs at the chosen size, not beside the warm-ups. Records how long that took."""
        from diffstack_client import DiffstackClient

        began = time.perf_counter()
        deadline = time.monotonic() + min(120.0, self.timeout())
        with DiffstackClient(self.target, timeout=10) as client:
            while time.monotonic() < deadline:
                engine = dict(client.stats().engine)
                if engine.get("batch_size", 0) >= engine.get("startup_batch_size", 0):
                    break
                time.sleep(0.2)
            record["warmed_after_serving_s"] = round(time.perf_counter() - began, 2)
            record["batch_size"] = engine.get("batch_size")
            record["startup_after_warming"] = startup_phases(client)

    def cold_start(self, record: dict[str, Any]) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)
        record["compile_cache"] = f"{self.cache} (emptied first)"
        self.boot(record, "cold")
        self.rows.append(
            {
                "variant": "cold start to SERVING (empty compile cache)",
                "kind": "start",
                "s": record["to_serving_s"],
                "notes": f"port open after {record['port_open_s']:.1f} s; phases "
                + _phases_note(record["startup"]),
            }
        )

    def loopback(self, record: dict[str, Any]) -> None:
        from diffstack_client import DiffstackClient

        latencies: list[float] = []
        server_timings: list[dict[str, float]] = []
        with DiffstackClient(self.target, timeout=self.timeout()) as client:
            began = time.perf_counter()
            client.generate(PROMPT, **self.request_kwargs(0))
            record["first_request_s"] = time.perf_counter() - began
            for seed in range(1, 6 if not self.run.smoke else 3):
                began = time.perf_counter()
                result = client.generate(PROMPT, **self.request_kwargs(seed))
                latencies.append(time.perf_counter() - began)
                server_timings.append(dict(result.timings))
        record["latencies_s"] = latencies
        record["server_timings"] = server_timings
        record["image_bytes"] = len(result.images[0].data)
        median = statistics.median(latencies)
        self.rows.append(
            {
                "variant": f"one request over gRPC loopback ({self.steps} steps, PNG)",
                "kind": "latency",
                "s": median,
                "min_s": min(latencies),
                "max_s": max(latencies),
                "n": len(latencies),
                "notes": f"first request after SERVING: {record['first_request_s']:.2f} s",
            }
        )

    def throughput(self, record: dict[str, Any]) -> None:
        """8 clients, each a closed loop of requests; the server batches what waits together."""
        from diffstack_client import DiffstackClient

        rounds = 2 if self.run.smoke else 12

        def burst(per_client: int, seed_base: int) -> tuple[float, list[float], int]:
            barrier = threading.Barrier(CLIENTS)
            latencies: list[float] = []
            lock = threading.Lock()

            def client_loop(index: int) -> int:
                images = 0
                with DiffstackClient(self.target, timeout=self.timeout()) as client:
                    barrier.wait(60)
                    for i in range(per_client):
                        began = time.perf_counter()
                        result = client.generate(PROMPT, **self.request_kwargs(seed_base + index * 100 + i))
                        with lock:
                            latencies.append(time.perf_counter() - began)
                        images += len(result.images)
                return images

            began = time.perf_counter()
            with ThreadPoolExecutor(CLIENTS) as pool:
                images = sum(pool.map(client_loop, range(CLIENTS)))
            return time.perf_counter() - began, latencies, images

        self.wait_warmed(record)
        with DiffstackClient(self.target, timeout=60) as client:
            before_warm = client.stats()
            warm_s, _, warm_images = burst(2, 10_000)
            after_warm = client.stats()
            record["warm_up"] = {
                "seconds": warm_s,
                "images": warm_images,
                "batches": after_warm.batches_run - before_warm.batches_run,
                "notes": "first batched round: includes compiling and graphing the batched shape",
            }
            seconds, latencies, images = burst(rounds, 20_000)
            after = client.stats()
            record["startup_after"] = startup_phases(client)
        batches = after.batches_run - after_warm.batches_run
        record.update(
            seconds=seconds,
            images=images,
            batches=batches,
            mean_images_per_batch=(images / batches) if batches else None,
            latency_p50_s=statistics.median(latencies),
            latency_max_s=max(latencies),
        )
        record["batch_histogram"] = _scrape_batch_metrics(self.metrics_port)
        self.rows.append(
            {
                "variant": f"throughput, {CLIENTS} concurrent clients, dynamic batching",
                "kind": "throughput",
                "images_per_s": images / seconds,
                "notes": f"{images} images in {seconds:.1f} s, batch size {record.get('batch_size')} "
                f"(warm {record.get('warmed_after_serving_s')} s after SERVING), "
                f"{record['mean_images_per_batch'] or 0:.1f} images/batch, "
                f"p50 latency {record['latency_p50_s']:.2f} s; first batched round {warm_s:.1f} s",
            }
        )

    def stop(self, record: dict[str, Any]) -> None:
        assert self.server is not None
        record.update(self.server.stop(timeout=30))

    def restart(self, record: dict[str, Any]) -> None:
        record["compile_cache"] = f"{self.cache} (kept from the cold start)"
        self.boot(record, "restart")
        from diffstack_client import DiffstackClient

        with DiffstackClient(self.target, timeout=self.timeout()) as client:
            began = time.perf_counter()
            client.generate(PROMPT, **self.request_kwargs(7))
            record["first_request_s"] = time.perf_counter() - began
            began = time.perf_counter()
            client.generate(PROMPT, **self.request_kwargs(8))
            record["second_request_s"] = time.perf_counter() - began
            record["startup_after"] = startup_phases(client)
        self.rows.append(
            {
                "variant": "restart to SERVING (compile cache warm)",
                "kind": "start",
                "s": record["to_serving_s"],
                "notes": f"first request after restart {record['first_request_s']:.2f} s, "
                f"second {record['second_request_s']:.2f} s; stack "
                + ("restored from the kept decision" if record["stack_restored"] else "measured again")
                + f"; phases {_phases_note(record['startup'])}",
            }
        )
        assert self.server is not None
        record["stop"] = self.server.stop(timeout=30)

    def cleanup(self) -> None:
        if self.server is not None and self.server.alive():
            self.server.stop(timeout=15)

    def collect_logs(self, out: Path) -> None:
        """Every server log of this stage, concatenated (at most 2 MB each) into one returned file."""
        with (out / "server-logs.txt").open("a") as sink:
            for path in self.logs:
                text = path.read_text(errors="replace") if path.exists() else "(missing)"
                sink.write(f"===== {path.name} =====\n{text[-2_000_000:]}\n")


def startup_phases(client: Any) -> dict[str, float]:
    """The server's start-up seconds by phase (GetStats ``startup_*``; the ``startup`` log line)."""
    engine = dict(client.stats().engine)
    return {k.removeprefix("startup_"): round(v, 3) for k, v in engine.items() if k.startswith("startup_")}


def _phases_note(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in phases.items() if k.endswith("_s") and v >= 0.05)


def _stack_summary(stack: Any) -> dict[str, Any]:
    """The served stack as the diagnostics RPC reports it (chosen per slot, compile candidates)."""
    data = dataclasses.asdict(stack)
    summary: dict[str, Any] = {"chosen": {}, "compile_model": []}
    for slot in data.get("slots", []):
        summary["chosen"][slot.get("slot", "?")] = slot.get("chosen", [])
        if slot.get("slot") == "compile_model":
            summary["compile_model"] = slot.get("candidates", [])
    summary["notes"] = data.get("notes", [])
    return summary


def _scrape_batch_metrics(port: int) -> list[str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except Exception as exc:
        return [f"metrics not read: {exc}"]
    return [line for line in text.splitlines() if line.startswith("diffstack_batch_images")]


def serve_stage(run: Run, key: str, smoke_compile: bool = False, eager_only: bool = False) -> Any:
    """``eager_only``: the server with the torch_compile plugin turned off (``[plugins] deny``)."""

    def body(record: dict[str, Any]) -> None:
        bench = Serving(run, key, smoke_compile and not eager_only)
        if eager_only:
            bench.compile_ok = False
            bench.cache = run.work / "server-compile-cache-eager"
            record["plugins_denied"] = ["torch_compile"]
        w = bench.workload
        record["workload"] = {
            "label": f"{w.width}x{w.height}, {bench.steps} steps, default guidance, PNG over gRPC loopback"
            + (", torch_compile turned off" if eager_only else ""),
            "clients": CLIENTS,
        }
        record["rows"] = bench.rows
        parts: dict[str, Any] = {}
        record["parts"] = parts

        def part(name: str, fn: Any, needed: bool = False) -> bool:
            result = run.part(parts, name, ESTIMATES[name], fn)
            if needed and result["status"] != "ok":
                raise RuntimeError(
                    f"{name} {result['status']}: {result.get('error') or result.get('reason')}"
                )
            return result["status"] == "ok"

        try:
            part("save", bench.save, needed=True)
            part("cold_start", bench.cold_start, needed=True)
            part("loopback", bench.loopback)
            part("throughput", bench.throughput)
            part("stop", bench.stop)
            part("restart", bench.restart)
        finally:
            bench.cleanup()
            bench.collect_logs(run.out)
        log("[done] serve: " + "; ".join(f"{r['variant'][:40]}" for r in bench.rows))

    return body
