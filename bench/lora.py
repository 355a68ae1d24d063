"""What a LoRA change costs per stack: SD1.5 512² (random weights, fp16) with two random rank-16
LoRAs made here, swapped through the engine's own hot-swap slot (``diffstack.engine.loras``).

For the eager denoiser and then for the torch_compile plugin's compiled one (reduce-overhead: CUDA
graphs), on the same module:

- slot install: ``enable_lora_hotswap`` and the zero adapter (once per model, at load);
- load: the first use of a LoRA (file → device → slot); swap: one cached LoRA for another;
  unload: back to the zero adapter (what a request without LoRAs does);
- the first denoiser step after a swap against the steady step, the step with no slot at all, and
  (eager) the step with the slot switched off, as an eager stack runs a request without LoRAs;
- whether anything recompiled (Dynamo's ``error_on_recompile`` is on while swapping and stepping), and
  whether the compiled (CUDA-graphed) step reads the swapped weights (its output against eager's).

A smoke run does the same on the tiny SD1 model on the CPU; its compiled part uses Dynamo with the
``eager`` backend (the recompile check is Dynamo's either way) unless ``--smoke-compile``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from bench import measure
from bench.harness import Run, log
from bench.models import build_pipeline, workload

RANK = 16
SWAPS = 10


def lora_stage(run: Run, smoke_compile: bool = False) -> Callable[[dict[str, Any]], None]:
    def body(record: dict[str, Any]) -> None:
        from diffstack.engine.loras import LoraCatalogue, LoraSlot
        from diffstack.engine.requests import LoraSpec
        from diffstack.testing import save_random_lora

        w = workload("sd15", run.smoke)
        record["workload"] = {
            "label": f"LoRA hot-swap, SD1.5 UNet {w.width}x{w.height} batch {w.batch}, rank {RANK}"
        }
        pipe = build_pipeline("sd15", run.device, run.smoke)
        unet = pipe.unet
        folder = run.work / "lora-sd15" / "loras"
        for index, name in enumerate(("random-a", "random-b")):
            save_random_lora(unet, folder / f"{name}.safetensors", rank=RANK, seed=index + 1, std=0.05)
        inputs = _inputs(unet, w, run.device)
        rows: list[dict[str, Any]] = []
        record["rows"] = rows
        repeats = 3 if run.smoke else 20

        step = measure.timed(lambda: unet(**inputs), run.device, repeats)
        rows.append({"variant": "eager: step without a LoRA slot", "ms": step["median"], "timing": step})
        began = time.perf_counter()
        slot = LoraSlot(unet, RANK, LoraCatalogue([folder]), cache=4)
        measure.sync(run.device)
        rows.append({"variant": "slot install (enable_lora_hotswap + zero adapter)", "ms": _ms(began)})
        a, b = (LoraSpec("random-a"),), (LoraSpec("random-b", 0.8),)

        _swap_rows(run, rows, "eager", slot, lambda: unet(**inputs), a, b, repeats)
        slot.settle(compiled=False)  # what an eager stack does for a request without LoRAs
        off = measure.timed(lambda: unet(**inputs), run.device, repeats)
        rows.append(
            {"variant": "eager: step with the slot switched off (eager stack, no LoRA)", "ms": off["median"]}
        )
        slot.settle(compiled=True)
        unet.enable_adapters()
        _finish(record)  # the eager figures stand even if the compile below runs out of budget

        compiled, how = _compiled(run, unet, smoke_compile)
        record["compiled_with"] = how
        slot.activate(())
        began = time.perf_counter()
        with torch.inference_mode():
            compiled(**inputs)
        measure.sync(run.device)
        rows.append({"variant": f"compiled: first call (compile) [{how}]", "ms": _ms(began)})
        with torch._dynamo.config.patch(error_on_recompile=True):
            try:
                _swap_rows(run, rows, "compiled", slot, lambda: compiled(**inputs), a, b, repeats)
                record["recompiled"] = False
            except Exception as exc:  # error_on_recompile raises: that is the finding
                record["recompiled"] = True
                record["recompile_error"] = f"{type(exc).__name__}: {exc}"[:2000]
                log(f"lora-sd15: a swap recompiled: {exc}")
        outputs = {}
        for name, specs in (("none", ()), ("b", b)):
            slot.activate(specs)
            with torch.inference_mode():
                outputs[name] = (unet(**inputs).sample.float(), compiled(**inputs).sample.float().clone())
        # The compiled (CUDA-graphed) step reads the swapped weights when it is far closer to eager's
        # output with the same LoRA than the LoRA moves the output.
        record["compiled_vs_eager_after_swap"] = measure.drift(outputs["b"][1], outputs["b"][0])
        record["lora_effect"] = measure.drift(outputs["b"][0], outputs["none"][0])
        record["compiled_with_lora_vs_eager_without"] = measure.drift(outputs["b"][1], outputs["none"][0])
        _finish(record)

    return body


def _swap_rows(
    run: Run,
    rows: list[dict[str, Any]],
    stack: str,
    slot: Any,
    step: Callable[[], Any],
    a: tuple[Any, ...],
    b: tuple[Any, ...],
    repeats: int,
) -> None:
    """Load, swap, unload and the steps around them on one stack (``slot`` starts on no LoRA)."""

    def timed_activate(specs: tuple[Any, ...]) -> float:
        measure.sync(run.device)
        began = time.perf_counter()
        slot.activate(specs)
        measure.sync(run.device)
        return _ms(began)

    def first_step() -> float:
        began = time.perf_counter()
        with torch.inference_mode():
            step()
        measure.sync(run.device)
        return _ms(began)

    slot._cache.clear()  # a load reads the file again on each stack
    load = timed_activate(a)
    rows.append({"variant": f"{stack}: load (file → device → slot)", "ms": load})
    first = first_step()
    steady = measure.timed(step, run.device, repeats)
    rows.append({"variant": f"{stack}: first step after a swap", "ms": first})
    rows.append({"variant": f"{stack}: step with a LoRA (steady)", "ms": steady["median"], "timing": steady})
    swaps, firsts = [], []
    for index in range(SWAPS if not run.smoke else 3):
        swaps.append(timed_activate(b if index % 2 == 0 else a))
        firsts.append(first_step())
    rows.append({"variant": f"{stack}: swap (cached LoRA → another)", "ms": _median(swaps), "samples": swaps})
    rows.append({"variant": f"{stack}: first step after each swap", "ms": _median(firsts), "samples": firsts})
    unload = timed_activate(())
    rows.append({"variant": f"{stack}: unload (zero adapter back)", "ms": unload})
    zero = measure.timed(step, run.device, repeats)
    rows.append({"variant": f"{stack}: step with the zero slot", "ms": zero["median"], "timing": zero})


def _compiled(run: Run, unet: Any, smoke_compile: bool) -> tuple[Any, str]:
    """The torch_compile plugin's compile of ``unet`` (reduce-overhead on CUDA), or on a smoke run
    without ``--smoke-compile`` Dynamo with the eager backend."""
    if run.smoke and not smoke_compile:
        return torch.compile(unet, backend="eager"), "dynamo, eager backend (smoke)"
    from diffstack.types import DenoiserKind, Family, ModelInfo
    from diffstack_torch_compile.compiler import compile_denoiser
    from diffstack_torch_compile.config import CompileConfig

    parameter = next(unet.parameters())
    info = ModelInfo("bench-lora-sd15", Family.SD1, DenoiserKind.UNET, run.device, parameter.dtype)
    # A static batch: the dynamic one (the server's setting) did not compile in 95 s on an H200 with
    # the slot's 128 extra projections; the swap is the same either way.
    config = CompileConfig(
        cache_dir=str(run.work / "lora-sd15" / "compile"), allow_cpu=run.smoke, dynamic_batch=False
    )
    built = compile_denoiser(unet, info, config)
    return (
        built.value,
        f"torch_compile plugin, mode {config.resolved_mode(run.device)}: {'; '.join(built.notes)}",
    )


def _inputs(unet: Any, w: Any, device: str) -> dict[str, Any]:
    parameter = next(unet.parameters())
    side = w.height // 8, w.width // 8
    generator = torch.Generator(device).manual_seed(0)
    return {
        "sample": torch.randn(w.batch, 4, *side, generator=generator, device=device, dtype=parameter.dtype),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": torch.randn(
            w.batch,
            77,
            unet.config.cross_attention_dim,
            generator=generator,
            device=device,
            dtype=parameter.dtype,
        ),
    }


def _finish(record: dict[str, Any]) -> None:
    """The headline keys and the table from the rows so far."""
    record["headline"] = {
        f"lora_swap_ms_{stack}": round(row["ms"], 3)
        for stack in ("eager", "compiled")
        for row in record["rows"]
        if row["variant"] == f"{stack}: swap (cached LoRA → another)"
    }
    record["table"] = _table(record)


def _table(record: dict[str, Any]) -> list[str]:
    """The stage's rows as markdown, and what the checks found."""
    lines = [record["workload"]["label"], "", "| what | ms |", "|---|---|"]
    lines += [f"| {row['variant']} | {row['ms']:.2f} |" for row in record["rows"]]
    drift = record.get("compiled_vs_eager_after_swap")
    return [
        *lines,
        "",
        f"recompiled on a swap: {record.get('recompiled')}; compiled vs eager after a swap: {drift} "
        f"(the LoRA itself moves the output by {record.get('lora_effect')}); "
        f"compiled with {record.get('compiled_with')}",
    ]


def _ms(began: float) -> float:
    return (time.perf_counter() - began) * 1000


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]
