"""quality: what each optimization costs in picture quality, priced on the GPU on both trained models.

Every row is `diffstack quality`'s measurement (the same ``engine_generator`` and ``evaluate`` over the
same fixed prompts): a real engine, plugins composed as the server composes them, images read back by
the synthetic world's analyser. Per row: attribute accuracy, the share of images with all five
attributes right, the mean pixel error against the exact rendering (0-255 levels), PSNR and time per
image (batch 16, after one untimed warm-up image). Models: the embedded ``synthetic-shapes-64`` (SD1.5
UNet) and ``synthetic-shapes-flux`` (FLUX transformer).

Three engines, each composed once, both models loaded on each:

- ``eager``: SDPA, the eager denoiser, the schedules, DeepCache and the first-block cache;
- ``compiled``: the same plus ``torch_compile`` (DeepCache runs on the compiled UNet; the first-block
  cache runs on the eager transformer, as the plugin says, so its rows come from the eager engine);
- ``sage``: the eager stack with SageAttention in place of the SDPA offer (whatever sageattention is
  installed; 1.x serves UNets only, so on FLUX the stack says SDPA and the row is marked so).

A ``--smoke`` run uses 4 prompts x 1 seed on the CPU; where ``synthetic-shapes-flux`` is not shipped
yet it scores a randomly initialised model of its config instead (built by the trainer's exporter).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Run, compile_options, log, release_memory

ROOT = Path(__file__).resolve().parents[1]
SD, FLUX = "synthetic-shapes-64", "synthetic-shapes-flux"
BASE_PLUGINS = ["sdpa", "schedules", "plain_encoder", "eager", "deepcache", "first_block_cache"]
ENGINES: dict[str, list[str]] = {
    "eager": BASE_PLUGINS,
    "compiled": [*BASE_PLUGINS, "torch_compile"],
    "sage": [p for p in BASE_PLUGINS if p != "sdpa"] + ["sage"],
}
FBC_THRESHOLDS = (0.03, 0.05, 0.08, 0.12, 0.2)
DEEPCACHE_INTERVALS = (2, 3, 4, 5)
FLOW_STEPS = (8, 12, 20)
ROW_S = 6.0
"""GPU seconds a row of 96 images needs at most (the models are tiny): the budget check's estimate."""
ENGINE_S = {"eager": 25.0, "compiled": 90.0, "sage": 30.0}
"""GPU seconds to start each engine with both models (imports, loading, composing, compiling)."""


@dataclass(frozen=True)
class Variant:
    model: str
    label: str
    config: dict[str, Any]
    engine: str
    counts_cache_hits: bool = False


@dataclass
class Plan:
    variants: list[Variant] = field(default_factory=list)

    def add(self, model: str, label: str, engine: str, **config: Any) -> None:
        self.variants.append(
            Variant(model, label, config, engine, "first_block_cache" in config.get("wrappers", {}))
        )


def plan() -> list[Variant]:
    """Every row, by engine; the most wanted rows first inside each engine."""
    p = Plan()
    for steps in FLOW_STEPS[::-1]:
        p.add(FLUX, f"dense, flow euler {steps}, default schedule", "eager", steps=steps, schedule="default")
        p.add(FLUX, f"dense, flow euler {steps}, flow_arcsine (ours)", "eager", steps=steps,
              schedule="flow_arcsine")  # fmt: skip
    for threshold in FBC_THRESHOLDS:
        p.add(FLUX, f"first-block cache {threshold:g}, flow euler 20", "eager", steps=20, schedule="default",
              wrappers={"first_block_cache": {"threshold": threshold}})  # fmt: skip
    p.add(SD, "dense, euler 20", "eager", steps=20, schedule="default")
    p.add(SD, "compiled, euler 20", "compiled", steps=20, schedule="default")
    for interval in DEEPCACHE_INTERVALS:
        p.add(SD, f"compiled + DeepCache {interval}, euler 20", "compiled", steps=20, schedule="default",
              wrappers={"deepcache": {"interval": interval}})  # fmt: skip
    p.add(FLUX, "compiled, flow euler 20", "compiled", steps=20, schedule="default")
    p.add(SD, "SageAttention, euler 20", "sage", steps=20, schedule="default")
    p.add(FLUX, "SageAttention, flow euler 20", "sage", steps=20, schedule="default")
    return p.variants


def quality_stage(run: Run) -> Callable[[dict[str, Any]], None]:
    def body(record: dict[str, Any]) -> None:
        from diffstack.synthetic.quality import fixed_scenes

        scenes = fixed_scenes(4 if run.smoke else 48)
        seeds = (0,) if run.smoke else (0, 1)
        models_dir = _flux_stand_in(run)
        record.update(scenes=len(scenes), seeds=list(seeds), rows=[], stacks={}, table=[])
        parts: dict[str, Any] = {}
        record["parts"] = parts
        variants = plan()
        for kind in ENGINES:
            mine = [v for v in variants if v.engine == kind]
            holder: dict[str, Any] = {}
            started = run.part(parts, f"{kind} engine", ENGINE_S[kind],
                               lambda r, k=kind, h=holder: _start(run, k, models_dir, h, r))  # fmt: skip
            if started.get("status") != "ok":
                continue
            engine = holder["engine"]
            record["stacks"][kind] = started.get("stacks", {})
            for variant in mine:
                if variant.model in holder.get("missing", {}):
                    reason = holder["missing"][variant.model]
                    parts[f"{variant.model}: {variant.label}"] = {"status": "skipped", "reason": reason}
                    continue
                run.part(parts, f"{variant.model}: {variant.label}", ROW_S,
                         lambda r, v=variant, e=engine: _score(e, v, scenes, seeds, record, r))  # fmt: skip
            del engine, holder
            release_memory()
        record["table"] = table(record["rows"], record["stacks"])
        record["headline"] = headline(record["rows"])

    return body


TRAINED_HERE = (ROOT / ".gpu-state" / "flux", Path("/tmp/flux"))
"""Where train/train_flux_model.py's GPU runs leave the model (--out .../synthetic-shapes-flux): a run
on the same machine scores that one when the trained model is not committed yet."""


def _flux_stand_in(run: Run) -> Path | None:
    """A models dir holding synthetic-shapes-flux where the package does not ship it yet: the one
    trained on this machine, or in a smoke run a random one of its config; None otherwise."""
    from diffstack.engine.loading import embedded_model_path

    if embedded_model_path(FLUX) is not None:
        return None
    for folder in TRAINED_HERE:
        if (folder / FLUX / "model_index.json").is_file():
            log(f"quality: {FLUX} is not shipped yet; scoring the one trained here, {folder / FLUX}")
            return folder
    if not run.smoke:
        return None
    sys.path.insert(0, str(ROOT / "train"))
    import default_model_spec
    import flux_model_spec
    import torch

    from diffstack.testing import TOKENIZER_DIR

    folder = run.work / "quality-models"
    if not (folder / FLUX / "model_index.json").is_file():
        torch.manual_seed(0)
        files = default_model_spec.load_tokenizer_files(TOKENIZER_DIR)
        flux_model_spec.save_pipeline(folder / FLUX, flux_model_spec.build_models(), files, 0.0, 1.0)
        card = {"weights": "random", "default_width": 64, "default_height": 64, "default_steps": 20}
        (folder / FLUX / "diffstack.json").write_text(json.dumps(card))
    log(f"quality: {FLUX} is not shipped yet; the smoke run scores a random model of its config")
    return folder


def _start(
    run: Run, kind: str, models_dir: Path | None, holder: dict[str, Any], record: dict[str, Any]
) -> None:
    from diffstack.cli import stack_summary
    from diffstack.config import load_settings
    from diffstack.engine import Engine
    from diffstack.plugins import load_plugins

    options = {"torch_compile": compile_options(run, run.work / "inductor-quality", False)}
    engine_settings: dict[str, Any] = {"device": run.device, "models_dir": models_dir}
    settings = load_settings(
        None,
        engine=engine_settings,
        compose={"measure": "never", "decisions_dir": None},
        plugins={"allow": ENGINES[kind], "options": options},
    )
    began = time.perf_counter()
    engine = Engine.start(settings, load_plugins(settings.plugins))
    stacks = {}
    for name in (SD, FLUX):
        try:
            model = engine.model(name)
        except Exception as exc:  # a model that cannot load loses its rows, not the other model's
            stacks[name] = f"not loaded: {type(exc).__name__}: {exc}"
            holder.setdefault("missing", {})[name] = stacks[name]
            log(f"quality: {kind} engine, {name}: {stacks[name]}")
            continue
        stacks[name] = stack_summary({s.slot: s.chosen for s in model.report.slots})
        log(f"quality: {kind} engine, {name}: {stacks[name]}")
    record.update(stacks=stacks, start_s=round(time.perf_counter() - began, 1))
    holder["engine"] = engine


def _score(
    engine: Any,
    variant: Variant,
    scenes: Any,
    seeds: tuple[int, ...],
    stage: dict[str, Any],
    record: dict[str, Any],
) -> None:
    from diffstack.synthetic.quality import engine_generator, evaluate

    generate = engine_generator(engine, model=variant.model)
    model = engine.model(variant.model)
    with _block_calls(model.denoiser_for(with_wrappers=True), variant.counts_cache_hits) as calls:
        (row,) = evaluate(generate, {variant.label: {**variant.config, "batch_size": 16}}, scenes=scenes,
                          seeds=seeds)  # fmt: skip
    result = {
        "model": variant.model,
        "variant": variant.label,
        "engine": variant.engine,
        "images": row.images,
        "accuracy": round(100 * row.overall, 2),
        "all_right": round(100 * row.exact, 2),
        "pixel_error": round(row.pixel_error, 3),
        "psnr": round(row.psnr, 3),
        "ms_per_image": round(1000 * row.seconds_per_image, 3),
        "by_attribute": {k: round(100 * v, 2) for k, v in row.accuracy.items()},
    }
    if calls is not None and calls["first"]:
        result["cache_hit_rate"] = round(1 - calls["last"] / calls["first"], 4)
    record.update(result)
    stage["rows"].append(result)


@contextlib.contextmanager
def _block_calls(transformer: Any, wanted: bool) -> Iterator[dict[str, int] | None]:
    """Count the first and the last transformer block's attention calls: a block the first-block
    cache skips never calls its attention, so 1 - last/first is the share of steps served from cache."""
    blocks = list(getattr(transformer, "transformer_blocks", [])) + list(
        getattr(transformer, "single_transformer_blocks", [])
    )
    if not wanted or len(blocks) < 2:
        yield None
        return
    calls = {"first": 0, "last": 0}

    def counter(key: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            calls[key] += 1

        return hook

    handles = [blocks[0].attn.register_forward_hook(counter("first")),
               blocks[-1].attn.register_forward_hook(counter("last"))]  # fmt: skip
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def table(rows: list[dict[str, Any]], stacks: dict[str, dict[str, str]]) -> list[str]:
    lines = [
        "| model | configuration | images | accuracy % | all 5 right % | pixel error | PSNR dB | ms/image "
        "| cache hits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hits = f"{100 * r['cache_hit_rate']:.0f}%" if "cache_hit_rate" in r else ""
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['images']} | **{r['accuracy']:.1f}** | "
            f"{r['all_right']:.1f} | {r['pixel_error']:.2f} | {r['psnr']:.2f} | {r['ms_per_image']:.2f} "
            f"| {hits} |"
        )
    lines.append("")
    for kind, per_model in stacks.items():
        for model, stack in per_model.items():
            lines.append(f"- {kind} engine, {model}: {stack}")
    return lines


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of the dense stacks, the flow schedule against the default at 8 steps, and each
    cache's accuracy cost and hit rate."""
    found: dict[str, Any] = {}
    by = {(r["model"], r["variant"]): r for r in rows}

    def put(key: str, model: str, variant: str, unit: str = "accuracy") -> None:
        if (model, variant) in by and unit in by[(model, variant)]:
            found[key] = by[(model, variant)][unit]

    put("quality_sd64_dense_accuracy", SD, "dense, euler 20")
    put("quality_sd64_dense_ms_per_image", SD, "dense, euler 20", "ms_per_image")
    put("quality_flux_dense_accuracy", FLUX, "dense, flow euler 20, default schedule")
    put("quality_flux_dense_ms_per_image", FLUX, "dense, flow euler 20, default schedule", "ms_per_image")
    for steps in FLOW_STEPS:
        put(f"quality_flux_default_{steps}_accuracy", FLUX, f"dense, flow euler {steps}, default schedule")
        put(f"quality_flux_arcsine_{steps}_accuracy", FLUX, f"dense, flow euler {steps}, flow_arcsine (ours)")
    for threshold in FBC_THRESHOLDS:
        label = f"first-block cache {threshold:g}, flow euler 20"
        put(f"quality_flux_fbc_{threshold:g}_accuracy", FLUX, label)
        put(f"quality_flux_fbc_{threshold:g}_hit_rate", FLUX, label, "cache_hit_rate")
    for interval in DEEPCACHE_INTERVALS:
        put(f"quality_sd64_deepcache_{interval}_accuracy", SD, f"compiled + DeepCache {interval}, euler 20")
    put("quality_sd64_compiled_accuracy", SD, "compiled, euler 20")
    put("quality_flux_compiled_accuracy", FLUX, "compiled, flow euler 20")
    put("quality_sd64_sage_accuracy", SD, "SageAttention, euler 20")
    put("quality_flux_sage_accuracy", FLUX, "SageAttention, flow euler 20")
    return found
