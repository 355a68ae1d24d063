"""catalogue-sdxl: the optimization catalogue's per-request items, timed on full-size models.

- Multi-scale diffusion on SDXL 1024²: the UNet step by phase (a coarse step on the downscaled
  latent, a full-size step) through the real wrapper, and whole images with the ``speed`` and
  ``quality`` presets against the plain request.
- Each named profile's image on SD1.5 512² (``speed``, ``balanced``, ``quality``, ``production``)
  against the model's defaults.
- CFG++ (``euler_cfgpp``, ``dpmpp_2m_cfgpp``) against Euler with ordinary CFG on SD1.5 512².

Random weights at published configs, built on the GPU (speed does not depend on weight values).
Each model is composed by diffstack itself (``compose_model``) and each image runs through the
engine's own request path (validation, then ``run_batch``), on the eager stack: ``torch_compile``
is left out so that the stage fits its few minutes (a compile of each model alone takes longer),
which makes every row here an eager-UNet time. Wall seconds per image, host work included.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench import measure
from bench.harness import Run, log, release_memory
from bench.models import build_pipeline, workload

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
PLUGINS = [
    "sdpa",
    "schedules",
    "plain_encoder",
    "eager",
    "prompt_cache",
    "ays",
    "deepcache",
    "multiscale",
    "cfgpp",
]
"""What the stage composes from: the baselines and the catalogue items it times (no compilation)."""
PROFILES = ("speed", "balanced", "quality", "production")
MULTISCALE_PRESETS = ("speed", "quality")
CFG_SAMPLERS = ("euler", "euler_cfgpp", "dpmpp_2m_cfgpp")
ESTIMATES = {"sdxl": 70.0, "sd15": 40.0}
"""GPU seconds each half needs (build, compose, images), for the budget."""


class Catalogue:
    """One model composed by diffstack, and images through the engine's request path."""

    def __init__(self, run: Run, key: str) -> None:
        from diffstack.config import load_settings
        from diffstack.engine.families import adapter_for
        from diffstack.engine.loading import ModelCard
        from diffstack.engine.model import compose_model
        from diffstack.plugins import load_plugins

        self.run, self.key = run, key
        self.workload = w = workload(key, run.smoke)
        self.steps = 4 if run.smoke else 20
        self.repeats = 2
        self.settings = load_settings(
            None,
            compose={"measure": "never", "batch": w.batch, "decisions_dir": None},
            plugins={"allow": PLUGINS},
        )
        self.pipe = build_pipeline(key, run.device, run.smoke)
        self.adapter = adapter_for(w.family)
        card = ModelCard(weights="random", default_width=w.width, default_height=w.height)
        began = time.perf_counter()
        self.model = compose_model(
            key,
            Path(f"in-memory/{key}"),
            self.pipe,
            w.family,
            card,
            load_plugins(self.settings.plugins),
            self.settings,
        )
        self.compose_s = time.perf_counter() - began
        self.seeds = iter(range(10_000))

    def image(self, **fields: Any) -> Any:
        """One image of ``PROMPT`` through validation and ``run_batch``; the result, or raises."""
        from diffstack.engine.requests import GenerationJob, GenerationRequest, GenerationResult
        from diffstack.engine.run import run_batch
        from diffstack.engine.validation import prepare_request

        w = self.workload
        request = GenerationRequest(
            prompt=PROMPT, width=w.width, height=w.height, seeds=(next(self.seeds),), **fields
        )
        (result,) = run_batch(
            self.model, [GenerationJob(prepare_request(request, self.model, self.settings.limits))]
        )
        if not isinstance(result, GenerationResult):
            raise RuntimeError(f"generation failed: {result}")
        return result

    def image_s(self, **fields: Any) -> tuple[dict[str, float], Any]:
        """Wall seconds per image (one warm-up, then ``repeats``) and the last result."""
        last: list[Any] = []
        timing = measure.wall(lambda: last.append(self.image(**fields)), self.run.device, self.repeats)
        return timing, last[-1]


def _row(
    rows: list[dict[str, Any]], variant: str, timing: dict[str, float], plain_s: float | None, **extra: Any
) -> None:
    row = {
        "variant": variant,
        "s": timing["median"],
        "min_s": timing["min"],
        "max_s": timing["max"],
        "n": timing["n"],
    }
    if plain_s:
        row["speedup_vs_plain"] = plain_s / timing["median"]
    rows.append({**row, **extra})


def _stack(result: Any) -> str:
    return "; ".join(f"{slot}: {', '.join(v)}" for slot, v in result.stack.items() if v)


def multiscale_sdxl(run: Run, record: dict[str, Any], headline: dict[str, float]) -> None:
    cat = Catalogue(run, "sdxl")
    record["compose_s"] = cat.compose_s
    rows: list[dict[str, Any]] = record["rows"]
    timing, result = cat.image_s(steps=cat.steps)
    plain = timing["median"]
    headline["sdxl_image_s_plain"] = plain
    _row(rows, f"SDXL plain request, {cat.steps} steps", timing, None, notes=_stack(result))
    for preset in MULTISCALE_PRESETS:
        wrappers = {"multiscale": {"preset": preset}}
        timing, result = cat.image_s(steps=cat.steps, wrappers=wrappers)
        suffix = "" if preset == "quality" else f"_{preset}"
        headline[f"multiscale{suffix}_sdxl_image_s"] = timing["median"]
        _row(rows, f"SDXL multiscale preset={preset}, {cat.steps} steps", timing, plain, notes=_stack(result))
    record["phases"] = _phase_steps(cat)
    for phase, ms in record["phases"].items():
        if isinstance(ms, float):
            headline[f"multiscale_sdxl_{phase}"] = ms


def _phase_steps(cat: Catalogue) -> dict[str, Any]:
    """The UNet call (batch 2, CFG) by phase through the real wrapper (preset ``speed``: factor 0.5):
    a coarse step (timestep 900) on the downscaled latent, a full-size one (timestep 100), and the
    plain UNet without the wrapper."""
    w = cat.workload
    denoiser = cat.model.denoiser_for(with_wrappers=True)
    inputs = cat.adapter.sample_inputs(cat.pipe, w.batch, w.height, w.width)

    def at(timestep: int) -> dict[str, Any]:
        return {**inputs, "timestep": torch.tensor(timestep, device=inputs["sample"].device)}

    def call(arguments: dict[str, Any]) -> Any:
        return lambda: denoiser(**arguments, return_dict=False)

    found: dict[str, Any] = {"latent": list(inputs["sample"].shape)}
    found["plain_step_ms"] = measure.timed(call(at(100)), cat.run.device, 5)["median"]
    handle = cat.model.stack.wrappers["multiscale"].apply(denoiser, {"preset": "speed"})
    try:
        handle.reset_state()
        with torch.inference_mode():
            denoiser(**at(999), return_dict=False)  # step 0: full size under "speed"
        found["coarse_step_ms"] = measure.timed(call(at(900)), cat.run.device, 5)["median"]
        found["coarse_calls_seen"] = handle.coarse_steps
        found["full_step_ms"] = measure.timed(call(at(100)), cat.run.device, 5)["median"]
    finally:
        handle.remove()
    if not found["coarse_calls_seen"]:
        raise RuntimeError("the multiscale wrapper ran no coarse step: the phase timing would be wrong")
    return found


def profiles_and_cfgpp_sd15(run: Run, record: dict[str, Any], headline: dict[str, float]) -> None:
    from diffstack.profiles import all_profiles, apply_profile

    cat = Catalogue(run, "sd15")
    record["compose_s"] = cat.compose_s
    rows: list[dict[str, Any]] = record["rows"]
    timing, result = cat.image_s()
    plain = timing["median"]
    headline["sd15_image_s_plain"] = plain
    _row(rows, "SD1.5 the model's defaults (no profile)", timing, None, notes=_stack(result))
    profiles = all_profiles({})
    for name in PROFILES:
        fields = apply_profile({}, name, profiles)
        timing, result = cat.image_s(**fields)
        headline[f"profile_{name}_sd15_image_s"] = timing["median"]
        _row(
            rows,
            f"SD1.5 profile {name}",
            timing,
            plain,
            steps=result_steps(fields, cat),
            notes=_stack(result),
        )
    for sampler in CFG_SAMPLERS:
        timing, result = cat.image_s(sampler=sampler, steps=cat.steps, schedule="default")
        headline[f"{sampler}_sd15_image_s"] = timing["median"]
        guidance = "CFG++ λ 0.6" if sampler.endswith("cfgpp") else "CFG 7.5"
        _row(rows, f"SD1.5 {sampler}, {guidance}, {cat.steps} steps", timing, plain, notes=_stack(result))


def result_steps(fields: dict[str, Any], cat: Catalogue) -> int:
    return int(fields.get("steps") or cat.model.default_steps)


def catalogue_stage(run: Run) -> Any:
    def body(record: dict[str, Any]) -> None:
        headline: dict[str, float] = {}
        record["headline"] = headline
        record["rows"] = []
        parts: dict[str, Any] = {}
        record["parts"] = parts

        def part(name: str, key: str, fn: Any) -> None:
            sub: dict[str, Any] = {"rows": record["rows"]}

            def go(into: dict[str, Any]) -> None:
                fn(run, sub, headline)
                into.update({k: v for k, v in sub.items() if k != "rows"})

            run.part(parts, name, ESTIMATES[key], go)
            release_memory()

        part("multiscale_sdxl", "sdxl", multiscale_sdxl)
        part("profiles_cfgpp_sd15", "sd15", profiles_and_cfgpp_sd15)
        log("[done] catalogue: " + ", ".join(f"{k}={v:.3f}" for k, v in headline.items()))

    return body
