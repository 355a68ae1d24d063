"""How the benchmark measures: device-event timing, drift, kernel profiles, FLOPs, CUDA-graph replay.

Timing follows the project's ``diffstack.timing`` rules (warm-up first, events on the device's own
clock, median of repeats) but keeps every sample, so the spread is reported beside the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from diffstack.timing import relative_error


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median, min and max milliseconds of ``fn`` (one synchronised call per sample)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync(device)
        samples = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - began) * 1000)
    return summary(samples)


def wall(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Host wall-clock seconds of ``fn`` (for whole images: host work counts too)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        began = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - began)
    return summary(samples)


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def drift(output: torch.Tensor, reference: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float32 (inf when the output is not finite)."""
    return relative_error(output, reference)


def first_output(module: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The denoiser's prediction for ``inputs``, copied (CUDA-graph outputs are overwritten later)."""
    with torch.inference_mode():
        return module(**inputs, return_dict=False)[0].detach().clone()


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call as PyTorch's flop counter sees them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def kernel_profile(fn: Callable[[], Any], device: str, calls: int = 3, top: int = 12) -> dict[str, Any]:
    """GPU busy time per call (sum of kernel and copy durations) and the kernels that take it.

    Comparing busy time with the call's wall time splits a step into kernel time and launch/host
    overhead: a step much longer than its kernels is waiting on the CPU.
    """
    if not device.startswith("cuda"):
        return {"skipped": "kernel profile needs CUDA"}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    busy_us = sum(e.device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    ranked = sorted(kernels, key=lambda e: -e.device_time_total)[:top]
    return {
        "gpu_busy_ms_per_call": busy_us / calls / 1000,
        "kernels_per_call": launches / calls,
        "top_kernels": [
            {
                "name": e.key[:120],
                "ms_per_call": e.device_time_total / calls / 1000,
                "calls_per_call": e.count / calls,
                "share": e.device_time_total / busy_us if busy_us else 0.0,
            }
            for e in ranked
        ],
        "classes": _kernel_classes(kernels, calls),
    }


def _kernel_classes(kernels: list[Any], calls: int) -> dict[str, float]:
    """Milliseconds per call by kind of kernel (by name), to see what bounds a step."""
    classes: dict[str, float] = {}
    for event in kernels:
        name = event.key.lower()
        if any(
            k in name
            for k in ("flash", "fmha", "attention", "attn", "sdpa", "cudnn_generated_fort_native_sdpa")
        ):
            kind = "attention"
        elif any(k in name for k in ("conv", "implicit", "winograd", "xmma_fprop", "fprop", "dgrad")):
            kind = "convolution"
        elif any(k in name for k in ("gemm", "matmul", "sm90_xmma", "cutlass", "nvjet", "mm_")):
            kind = "matmul"
        elif "memcpy" in name or "memset" in name:
            kind = "copy"
        elif name.startswith("triton"):
            kind = "triton (fused elementwise/norm)"
        else:
            kind = "other (elementwise, norms, reductions)"
        classes[kind] = classes.get(kind, 0.0) + event.device_time_total / calls / 1000
    return dict(sorted(classes.items(), key=lambda kv: -kv[1]))


def graph_replay(fn: Callable[[], Any], device: str, repeats: int) -> dict[str, float]:
    """``fn`` captured once in a CUDA graph and replayed: the same kernels without launch overhead."""
    if not device.startswith("cuda"):
        return {"skipped": "CUDA graphs need CUDA"}  # type: ignore[dict-item]
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        try:
            return timed(graph.replay, device, repeats)
        finally:
            del graph
            torch.cuda.empty_cache()


def matmul_ceiling(device: str, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> dict[str, float]:
    """Dense matmul TFLOP/s on random data: the compute ceiling the step times are compared with."""
    if not device.startswith("cuda"):
        return {"skipped": "CUDA only"}  # type: ignore[dict-item]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    result = timed(lambda: a @ b, device, repeats)
    result["tflops"] = 2 * size**3 / (result["median"] / 1000) / 1e12
    return result


def fp8_matmul_probe(
    device: str, shapes: list[tuple[int, int, int]], repeats: int = 20
) -> list[dict[str, Any]]:
    """bf16 versus row-wise-scaled fp8 (``torch._scaled_mm``) on given (M, K, N) GEMMs, with error.

    Evidence for or against an fp8 offer: the FLUX step is mostly such GEMMs.
    """
    rows: list[dict[str, Any]] = []
    if not device.startswith("cuda"):
        return [{"skipped": "CUDA only"}]
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k**0.5
        ref = x.float() @ w.float().t()
        bf16 = timed(lambda x=x, w=w: x @ w.t(), device, repeats)
        row: dict[str, Any] = {"m": m, "k": k, "n": n, "bf16_ms": bf16["median"]}
        row["bf16_error"] = drift(x @ w.t(), ref)
        try:
            fp8 = torch.float8_e4m3fn
            x_scale = x.abs().amax(dim=1, keepdim=True).float() / 448.0
            w_scale = w.abs().amax(dim=1, keepdim=True).float() / 448.0
            x8 = (x / x_scale).to(fp8)
            w8 = (w / w_scale).to(fp8)

            def run(x8=x8, w8=w8, xs=x_scale, ws=w_scale) -> torch.Tensor:
                return torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16)

            def dynamic(x=x, w8=w8, ws=w_scale, fp8=fp8) -> torch.Tensor:
                # activations quantized on every call, as a dynamic-quant layer must do
                xs = x.abs().amax(dim=1, keepdim=True).float() / 448.0
                return torch._scaled_mm(
                    (x / xs).to(fp8), w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16
                )

            row["fp8_gemm_ms"] = timed(run, device, repeats)["median"]
            row["fp8_dynamic_ms"] = timed(dynamic, device, repeats)["median"]
            row["fp8_error"] = drift(run(), ref)
            row["gemm_speedup"] = row["bf16_ms"] / row["fp8_gemm_ms"]
            row["dynamic_speedup"] = row["bf16_ms"] / row["fp8_dynamic_ms"]
        except Exception as exc:
            row["fp8_error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        del x, w, ref
    return rows
