"""The run's skeleton: a time budget, stages that skip when it runs low, and results saved as they come.

Every stage and every part of a stage goes through :meth:`Run.part`: it checks the budget against the
part's estimate first (too little left: recorded as ``skipped`` with the numbers), records an
exception as ``failed`` with its traceback (the run goes on), and rewrites the JSON file after every
part, so a run killed at its time limit still leaves everything measured so far.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGETS = {
    "sd15_step_ms": 5.0,
    "sd15_image_s": 0.11,
    "sd15_image_cached_s": 0.07,
    "sdxl_step_ms": 30.0,
    "sdxl_image_s": 0.70,
    "sdxl_image_cached_s": 0.45,
    "flux_step_ms": 100.0,
    "flux_image_s": 2.2,
    "sd15_throughput_images_per_s": 15.0,
    "sd15_throughput_8_clients": 20.0,
    "sd15_throughput_32_clients": 25.0,
    "sd15_p99_32_clients_s": 2.5,
    "restart_to_serving_s": 12.0,
    "cold_start_s": 75.0,
}
"""The issues' targets on one H200 (issue 11; the first throughput from issue 5; serving: issue 12)."""


class Budget:
    """Seconds left of the run's budget, measured from the start of the process."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def used(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.used()


class Run:
    """Results of one benchmark run, saved to ``out/results.json`` after every part."""

    def __init__(self, out: Path, work: Path, budget: Budget, smoke: bool, device: str, command: str) -> None:
        self.out = out
        self.work = work
        """Scratch space (saved models, compile caches, server logs); never sent back."""
        self.budget = budget
        self.smoke = smoke
        self.device = device
        self.results: dict[str, Any] = {
            "meta": environment(device, command, smoke, budget.seconds),
            "targets": TARGETS,
            "stages": {},
        }
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    @property
    def path(self) -> Path:
        return self.out / "results.json"

    def save(self) -> None:
        from bench.report import headline

        self.results["meta"]["seconds_used"] = round(self.budget.used(), 1)
        self.results["headline"] = headline(self.results)
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(_clean(self.results), indent=1, default=str) + "\n")
        partial.replace(self.path)

    def estimate(self, gpu_seconds: float) -> float:
        """A part's expected cost here: as estimated for the H100, or a token amount in a smoke run."""
        return min(gpu_seconds, 2.0) if self.smoke else gpu_seconds

    def part(
        self,
        parent: dict[str, Any],
        name: str,
        estimate_s: float,
        fn: Callable[[dict[str, Any]], Any],
    ) -> dict[str, Any]:
        """Run ``fn(record)`` as part ``name`` of ``parent`` unless the budget is short; never raises."""
        record: dict[str, Any] = {}
        parent[name] = record
        need = self.estimate(estimate_s)
        left = self.budget.left()
        if left < need:
            record.update(
                status="skipped",
                reason=f"budget: needs about {need:.0f} s, {left:.0f} s left",
            )
            log(f"[skip] {name}: {record['reason']}")
            self.save()
            return record
        log(f"[part] {name} (estimate {need:.0f} s, {left:.0f} s left)")
        started = time.perf_counter()
        try:
            fn(record)
            record.setdefault("status", "ok")
        except KeyboardInterrupt:
            record.update(status="failed", error="interrupted (time limit)")
            self.save()
            raise
        except Exception as exc:
            record.update(
                status="failed",
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(limit=12)[-4000:],
            )
            log(f"[fail] {name}: {type(exc).__name__}: {exc}")
        finally:
            record["seconds"] = round(time.perf_counter() - started, 2)
            self.save()
        return record

    def stage(self, name: str, estimate_s: float, fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        record = self.part(self.results["stages"], name, estimate_s, fn)
        release_memory()
        return record


def compile_options(run: Run, cache_dir: Path, smoke_compile: bool, fp8: bool = False) -> dict[str, Any]:
    """``[plugins.options.torch_compile]`` for a benchmark engine: its own cache folder; on a smoke
    run with ``--smoke-compile`` also ``allow_cpu`` (the plugin declines the CPU by default). The fp8
    variant is a second compile, so a stage turns it on only where it measures it (``fp8``)."""
    options: dict[str, Any] = {"cache_dir": str(cache_dir), "fp8": fp8}
    if run.smoke and smoke_compile:
        options["allow_cpu"] = True
    return options


def release_memory() -> None:
    """Drop compiled code, CUDA-graph pools and cached blocks between stages."""
    import gc

    import torch

    try:
        torch._dynamo.reset()
    except Exception as exc:  # a reset that fails must not end the run
        log(f"dynamo reset failed: {exc}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def environment(device: str, command: str, smoke: bool, budget_s: float) -> dict[str, Any]:
    """Card, driver, versions, date and command: what a reader needs to compare runs."""
    import torch

    info: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "smoke": smoke,
        "budget_s": budget_s,
        "device": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
    }
    for name in ("diffusers", "transformers", "triton", "grpc", "sageattention", "pluggy", "numpy"):
        info[name] = _version(name)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except Exception:
        info["git_commit"] = ""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(
            card=props.name,
            card_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            compute_capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
        )
        info["nvidia_smi"] = _nvidia_smi()
    return info


def _version(module: str) -> str:
    try:
        imported = __import__(module)
        return str(getattr(imported, "__version__", "?"))
    except Exception as exc:
        return f"not importable ({type(exc).__name__})"


def _nvidia_smi() -> dict[str, str]:
    fields = (
        "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu,"
        "persistence_mode"
    )
    try:
        line = (
            subprocess.run(
                ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except Exception as exc:
        return {"error": str(exc)}
    return dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as strings so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def python_executable() -> str:
    return sys.executable
