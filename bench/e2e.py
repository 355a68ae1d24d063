"""End to end, one image: plain diffusers (eager, and with the by-hand compile) against diffstack's Engine.

SD1.5 and SDXL: the random full-size pipeline is saved with ``save_pretrained`` into a models folder
and every path loads it from there: plain diffusers with ``from_pretrained``, diffstack through
``Engine.start``, exactly as a user's model folder would be loaded. FLUX (24 GB of transformer) is
built in memory instead, as step-flux does: plain diffusers runs that pipeline, then
``compose_model`` composes its stack and the engine's own ``run_batch`` makes the images (writing
and reading 24 GB would cost the run's budget, not measure anything). Wall-clock seconds per image
include text encoding, every denoising step, the VAE decode and the conversion to a PIL image.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import torch

from bench import measure
from bench.harness import Run, compile_options, log
from bench.models import build_pipeline, workload
from diffstack.engine.families import adapter_for
from diffstack.types import Family

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
GUIDANCE = {
    "sd15": adapter_for(Family.SD1).default_guidance,
    "sdxl": adapter_for(Family.SDXL).default_guidance,
    "flux": adapter_for(Family.FLUX).default_guidance,
}
"""diffstack's default guidance per family (7.5, 5.0 and 3.5 when measured), used for the plain
pipelines too (FLUX.1-dev's is embedded guidance: one transformer call per step)."""

ESTIMATES: dict[str, dict[str, float]] = {
    "save": {"sd15": 25, "sdxl": 50, "flux": 30},
    "plain_eager": {"sd15": 20, "sdxl": 30, "flux": 20},
    "engine": {"sd15": 200, "sdxl": 300, "flux": 330},
    "by_hand_compile": {"sd15": 110, "sdxl": 0, "flux": 0},
}

IN_MEMORY = frozenset({"flux"})
"""Workloads built in memory rather than saved and loaded (see the module docstring)."""


def steps_for(run: Run) -> int:
    return 4 if run.smoke else 20


def save_model(run: Run, key: str) -> Path:
    """The workload's random pipeline as a diffusers folder in the run's models dir (made once)."""
    path = run.work / "models" / key
    if (path / "model_index.json").is_file() and (path / "diffstack.json").is_file():
        return path
    w = workload(key, run.smoke)
    pipe = build_pipeline(key, run.device, run.smoke)
    pipe.save_pretrained(path, safe_serialization=True)
    card = {
        "weights": "random",
        "description": f"{w.label}: published config, random weights (benchmark only)",
        "default_width": w.width,
        "default_height": w.height,
        "default_steps": steps_for(run),
    }
    (path / "diffstack.json").write_text(json.dumps(card, indent=2) + "\n")
    del pipe
    return path


def _folder_gib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 2)


class EndToEnd:
    def __init__(self, run: Run, key: str, smoke_compile: bool) -> None:
        self.run = run
        self.key = key
        self.workload = workload(key, run.smoke)
        self.steps = steps_for(run)
        self.smoke_compile = smoke_compile
        self.compile_ok = not run.smoke or smoke_compile
        self.repeats = 2 if run.smoke else (5 if key == "sd15" else 3)
        self.rows: list[dict[str, Any]] = []
        self.path: Path | None = None
        self.eager_s: float | None = None
        self.by_hand_s: float | None = None
        self.pipe: Any = None
        """The in-memory pipeline (``IN_MEMORY`` workloads only)."""

    def row(self, variant: str, kind: str, timing: dict[str, float] | None, **extra: Any) -> None:
        row: dict[str, Any] = {"variant": variant, "kind": kind}
        if timing is not None:
            row.update(s=timing["median"], min_s=timing["min"], max_s=timing["max"], n=timing["n"])
            if self.eager_s:
                row["speedup_vs_eager"] = self.eager_s / timing["median"]
            if self.by_hand_s:
                row["speedup_vs_by_hand"] = self.by_hand_s / timing["median"]
        row.update(extra)
        self.rows.append(row)

    def save(self, record: dict[str, Any]) -> None:
        began = time.perf_counter()
        if self.key in IN_MEMORY:
            self.pipe = build_pipeline(self.key, self.run.device, self.run.smoke)
            record["built_in_memory_s"] = time.perf_counter() - began
            return
        self.path = save_model(self.run, self.key)
        record["path"] = str(self.path)
        record["size_gib"] = _folder_gib(self.path)
        record["save_s"] = time.perf_counter() - began

    def _plain_pipeline(self) -> Any:
        if self.pipe is not None:
            return self.pipe
        assert self.path is not None
        cls = adapter_for(self.workload.family).pipeline_class()
        pipe = cls.from_pretrained(
            self.path, dtype=self.workload.dtype, use_safetensors=True, local_files_only=True
        ).to(self.run.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _image(self, pipe: Any, seed: int) -> Any:
        w = self.workload
        return pipe(
            prompt=PROMPT,
            num_inference_steps=self.steps,
            guidance_scale=GUIDANCE[self.key],
            height=w.height,
            width=w.width,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pil",
        ).images[0]

    def plain_eager(self, record: dict[str, Any]) -> None:
        began = time.perf_counter()
        pipe = self._plain_pipeline()
        record["load_s"] = time.perf_counter() - began
        seeds = iter(range(100))
        timing = measure.wall(lambda: self._image(pipe, next(seeds)), self.run.device, self.repeats, warmup=1)
        self.eager_s = timing["median"]
        self.row("diffusers pipeline, eager (SDPA)", "baseline", timing)

    def by_hand_compile(self, record: dict[str, Any]) -> None:
        """UNet and VAE decode under ``torch.compile(mode="reduce-overhead")``, as a user would."""
        pipe = self._plain_pipeline()
        mode = "reduce-overhead" if self.run.device.startswith("cuda") else "default"
        pipe.unet = torch.compile(pipe.unet, mode=mode)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode)
        began = time.perf_counter()
        self._image(pipe, 0)
        record["first_image_s"] = time.perf_counter() - began
        began = time.perf_counter()
        self._image(pipe, 1)
        record["second_image_s"] = time.perf_counter() - began
        seeds = iter(range(2, 100))
        timing = measure.wall(lambda: self._image(pipe, next(seeds)), self.run.device, self.repeats, warmup=0)
        self.by_hand_s = timing["median"]
        self.row(
            f'diffusers + by-hand torch.compile(mode="{mode}") on UNet and VAE decode',
            "baseline",
            timing,
            compile_s=record["first_image_s"],
        )
        for row in self.rows:
            if "s" in row and "speedup_vs_by_hand" not in row:
                row["speedup_vs_by_hand"] = self.by_hand_s / row["s"]

    def _engine(self, record: dict[str, Any]) -> tuple[Any, Any]:
        """The engine and its loaded model: started on the saved folder, or (``IN_MEMORY``) composed
        on the in-memory pipeline with ``compose_model``, measured at the workload's batch."""
        from diffstack.config import load_settings
        from diffstack.engine import Engine
        from diffstack.engine.loading import ModelCard
        from diffstack.engine.model import compose_model
        from diffstack.plugins import load_plugins

        cache = self.run.work / "compile-cache"
        options = compile_options(self.run, cache, self.smoke_compile, fp8=self.key in IN_MEMORY)
        plugins: dict[str, Any] = {"options": {"torch_compile": options}}
        if not self.compile_ok:
            plugins["deny"] = ["torch_compile"]
        began = time.perf_counter()
        if self.pipe is None:
            assert self.path is not None
            engine_section = {"models_dir": str(self.path.parent), "default_model": self.key}
            engine = Engine.start(load_settings(None, engine=engine_section, plugins=plugins))
            record["engine_start_s"] = time.perf_counter() - began
            return engine, engine.model()
        w = self.workload
        compose = {"measure": "always", "batch": w.batch, "decisions_dir": None}
        settings = load_settings(None, compose=compose, plugins=plugins)
        engine = Engine(settings, load_plugins(settings.plugins))
        card = ModelCard(weights="random", default_width=w.width, default_height=w.height)
        loaded = compose_model(
            self.key, Path(f"in-memory/{self.key}"), self.pipe, w.family, card, engine.host, settings
        )
        record["engine_start_s"] = time.perf_counter() - began
        return engine, loaded

    def engine(self, record: dict[str, Any]) -> None:
        from diffstack.engine import GenerationJob, GenerationRequest, GenerationResult
        from diffstack.engine.run import run_batch

        engine, loaded = self._engine(record)
        report = loaded.report
        record["chosen"] = {k: list(v) for k, v in report.summary().items()}
        for slot in ("compile_model", "compile_vae"):
            if slot not in report.summary():
                continue
            record[f"{slot}_candidates"] = [
                {
                    "offer": c.offer,
                    "status": c.status.value,
                    "time_ms": c.time_ms,
                    "setup_s": c.setup_s,
                    "error": c.numeric_error,
                    "reason": c.reason,
                    "notes": list(c.notes),
                }
                for c in report.slot(slot).candidates
            ]
        w = self.workload
        timings: list[dict[str, float]] = []
        last: list[Any] = []

        def image(seed: int, prompt: str = PROMPT, wrappers: dict[str, Any] | None = None) -> None:
            request = engine.prepare(
                GenerationRequest(
                    prompt=prompt,
                    seeds=(seed,),
                    steps=self.steps,
                    width=w.width,
                    height=w.height,
                    wrappers=wrappers or {},
                ),
                model=loaded,
            )
            (result,) = run_batch(loaded, [GenerationJob(request)])
            if not isinstance(result, GenerationResult):
                raise RuntimeError(f"generation failed: {result}")
            timings.append(dict(result.timings))
            last[:] = [result]

        began = time.perf_counter()
        image(0)
        record["first_image_s"] = time.perf_counter() - began
        seeds = iter(range(1, 100))
        timing = measure.wall(lambda: image(next(seeds)), self.run.device, self.repeats, warmup=0)
        record["timings"] = timings[-self.repeats :]
        chosen = "; ".join(f"{slot}: {', '.join(v)}" for slot, v in record["chosen"].items() if v)
        self.row("diffstack Engine (composed stack; prompt cache hit)", "stack", timing, notes=chosen)

        prompts = iter(f"{PROMPT}, variation {i}" for i in range(100))
        miss = measure.wall(lambda: image(next(seeds), next(prompts)), self.run.device, 2, warmup=0)
        self.row("diffstack Engine, new prompt each time (prompt cache miss)", "stack", miss)

        image_result = last[0].images[0].image
        buffer = io.BytesIO()
        began = time.perf_counter()
        image_result.save(buffer, format="PNG")
        record["png_encode_s"] = time.perf_counter() - began
        record["png_bytes"] = buffer.tell()

        if "deepcache" in loaded.stack.wrappers:
            options = {"deepcache": {"interval": 3}}
            began = time.perf_counter()
            image(next(seeds), wrappers=options)  # on the compiled UNet: compiles its two graphs
            record["deepcache_first_image_s"] = time.perf_counter() - began
            cached = measure.wall(
                lambda: image(next(seeds), wrappers=options),
                self.run.device,
                max(2, self.repeats - 2),
                warmup=0,
            )
            where = "compiled UNet" if last[0].stack.get("compile_model") else "eager UNet"
            self.row(f"diffstack Engine + deepcache interval 3 (per request; {where})", "offer", cached)
        stats = engine.stats()
        record["engine_stats"] = stats

    def gpu_note(self, record: dict[str, Any]) -> None:
        if self.run.device.startswith("cuda"):
            record["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def e2e_stage(run: Run, key: str, smoke_compile: bool = False) -> Any:
    def body(record: dict[str, Any]) -> None:
        bench = EndToEnd(run, key, smoke_compile)
        w = bench.workload
        record["workload"] = {
            "label": f"{w.label.split(' UNet')[0].split(' transformer')[0]} {w.width}x{w.height}, "
            f"{bench.steps} steps, guidance {GUIDANCE[key]}, 1 image, PIL output",
            "steps": bench.steps,
        }
        record["rows"] = bench.rows
        parts: dict[str, Any] = {}
        record["parts"] = parts

        def part(name: str, fn: Any, needed: bool = False) -> bool:
            result = run.part(parts, name, ESTIMATES.get(name, {}).get(key, 5), fn)
            if needed and result["status"] != "ok":
                raise RuntimeError(
                    f"{name} {result['status']}: {result.get('error') or result.get('reason')}"
                )
            return result["status"] == "ok"

        part("save", bench.save, needed=True)  # IN_MEMORY workloads: built, not saved
        part("plain_eager", bench.plain_eager)
        part("engine", bench.engine)
        from bench.harness import release_memory

        release_memory()
        if key == "sd15" and bench.compile_ok:
            part("by_hand_compile", bench.by_hand_compile)
        elif key == "sd15":
            parts["by_hand_compile"] = {"status": "skipped", "reason": "smoke run without --smoke-compile"}
        part("gpu_note", bench.gpu_note)
        log(
            f"[done] e2e {key}: "
            + ", ".join(f"{r['variant'][:32]}={r['s']:.3f}s" for r in bench.rows if "s" in r)
        )

    return body
