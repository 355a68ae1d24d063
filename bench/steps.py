"""Per denoiser step: the eager baseline, the by-hand compile, each offer alone, and the stack diffstack
composes itself, each with its numeric drift against the eager baseline on the same inputs.

Order inside a stage: what every later number is compared with comes first (build, eager baseline),
then the cheap analyses, then the expensive compiles. SD1.5's by-hand compile (the baseline the issue
says diffstack must beat) runs before composition; SDXL's and FLUX's run after it, if time is left.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from bench import measure
from bench.harness import Run, compile_options, log
from bench.models import build_pipeline, parameter_count, workload

# Estimated seconds on the H100 for each part (compiles dominate); a part is skipped when less is left.
ESTIMATES: dict[str, dict[str, float]] = {
    "build": {"sd15": 10, "sdxl": 15, "flux": 25},
    "eager": {"sd15": 5, "sdxl": 6, "flux": 8},
    "plugin_host": {"sd15": 2, "sdxl": 2, "flux": 2},
    "analysis": {"sd15": 6, "sdxl": 8, "flux": 10},
    "noise_floor": {"sd15": 5, "sdxl": 8, "flux": 0},
    "attention_offers": {"sd15": 25, "sdxl": 25, "flux": 10},
    "attention_composed": {"sd15": 25, "sdxl": 25, "flux": 15},
    "wrappers": {"sd15": 6, "sdxl": 10, "flux": 15},
    "keep_plain_copy": {"sd15": 2, "sdxl": 3, "flux": 0},
    "by_hand_compile": {"sd15": 70, "sdxl": 100, "flux": 130},
    "compose": {"sd15": 85, "sdxl": 260, "flux": 300},  # sdxl, flux: + the fp8 variant's compile
    "stack_profile": {"sd15": 5, "sdxl": 6, "flux": 8},
    "fp8_probe": {"sd15": 0, "sdxl": 0, "flux": 10},
    "processor_overhead": {"sd15": 6, "sdxl": 10, "flux": 0},
    "fused_drift": {"sd15": 4, "sdxl": 6, "flux": 8},
    "compile_offer": {"sd15": 70, "sdxl": 100, "flux": 90},
    "fp8_offer": {"sd15": 0, "sdxl": 90, "flux": 60},  # a second build of it, inductor cache warm
    "wrappers_compiled": {"sd15": 100, "sdxl": 170, "flux": 0},
}

FP8_STEPS = frozenset({"sdxl", "flux"})
"""Step stages whose composition includes the fp8-GEMM offer (SD1.5's GEMMs are small: skipped)."""

FLUX_GEMMS = [(4096, 3072, 12288), (4096, 12288, 3072), (4608, 3072, 21504), (4608, 15360, 3072)]
"""(M, K, N) of FLUX's biggest GEMMs at 1024² (image MLP in and out; single-block fused in and out)."""


class StepBench:
    """State shared by the parts of one workload's per-step stage."""

    def __init__(self, run: Run, key: str, smoke_compile: bool) -> None:
        self.run = run
        self.key = key
        self.workload = workload(key, run.smoke)
        self.device = run.device
        self.smoke_compile = smoke_compile
        self.compile_ok = not run.smoke or smoke_compile
        self.repeats = 5 if run.smoke else 20
        self.pipe: Any = None
        self.adapter: Any = None
        self.denoiser: Any = None
        self.inputs: dict[str, Any] = {}
        self.reference: torch.Tensor | None = None
        self.eager_ms: float | None = None
        self.by_hand_ms: float | None = None
        self.plain_copy: Any = None
        self.flops: int | None = None
        self.host: Any = None
        self.info: Any = None
        self.shapes: dict[str, Any] = {}
        self.rows: list[dict[str, Any]] = []

    # -- helpers -----------------------------------------------------------------------------------

    def call(self, module: Any) -> Any:
        inputs = self.inputs
        return lambda: module(**inputs, return_dict=False)

    def row(self, variant: str, kind: str, timing: dict[str, float] | None, **extra: Any) -> dict[str, Any]:
        row: dict[str, Any] = {"variant": variant, "kind": kind}
        if timing is not None:
            row.update(ms=timing["median"], min_ms=timing["min"], max_ms=timing["max"], n=timing["n"])
            if self.eager_ms:
                row["speedup_vs_eager"] = self.eager_ms / timing["median"]
            if self.by_hand_ms:
                row["speedup_vs_by_hand"] = self.by_hand_ms / timing["median"]
            if self.flops:
                row["tflops"] = self.flops / (timing["median"] / 1000) / 1e12
        row.update(extra)
        self.rows.append(row)
        return row

    def settings(self) -> Any:
        from diffstack.config import load_settings

        options = compile_options(
            self.run, self.run.work / "compile-cache", self.smoke_compile, fp8=self.key in FP8_STEPS
        )
        plugins: dict[str, Any] = {"options": {"torch_compile": options}}
        if not self.compile_ok:
            plugins["deny"] = ["torch_compile"]
        return load_settings(
            None,
            # Measured afresh every run: a benchmark never restores a kept decision.
            compose={"measure": "always", "batch": self.workload.batch, "decisions_dir": None},
            plugins=plugins,
        )

    # -- parts -------------------------------------------------------------------------------------

    def build(self, record: dict[str, Any]) -> None:
        from diffstack.engine.families import adapter_for

        self.pipe = build_pipeline(self.key, self.device, self.run.smoke)
        self.adapter = adapter_for(self.workload.family)
        self.denoiser = self.adapter.denoiser(self.pipe)
        torch.manual_seed(1)
        w = self.workload
        self.inputs = self.adapter.sample_inputs(self.pipe, w.batch, w.height, w.width)
        record["denoiser"] = type(self.denoiser).__name__
        record["denoiser_parameters"] = parameter_count(self.denoiser)
        record["input_shapes"] = {
            k: list(v.shape) for k, v in self.inputs.items() if isinstance(v, torch.Tensor)
        }
        if self.device.startswith("cuda"):
            record["gpu_memory_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)

    def eager(self, record: dict[str, Any]) -> None:
        self.reference = measure.first_output(self.denoiser, self.inputs)
        record["output_finite"] = bool(torch.isfinite(self.reference).all())
        record["output_rms"] = float(self.reference.float().pow(2).mean().sqrt())
        again = measure.first_output(self.denoiser, self.inputs)
        record["repeat_drift"] = measure.drift(again, self.reference)
        timing = measure.timed(self.call(self.denoiser), self.device, self.repeats)
        self.eager_ms = timing["median"]
        try:
            self.flops = measure.count_flops(self.call(self.denoiser))
            record["flops_per_step"] = self.flops
        except Exception as exc:
            record["flops_error"] = f"{type(exc).__name__}: {exc}"
        self.row("diffusers eager (SDPA)", "baseline", timing, drift=0.0)

    def analysis(self, record: dict[str, Any]) -> None:
        """Where the eager step's time goes: kernels vs launch overhead (CUDA-graph replay, profile)."""
        record["eager_profile"] = measure.kernel_profile(self.call(self.denoiser), self.device)
        replay = measure.graph_replay(self.call(self.denoiser), self.device, self.repeats)
        if "median" in replay:
            self.row(
                "eager kernels replayed from one CUDA graph (no compile; analysis)",
                "analysis",
                replay,
                notes="eager's kernels without per-launch CPU cost: eager minus this is launch overhead",
            )
        else:
            record["graph_replay"] = replay

    def noise_floor(self, record: dict[str, Any]) -> None:
        """Drift of the half-precision eager baseline itself against float32: the scale of 'harmless'."""
        assert self.reference is not None
        full = copy.deepcopy(self.denoiser).float()
        inputs = {
            k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in self.inputs.items()
        }
        if "added_cond_kwargs" in inputs:
            inputs["added_cond_kwargs"] = {k: v.float() for k, v in inputs["added_cond_kwargs"].items()}
        with torch.inference_mode():
            reference32 = full(**inputs, return_dict=False)[0]
        record["eager_half_vs_float32"] = measure.drift(self.reference, reference32)
        del full, reference32

    def plugin_host(self, record: dict[str, Any]) -> None:
        from diffstack.attention import capture_attention_shapes
        from diffstack.plugins import load_plugins
        from diffstack.types import ModelInfo

        settings = self.settings()
        self.host = load_plugins(settings.plugins)
        self.shapes = capture_attention_shapes(self.denoiser, self.call(self.denoiser))
        self.info = ModelInfo(
            name=self.key,
            family=self.workload.family,
            denoiser_kind=self.adapter.denoiser_kind,
            device=str(self.denoiser.device),
            dtype=self.denoiser.dtype,
            attention_shapes=tuple(sorted(set(self.shapes.values()), key=lambda s: s.key)),
            options=settings.plugins.options,
        )
        record["attention_shapes"] = sorted({s.key for s in self.shapes.values()})
        record["plugins"] = [
            {"name": p.name, "status": p.status, "error": p.error} for p in self.host.records
        ]

    def attention_offers(self, record: dict[str, Any]) -> None:
        """Every attention offer except the SDPA baseline, alone on the eager denoiser."""
        sources, failures = self.host.collect("select_attention", model=self.info)
        record["hook_failures"] = [{"plugin": f.plugin, "error": f.error} for f in failures]
        for source in sources:
            offer = source.offer
            if offer.name == "sdpa":
                continue
            entry: dict[str, Any] = {"plugin": source.plugin}
            record[offer.name] = entry
            availability = offer.probe(self.info)
            entry["probe"] = availability.reason or ("yes" if availability.ok else "no")
            if not availability.ok:
                self.row(
                    f"{offer.name} attention alone",
                    "offer",
                    None,
                    status="rejected",
                    notes=availability.reason,
                )
                continue
            try:  # one offer that fails (a kernel raising mid-step) must not cost the others' rows
                self._offer_alone(offer, entry)
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
                self.row(
                    f"{offer.name} attention alone", "offer", None, status="failed", notes=entry["error"]
                )

    def _offer_alone(self, offer: Any, entry: dict[str, Any]) -> None:
        from diffstack.attention import install_attention

        transformer = self.info.denoiser_kind.value == "transformer"
        if transformer and offer.diffusers_backend:
            self._backend_step(offer.name, offer.diffusers_backend, entry)
            return
        kernel = offer.build(self.info)
        if transformer:
            entry.update(self._kernel_only(offer.name, kernel))
            return
        plan = {name: (offer.name, kernel) for name, shape in self.shapes.items() if offer.supports(shape).ok}
        served = sorted({self.shapes[name].key for name in plan})
        entry["served_shapes"] = served
        original = dict(self.denoiser.attn_processors)
        try:
            install_attention(self.denoiser, plan)
            output = measure.first_output(self.denoiser, self.inputs)
            timing = measure.timed(self.call(self.denoiser), self.device, self.repeats)
        finally:
            self.denoiser.set_attn_processor(original)
        assert self.reference is not None
        self.row(
            f"{offer.name} attention alone",
            "offer",
            timing,
            drift=measure.drift(output, self.reference),
            notes=f"{len(plan)}/{len(self.shapes)} attention modules ({len(served)} shapes); rest SDPA",
        )

    def _backend_step(self, name: str, backend: str, entry: dict[str, Any]) -> None:
        """A transformer's offer through its diffusers attention backend: the whole step with it."""
        entry["diffusers_backend"] = backend
        self.denoiser.set_attention_backend(backend)
        try:
            output = measure.first_output(self.denoiser, self.inputs)
            timing = measure.timed(self.call(self.denoiser), self.device, self.repeats)
        finally:
            self.denoiser.reset_attention_backend()
        assert self.reference is not None
        self.row(
            f"{name} attention alone",
            "offer",
            timing,
            drift=measure.drift(output, self.reference),
            notes=f"diffusers attention backend {backend!r} on every attention call",
        )

    def attention_composed(self, record: dict[str, Any]) -> None:
        """Composition's attention slot alone: every offer checked against float32 SDPA and timed per
        shape by the host, the winners installed, and the step timed with them (rest of the stack off)."""
        import dataclasses

        from diffstack.attention import install_attention
        from diffstack.compose.attention import compose_attention
        from diffstack.compose.slots import ModelUnderTest

        settings = self.settings()
        model = ModelUnderTest(
            info=self.info,
            denoiser=self.denoiser,
            denoiser_inputs=self.inputs,
            module_shapes=self.shapes,
            base_encoder=None,  # type: ignore[arg-type]  (the attention slot encodes no prompt)
            scheduler=None,
            measure=True,
        )
        decision = compose_attention(self.host, model, settings.compose)
        record["report"] = dataclasses.asdict(decision.report)
        record["notes"] = list(decision.notes)
        record["backend"] = decision.backend
        original = dict(self.denoiser.attn_processors)
        try:
            if decision.backend is not None:
                self.denoiser.set_attention_backend(decision.backend)
            else:
                install_attention(self.denoiser, decision.plan)
            output = measure.first_output(self.denoiser, self.inputs)
            timing = measure.timed(self.call(self.denoiser), self.device, self.repeats)
        finally:
            if decision.backend is not None:
                self.denoiser.reset_attention_backend()
            else:
                self.denoiser.set_attn_processor(original)
        assert self.reference is not None
        chosen = decision.report.chosen
        self.row(
            "composition's attention choice alone",
            "stack",
            timing,
            drift=measure.drift(output, self.reference),
            notes="; ".join(chosen) if chosen else "SDPA everywhere",
        )

    def _kernel_only(self, name: str, kernel: Any) -> dict[str, Any]:
        """A transformer's attention offer without a diffusers backend: its kernel vs SDPA, alone."""
        import torch.nn.functional as F

        shape = max(self.shapes.values(), key=lambda s: s.query_len)
        b = self.workload.batch

        def rand(length: int) -> torch.Tensor:
            return torch.randn(
                b, shape.heads, length, shape.head_dim, device=self.device, dtype=self.denoiser.dtype
            )

        q, k, v = rand(shape.query_len), rand(shape.key_len), rand(shape.key_len)
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        sdpa_ms = measure.timed(lambda: F.scaled_dot_product_attention(q, k, v), self.device, self.repeats)
        kernel_ms = measure.timed(lambda: kernel(q, k, v), self.device, self.repeats)
        result = {
            "shape": f"B{b} {shape.key}",
            "sdpa_ms": sdpa_ms["median"],
            f"{name}_ms": kernel_ms["median"],
            "sdpa_error_vs_fp32": measure.drift(F.scaled_dot_product_attention(q, k, v), reference),
            f"{name}_error_vs_fp32": measure.drift(kernel(q, k, v), reference),
            "notes": "kernel only: the offer has no diffusers attention backend, so composition rejects it",
        }
        self.row(
            f"{name} attention kernel alone (one {shape.key} call; not wired)",
            "kernel",
            None,
            kernel_ms=kernel_ms["median"],
            sdpa_ms=sdpa_ms["median"],
            drift=result[f"{name}_error_vs_fp32"],
            notes=result["notes"],
        )
        return result

    def wrappers(self, record: dict[str, Any]) -> None:
        """Each denoiser wrapper alone over a short fake trajectory (mean ms per step, final drift)."""
        sources, _ = self.host.collect("wrap_denoiser", model=self.info)
        steps = 4 if self.run.smoke else 9
        plain_x, plain_times = self._trajectory(steps)
        record["plain_trajectory_ms"] = plain_times
        for source in sources:
            offer = source.offer
            if self.info.denoiser_kind not in offer.denoiser_kinds or not offer.probe(self.info).ok:
                continue
            options = {"interval": 3} if offer.name == "deepcache" else {}
            handle = offer.apply(self.denoiser, options)
            try:
                handle.reset_state()
                wrapped_x, times = self._trajectory(steps)
            finally:
                handle.remove()
            record[offer.name] = {"options": options, "ms_per_step": times}
            mean = sum(times) / len(times)
            self.row(
                f"{offer.name} alone ({', '.join(f'{k}={v}' for k, v in options.items()) or 'defaults'}; "
                f"mean of {steps} steps)",
                "offer",
                {"median": mean, "min": min(times), "max": max(times), "n": len(times)},
                drift=measure.drift(wrapped_x, plain_x),
                notes="drift: final latent of a fake trajectory vs the same trajectory without it; "
                "random weights make cache decisions unrepresentative",
            )

    def wrappers_compiled(self, record: dict[str, Any]) -> None:
        """Wrappers that run on the compiled stack (``on_compiled``), timed per step on it.

        DeepCache interval 3 is a fixed pattern (full, cached, cached, ...), so its timing is
        representative on random weights; the first-block cache's hits depend on the weights, so its
        timing is only the cost of its per-block graphs. The first trajectory compiles and is not timed.
        """
        stack = self.loaded.denoiser_for(with_wrappers=False)
        steps = 4 if self.run.smoke else 9
        plain_x, _ = self._trajectory(steps, stack)
        for offer in self.loaded.stack.wrappers.values():
            if not offer.on_compiled:
                continue
            options = {"interval": 3} if offer.name == "deepcache" else {}
            for attempt in ("first", "timed"):
                handle = offer.apply(stack, options)
                try:
                    handle.reset_state()
                    wrapped_x, times = self._trajectory(steps, stack)
                finally:
                    handle.remove()
                record[f"{offer.name}_{attempt}_ms_per_step"] = times
            # DeepCache's pattern is fixed; the first-block cache decides from the activations.
            fixed = offer.name == "deepcache"
            full = times[0::3] if fixed else []
            cached = [t for i, t in enumerate(times) if i % 3] if fixed else []
            mean = sum(times) / len(times)
            self.row(
                f"{offer.name} on the compiled stack ({', '.join(f'{k}={v}' for k, v in options.items())}; "
                f"mean of {steps} steps)",
                "stack",
                {"median": mean, "min": min(times), "max": max(times), "n": len(times)},
                drift=measure.drift(wrapped_x, plain_x),
                full_step_ms=sorted(full)[len(full) // 2] if full else None,
                cached_step_ms=sorted(cached)[len(cached) // 2] if cached else None,
                notes=("a fixed pattern: a full step, then two cached; " if fixed else "weight-driven hits; ")
                + "drift: final latent of a fake trajectory vs the compiled stack without the cache",
            )

    def _trajectory(self, steps: int, module: Any = None) -> tuple[torch.Tensor, list[float]]:
        """``x ← x − 0.05·f(x)`` for ``steps`` calls, each call timed; a stand-in for a sampler loop."""
        import time

        key = "hidden_states" if "hidden_states" in self.inputs else "sample"
        x = self.inputs[key].clone()
        times: list[float] = []
        cuda = self.device.startswith("cuda")
        with torch.inference_mode():
            for _ in range(steps):
                inputs = {**self.inputs, key: x}
                measure.sync(self.device)
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                began = time.perf_counter()
                out = (self.denoiser if module is None else module)(**inputs, return_dict=False)[0]
                if cuda:
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    times.append((time.perf_counter() - began) * 1000)
                x = x - 0.05 * out
        return x, times

    def keep_plain_copy(self, record: dict[str, Any]) -> None:
        """A copy of the plain diffusers denoiser for the by-hand compile, taken before composition
        changes the denoiser in place (processors, channels_last, fused projections)."""
        self.plain_copy = copy.deepcopy(self.denoiser)
        record["copied"] = type(self.plain_copy).__name__

    def by_hand_compile(self, record: dict[str, Any]) -> None:
        """What a user does by hand: ``torch.compile(denoiser, mode="reduce-overhead")``."""
        import time

        module = self.plain_copy if self.plain_copy is not None else self.denoiser
        if self.plain_copy is None and hasattr(module, "unfuse_qkv_projections"):
            try:
                module.unfuse_qkv_projections()  # composition fused them; the by-hand user would not have
                record["unfused"] = True
            except Exception as exc:
                record["unfuse_error"] = str(exc)
        mode = "reduce-overhead" if self.device.startswith("cuda") else "default"
        compiled = torch.compile(module, mode=mode)
        began = time.perf_counter()
        output = measure.first_output(compiled, self.inputs)
        measure.sync(self.device)
        record["first_call_s"] = time.perf_counter() - began
        timing = measure.timed(self.call(compiled), self.device, self.repeats)
        assert self.reference is not None
        self.by_hand_ms = timing["median"]
        self.row(
            f'by-hand torch.compile(mode="{mode}")',
            "baseline",
            timing,
            drift=measure.drift(output, self.reference),
            compile_s=record["first_call_s"],
        )
        for row in self.rows:  # rows measured earlier get their ratio to this baseline too
            if "ms" in row and "speedup_vs_by_hand" not in row:
                row["speedup_vs_by_hand"] = self.by_hand_ms / row["ms"]
        self.plain_copy = None

    def compose(self, record: dict[str, Any]) -> None:
        """The stack diffstack composes itself (compose_model, compose.measure="always")."""
        import dataclasses
        import time

        from diffstack.engine.loading import ModelCard
        from diffstack.engine.model import compose_model

        w = self.workload
        card = ModelCard(weights="random", default_width=w.width, default_height=w.height)
        began = time.perf_counter()
        loaded = compose_model(
            self.key, Path(f"in-memory/{self.key}"), self.pipe, w.family, card, self.host, self.settings()
        )
        record["compose_s"] = time.perf_counter() - began
        report = loaded.report
        record["report"] = dataclasses.asdict(report)
        record["chosen"] = {k: list(v) for k, v in report.summary().items()}
        stack = loaded.denoiser_for(with_wrappers=False)
        record["stack_module"] = type(stack).__name__
        if hasattr(stack, "diffstack_compile_seconds"):
            record["diffstack_compile_seconds"] = stack.diffstack_compile_seconds
        for candidate in report.slot("compile_model").candidates:
            if candidate.time_ms is None:
                if candidate.offer:  # refused or failed: its drift and reason still say why
                    self.row(
                        f"{candidate.offer} (not timed: {candidate.status.value})",
                        "offer",
                        None,
                        drift_vs_host_reference=candidate.numeric_error,
                        compile_s=candidate.setup_s,
                        status=candidate.status.value,
                        notes=candidate.reason[:300],
                    )
                continue
            self.row(
                f"{candidate.offer} alone (measured by the host during composition)",
                "offer",
                {"median": candidate.time_ms, "min": candidate.time_ms, "max": candidate.time_ms, "n": 1},
                drift_vs_host_reference=candidate.numeric_error,
                compile_s=candidate.setup_s,
                status=candidate.status.value,
                notes="; ".join(
                    ["host's own timing (median of compose.repeats) on its own random inputs"]
                    + [n for n in candidate.notes if n.startswith(("fp8", "lossy", "regional"))]
                ),
            )
        output = measure.first_output(stack, self.inputs)
        timing = measure.timed(self.call(stack), self.device, self.repeats)
        assert self.reference is not None
        chosen = "; ".join(f"{slot}: {', '.join(v)}" for slot, v in record["chosen"].items() if v)
        self.row(
            "diffstack composed stack",
            "stack",
            timing,
            drift=measure.drift(output, self.reference),
            notes=chosen,
        )
        self.loaded = loaded

    def stack_profile(self, record: dict[str, Any]) -> None:
        stack = self.loaded.denoiser_for(with_wrappers=False)
        record["stack_profile"] = measure.kernel_profile(self.call(stack), self.device)

    def processor_overhead(self, record: dict[str, Any]) -> None:
        """Eager cost of the host's attention plumbing (UNets): diffusers' own SDPA processors vs the
        host's ``KernelAttnProcessor`` running the same SDPA on every module, and the plain model again
        after one DeepCache apply/remove cycle (what composition's wrapper check does)."""
        import torch.nn.functional as F

        from diffstack.attention import install_attention

        assert self.reference is not None
        original = dict(self.denoiser.attn_processors)
        plain = measure.timed(self.call(self.denoiser), self.device, self.repeats)
        self.row("eager again, diffusers' own processors (analysis)", "analysis", plain, drift=0.0)
        plan = {name: ("sdpa", F.scaled_dot_product_attention) for name in self.shapes}
        try:
            install_attention(self.denoiser, plan)
            output = measure.first_output(self.denoiser, self.inputs)
            hosted = measure.timed(self.call(self.denoiser), self.device, self.repeats)
            record["host_profile"] = measure.kernel_profile(self.call(self.denoiser), self.device)
        finally:
            self.denoiser.set_attn_processor(original)
        self.row(
            "eager, host KernelAttnProcessor(SDPA) on every attention module (analysis)",
            "analysis",
            hosted,
            drift=measure.drift(output, self.reference),
            notes="the processors composition installs even when SDPA wins every shape",
        )
        sources, _ = self.host.collect("wrap_denoiser", model=self.info)
        for source in sources:
            if source.offer.name != "deepcache":
                continue
            handle = source.offer.apply(self.denoiser, {})
            handle.reset_state()
            measure.first_output(self.denoiser, self.inputs)
            handle.remove()
            after = measure.timed(self.call(self.denoiser), self.device, self.repeats)
            self.row(
                "eager after one DeepCache apply/remove cycle (analysis)",
                "analysis",
                after,
                drift=measure.drift(measure.first_output(self.denoiser, self.inputs), self.reference),
            )

    def fused_drift(self, record: dict[str, Any]) -> None:
        """Drift and time of fusing the Q/K/V projections alone, in eager mode (undone afterwards)."""
        assert self.reference is not None
        self.denoiser.fuse_qkv_projections()
        try:
            output = measure.first_output(self.denoiser, self.inputs)
            timing = measure.timed(self.call(self.denoiser), self.device, self.repeats)
        finally:
            self.denoiser.unfuse_qkv_projections()
        restored = measure.first_output(self.denoiser, self.inputs)
        record["restored_drift"] = measure.drift(restored, self.reference)
        self.row(
            "eager with fused QKV projections (analysis)",
            "analysis",
            timing,
            drift=measure.drift(output, self.reference),
            notes="same math, other GEMM shapes: the drift rounding alone causes",
        )

    def compile_offer(self, record: dict[str, Any], name: str = "torch_compile") -> None:
        """A compile offer built and timed directly, whatever composition's numeric check said."""
        import time

        from diffstack.types import Built

        sources, _ = self.host.collect("compile_model", model=self.info)
        offer = next(s.offer for s in sources if s.offer.name == name)
        began = time.perf_counter()
        built = offer.build(self.denoiser, self.info)
        module, record["notes"] = (
            (built.value, list(built.notes)) if isinstance(built, Built) else (built, [])
        )
        output = measure.first_output(module, self.inputs)
        measure.sync(self.device)
        record["first_call_s"] = time.perf_counter() - began
        timing = measure.timed(self.call(module), self.device, self.repeats)
        assert self.reference is not None
        self.row(
            f"{name} offer alone (built directly; composition's check bypassed)",
            "offer",
            timing,
            drift=measure.drift(output, self.reference),
            compile_s=record["first_call_s"],
            notes="; ".join(record["notes"][:2]),
        )

    def fp8_offer(self, record: dict[str, Any]) -> None:
        """The fp8 variant timed even where composition refused it (its drift is in the row)."""
        sources, _ = self.host.collect("compile_model", model=self.info)
        offer = next(s.offer for s in sources if s.offer.name == "torch_compile_fp8")
        answer = offer.probe(self.info)
        if not answer.ok:
            record["declined"] = answer.reason  # no torchao, or compute capability under 8.9
            return
        self.compile_offer(record, "torch_compile_fp8")

    def fp8_refused(self) -> bool:
        """Whether composition ran the fp8 offer's check and refused it (so it has no timing)."""
        loaded = getattr(self, "loaded", None)
        if loaded is None:
            return False
        return any(
            c.offer == "torch_compile_fp8" and c.status.value in ("rejected",) and c.numeric_error is not None
            for c in loaded.report.slot("compile_model").candidates
        )

    def fp8_probe(self, record: dict[str, Any]) -> None:
        record["gemms"] = measure.fp8_matmul_probe(self.device, FLUX_GEMMS)


ALWAYS = ("build", "eager", "plugin_host")
"""Parts every step stage runs, whatever ``--parts`` selects."""


# One benchmark script, read top to bottom: its branches are the stages a run may skip.
def step_stage(run: Run, key: str, smoke_compile: bool = False, only: set[str] | None = None) -> Any:  # noqa: C901
    """The stage body for workload ``key`` (``sd15``, ``sdxl`` or ``flux``)."""

    def body(record: dict[str, Any]) -> None:  # noqa: C901
        bench = StepBench(run, key, smoke_compile)
        w = bench.workload
        record["workload"] = {
            "label": w.label,
            "width": w.width,
            "height": w.height,
            "batch": w.batch,
            "dtype": str(w.dtype),
        }
        record["rows"] = bench.rows
        parts: dict[str, Any] = {}
        record["parts"] = parts

        def part(name: str, fn: Any, needed: bool = False, reserve: float = 0.0) -> bool:
            """``reserve``: seconds kept back for the compiles that follow (optional parts yield to them)."""
            if only and name not in only and name not in ALWAYS:
                parts[name] = {"status": "skipped", "reason": "not selected (--parts)"}
                return False
            if only:
                reserve = 0.0
            estimate = ESTIMATES[name][key] if name in ESTIMATES else 5
            result = run.part(parts, name, estimate + (reserve if not run.smoke else 0), fn)
            if needed and result["status"] != "ok":
                raise RuntimeError(
                    f"{name} {result['status']}: {result.get('error') or result.get('reason')}"
                )
            return result["status"] == "ok"

        compose_s = ESTIMATES["compose"][key]
        by_hand_first = key == "sd15" and bench.compile_ok
        reserve = compose_s + (ESTIMATES["by_hand_compile"][key] if by_hand_first else 0)
        part("build", bench.build, needed=True)
        part("eager", bench.eager, needed=True)
        part("plugin_host", bench.plugin_host, needed=True)
        part("analysis", bench.analysis, reserve=reserve)
        if key != "flux":
            part("processor_overhead", bench.processor_overhead, reserve=reserve)
        part("fused_drift", bench.fused_drift, reserve=reserve)
        if key != "flux":
            part("noise_floor", bench.noise_floor, reserve=reserve)
        part("attention_offers", bench.attention_offers, reserve=reserve)
        if only and "attention_composed" in only:
            part("attention_composed", bench.attention_composed)
        part("wrappers", bench.wrappers, reserve=reserve)
        if bench.compile_ok:
            if key != "flux":
                part("keep_plain_copy", bench.keep_plain_copy)
            if by_hand_first:
                part("by_hand_compile", bench.by_hand_compile, reserve=compose_s)
        else:
            parts["by_hand_compile"] = {"status": "skipped", "reason": "smoke run without --smoke-compile"}
        if part("compose", bench.compose):
            part("stack_profile", bench.stack_profile)
            if key != "flux":
                part("wrappers_compiled", bench.wrappers_compiled)
        if key == "flux":
            part("fp8_probe", bench.fp8_probe)
        if bench.compile_ok and not by_hand_first:
            part("by_hand_compile", bench.by_hand_compile)
        if bench.compile_ok and only and "compile_offer" in only:
            part("compile_offer", bench.compile_offer)
        asked_fp8 = bool(only and "fp8_offer" in only)
        if bench.compile_ok and key in FP8_STEPS and (asked_fp8 or bench.fp8_refused()):
            part("fp8_offer", bench.fp8_offer)
        bench.plain_copy = None
        log(
            f"[done] step {key}: "
            + ", ".join(f"{r['variant'][:30]}={r['ms']:.2f}ms" for r in bench.rows if "ms" in r)
        )

    return body
