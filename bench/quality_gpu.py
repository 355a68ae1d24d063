"""quality: what each optimization costs in picture quality, priced on the GPU on both trained models.

Every row is `diffstack quality`'s measurement (the same ``engine_generator`` and ``evaluate`` over the
same fixed prompts): a real engine, plugins composed as the server composes them, images read back by
the synthetic world's analyser. Per row: attribute accuracy, the share of images with all five
attributes right, the mean pixel error against the exact rendering (0-255 levels), PSNR and time per
image (batch 16, after one untimed warm-up image; compiled rows also after one untimed batch of 16, so
no compile or CUDA-graph recording is timed). Models: the embedded ``synthetic-shapes-64`` (SD1.5
UNet) and ``synthetic-shapes-flux`` (FLUX transformer).

Engines, each composed once (``compose.measure = never``: each slot takes its best-ranked offer that
passes the host's checks), each loading only the models it has rows for:

- ``eager``: SDPA, the eager denoiser, the schedules, DeepCache and the first-block cache;
- ``compiled``: the same with ``torch_compile`` in place of ``eager``, so the denoiser and the VAE
  decode compile (with ``eager`` allowed its priority 0 beats ``torch_compile``'s -10 unmeasured, and
  the "compiled" rows ran eager: 2026-12-01's first run). DeepCache and the first-block cache run on
  the compiled denoiser (issue 11 item 1);
- ``sage``: the eager stack with SageAttention in place of SDPA, whatever ``sageattention`` the run's
  environment has (1.0.6 from the carried wheels);
- ``sage2`` and ``sparge``: the same with SageAttention 2.x and SpargeAttn from the built wheels
  (``bench/attn_shapes.py``'s :func:`~bench.attn_shapes.kernel_site`), in a child process with them
  first on the path (1.x and 2.x share an import name). No wheels: their rows are skipped, saying so.

Each engine's composed stack is checked against what its rows claim (:func:`stack_gaps`): a compiled
engine whose denoiser or VAE decode did not compile, or a kernel engine whose kernel serves no shape of
a model, prices nothing there; those rows say why (status ``error``, a "not priced" line in the table).

``quality:GROUP+GROUP`` runs only those groups (:data:`GROUPS`: an engine's name, or ``flow_low``
for the 2- and 4-step flow rows); naming a model (``sd64``, ``flux``) keeps only its rows.
A ``--smoke`` run uses 4 prompts x 1 seed on the CPU (where no
compile or kernel offer runs, so those rows come out not priced); where ``synthetic-shapes-flux`` is
not shipped yet it scores a randomly initialised model of its config instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Budget, Run, compile_options, log, release_memory
from diffstack.types import SlotReport

ROOT = Path(__file__).resolve().parents[1]
SD, FLUX = "synthetic-shapes-64", "synthetic-shapes-flux"
BASE_PLUGINS = ["sdpa", "schedules", "plain_encoder", "eager", "deepcache", "first_block_cache"]
KERNEL_BASE = [p for p in BASE_PLUGINS if p != "sdpa"]
ENGINES: dict[str, list[str]] = {
    "eager": BASE_PLUGINS,
    "compiled": [*(p for p in BASE_PLUGINS if p != "eager"), "torch_compile"],
    "sage": [*KERNEL_BASE, "sage"],
    "sage2": [*KERNEL_BASE, "sage"],
    "sparge": [*KERNEL_BASE, "sparge"],
}
CHILD_ENGINES = ("sage2", "sparge")
"""Engines whose kernels come from the built wheels: they run in a child process (see the docstring)."""
REQUIRED: dict[str, dict[str, str]] = {
    "compiled": {"compile_model": "torch_compile", "compile_vae": "torch_compile_vae"},
    "sage": {"select_attention": "sage"},
    "sage2": {"select_attention": "sage"},
    "sparge": {"select_attention": "sparge"},
}
"""Per engine, the offer each slot must have chosen for its rows to be what their labels say."""
GROUPS = (*ENGINES, "flow_low")
"""What ``quality:A+B`` may name: an engine (all its rows) or a group of rows."""
MODEL_NAMES = {"sd64": SD, "flux": FLUX}
"""``quality:A+B`` may also name models: only their rows run (``quality:compiled+flux``)."""
FBC_THRESHOLDS = (0.03, 0.05, 0.08, 0.12, 0.2)
FBC_COMPILED_THRESHOLDS = (0.05, 0.08, 0.12)
DEEPCACHE_INTERVALS = (2, 3, 4, 5)
FLOW_STEPS = (2, 4, 8, 12, 20)
FLOW_LOW = (2, 4)
ROW_S = 6.0
"""GPU seconds a row of 96 images needs at most (the models are tiny): the budget check's estimate."""
RECOMPILE_S = 15.0
"""Added to a compiled row's estimate for each thing it is first to run at batch 16 (the model's VAE
decode, marked dynamic from batch 2 up; a cache's compiled variant): a recompile each."""
ENGINE_S = {"eager": 25.0, "compiled": 120.0, "sage": 30.0, "sage2": 15.0, "sparge": 15.0, "kernels": 35.0}
"""GPU seconds to start each engine with both models, half that with one (imports, loading, composing,
compiling: on an H200 the four compiles took 78 s of the compiled engine's 90 s start on 2026-12-01, and
its warm-up now also compiles DeepCache's shallow step and the first-block cache's per-block regions);
``kernels``: the child process (imports, the wheels' install) with its engines, rows apart."""
FP8_REASON = (
    "not priced: torch_compile_fp8 cannot be pinned by the host's settings (no per-offer deny; unmeasured, "
    "torch_compile's priority -10 beats its -20, and a measured choice would pick by speed, not by the "
    "row's label), and with fp8_min_features = 1024 no Linear layer of the tiny FLUX model (width 192, "
    "MLP 768) would take fp8 GEMMs"
)


@dataclass(frozen=True)
class Variant:
    model: str
    label: str
    config: dict[str, Any]
    engine: str
    group: str = ""
    """A row group besides the engine that ``quality:GROUP`` selects (``flow_low``)."""
    unpriced: str = ""
    """Why this row cannot be priced at all: recorded as skipped, with this reason."""

    @property
    def counts_cache_hits(self) -> bool:
        """Rows with the first-block cache report its hit rate."""
        return "first_block_cache" in self.config.get("wrappers", {})


@dataclass
class Plan:
    variants: list[Variant] = field(default_factory=list)

    def add(
        self, model: str, label: str, engine: str, group: str = "", unpriced: str = "", **config: Any
    ) -> None:
        self.variants.append(Variant(model, label, config, engine, group, unpriced))


def plan() -> list[Variant]:
    """Every row, by engine; the most wanted rows first inside each engine."""
    p = Plan()
    for steps in FLOW_STEPS[::-1]:
        group = "flow_low" if steps in FLOW_LOW else ""
        p.add(FLUX, f"dense, flow euler {steps}, default schedule", "eager", group, steps=steps,
              schedule="default")  # fmt: skip
        p.add(FLUX, f"dense, flow euler {steps}, flow_arcsine (ours)", "eager", group, steps=steps,
              schedule="flow_arcsine")  # fmt: skip
    for threshold in FBC_THRESHOLDS:
        p.add(FLUX, f"first-block cache {threshold:g}, flow euler 20", "eager", steps=20, schedule="default",
              wrappers={"first_block_cache": {"threshold": threshold}})  # fmt: skip
    p.add(SD, "dense, euler 20", "eager", steps=20, schedule="default")
    p.add(SD, "compiled, euler 20", "compiled", steps=20, schedule="default")
    p.add(FLUX, "compiled, flow euler 20", "compiled", steps=20, schedule="default")
    for threshold in FBC_COMPILED_THRESHOLDS:
        p.add(FLUX, f"compiled + first-block cache {threshold:g}, flow euler 20", "compiled", steps=20,
              schedule="default", wrappers={"first_block_cache": {"threshold": threshold}})  # fmt: skip
    for interval in DEEPCACHE_INTERVALS:
        p.add(SD, f"compiled + DeepCache {interval}, euler 20", "compiled", steps=20, schedule="default",
              wrappers={"deepcache": {"interval": interval}})  # fmt: skip
    p.add(FLUX, "compiled fp8 GEMMs, flow euler 20", "compiled", unpriced=FP8_REASON)
    for model, steps in ((SD, "euler 20"), (FLUX, "flow euler 20")):
        p.add(model, f"SageAttention, {steps}", "sage", steps=20, schedule="default")
        p.add(model, f"SageAttention 2, {steps}", "sage2", steps=20, schedule="default")
        p.add(model, f"SpargeAttn (topk 0.5), {steps}", "sparge", steps=20, schedule="default")
    return p.variants


def selected(variants: list[Variant], only: set[str] | None) -> list[Variant]:
    """The rows ``quality:A+B`` names (every row when ``only`` is None); an unknown name is refused."""
    if only is None:
        return variants
    unknown = sorted(only - set(GROUPS) - set(MODEL_NAMES))
    if unknown:
        known = ", ".join([*GROUPS, *MODEL_NAMES])
        raise ValueError(f"unknown quality group(s) {', '.join(unknown)}; known: {known}")
    models = {MODEL_NAMES[name] for name in only & set(MODEL_NAMES)} or {SD, FLUX}
    groups = only - set(MODEL_NAMES)
    return [
        v for v in variants if v.model in models and (not groups or v.engine in groups or v.group in groups)
    ]


def stack_gaps(engine: str, slots: Iterable[SlotReport]) -> list[str]:
    """What ``engine``'s rows claim (:data:`REQUIRED`) that a model's composed stack lacks, each with
    the required offer's fate from the report: empty when the stack is what the rows say."""
    by_slot = {report.slot: report for report in slots}
    gaps = []
    for slot, offer in REQUIRED.get(engine, {}).items():
        report = by_slot.get(slot)
        # Attention chooses per shape ("h3xd64 q16 k16: sdpa"): the offer names, each once.
        chosen = dict.fromkeys(entry.rpartition(": ")[2] for entry in (report.chosen if report else ()))
        if offer in chosen:
            continue
        fates = dict.fromkeys(
            f"{c.status}" + (f" ({c.reason})" if c.reason else "")
            for c in (report.candidates if report is not None else ())
            if c.offer == offer
        )
        said = "; ".join(list(fates)[:3]) or "not offered (plugin not loaded?)"
        gaps.append(f"{slot} has no {offer} (chose {', '.join(chosen) or 'none'}): {offer} {said}")
    return gaps


def quality_stage(
    run: Run, only: set[str] | None = None, in_child: bool = False, smoke_compile: bool = False
) -> Callable[[dict[str, Any]], None]:
    """The stage body: ``only`` the groups ``quality:A+B`` names (all when None). ``in_child``: this
    process is the kernel child (``python -m bench.quality_gpu``), which runs :data:`CHILD_ENGINES`.
    ``smoke_compile``: a smoke run compiles on the CPU too (``--smoke-compile``; minutes)."""

    def body(record: dict[str, Any]) -> None:
        from diffstack.synthetic.quality import fixed_scenes

        variants = selected(plan(), only)
        scenes = fixed_scenes(4 if run.smoke else 48)
        seeds = (0,) if run.smoke else (0, 1)
        models_dir = _flux_stand_in(run)
        record.update(scenes=len(scenes), seeds=list(seeds), rows=[], unpriced=[], stacks={}, table=[])
        record["parts"] = {}
        for variant in variants:
            if variant.unpriced:
                _unpriced(record, variant, variant.unpriced, "skipped")
        variants = [v for v in variants if not v.unpriced]
        kernels = [v for v in variants if v.engine in CHILD_ENGINES]
        # The compiled engine before the kernel child: under a short budget its rows are the wanted ones.
        order = [*CHILD_ENGINES] if in_child else ["eager", "sage", "compiled", "kernels"]
        for kind in order:
            if kind == "kernels" and kernels:
                _kernel_child(run, kernels, record)
            mine = [v for v in variants if v.engine == kind]
            if mine:
                _engine(run, kind, mine, models_dir, (scenes, seeds), record, smoke_compile)
                release_memory()  # the engine is gone with _engine's frame: free its memory
        record["table"] = table(record["rows"], record["unpriced"], record["stacks"])
        record["headline"] = headline(record["rows"])

    return body


def _engine(
    run: Run,
    kind: str,
    mine: list[Variant],
    models_dir: Path | None,
    prompts: Any,
    record: dict[str, Any],
    smoke_compile: bool,
) -> None:
    """Start ``kind``'s engine, check each model's stack against :data:`REQUIRED`, score its rows."""
    parts = record["parts"]
    holder: dict[str, Any] = {"gaps": {}}
    models = [name for name in (SD, FLUX) if any(v.model == name for v in mine)]
    started = run.part(parts, f"{kind} engine", ENGINE_S[kind] * len(models) / 2,
                       lambda r: _start(run, kind, models, models_dir, holder, r, smoke_compile))  # fmt: skip
    if "engine" not in holder:
        reason = f"{kind} engine {started.get('status')}: {started.get('error') or started.get('reason', '')}"
        for variant in mine:
            _unpriced(record, variant, reason, "skipped")
        return
    engine = holder["engine"]
    record["stacks"][kind] = started.get("stacks", {})
    first_runs: set[str] = set()
    for variant in mine:
        gap = holder["gaps"].get(variant.model)
        if gap:
            _unpriced(record, variant, gap, "error")
            continue
        runs = {variant.model, *(f"{variant.model} {name}" for name in variant.config.get("wrappers", {}))}
        recompiles = len(runs - first_runs) if kind == "compiled" else 0
        first_runs |= runs
        done = run.part(parts, f"{variant.model}: {variant.label}", ROW_S + RECOMPILE_S * recompiles,
                        lambda r, v=variant: _score(engine, v, *prompts, record, r))  # fmt: skip
        if done["status"] != "ok":  # skipped by the budget, or failed: the table says so too
            _in_table(record, variant, f"{done['status']}: {done.get('error') or done.get('reason')}")


def _unpriced(record: dict[str, Any], variant: Variant, reason: str, status: str) -> None:
    """A row that measured nothing: its part says why (``error``: the stack is not what the label
    claims; ``skipped``: it could not run here), and so does the table."""
    key = "error" if status == "error" else "reason"
    record["parts"][f"{variant.model}: {variant.label}"] = {"status": status, key: reason}
    _in_table(record, variant, reason)
    if status == "error":
        log(f"[error] quality: {variant.model}: {variant.label}: {reason}")


def _in_table(record: dict[str, Any], variant: Variant, reason: str) -> None:
    record["unpriced"].append(
        {"model": variant.model, "variant": variant.label, "engine": variant.engine, "reason": reason}
    )


def _kernel_child(run: Run, variants: list[Variant], record: dict[str, Any]) -> None:
    """The :data:`CHILD_ENGINES` rows, scored by a child process with the built wheels (SageAttention
    2, SpargeAttn) first on its path; its rows, stacks and parts join this stage's."""
    from bench.attn_shapes import kernel_site, run_child

    engines = [kind for kind in CHILD_ENGINES if any(v.engine == kind for v in variants)]
    models = {v.model for v in variants}
    groups = engines + [token for token, name in MODEL_NAMES.items() if models == {name}]
    found: dict[str, Any] = {}
    try:
        site = kernel_site(run, None, found)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # the other engines' rows stand
        record["wheels"] = found.get("wheels", {})
        for variant in variants:
            _unpriced(record, variant, f"the kernel wheels did not install: {str(exc)[-300:]}", "skipped")
        return
    record["wheels"] = found["wheels"]
    environment = found["wheels"]["environment_sageattention"] or "1."
    if site is None and environment.startswith("1.") and not run.smoke:
        # A smoke run goes on without wheels: the child's plumbing runs, its kernels decline the CPU.
        for variant in variants:
            _unpriced(record, variant, f"skipped: {found['wheels'].get('note', 'no 2.x kernels')}", "skipped")
        return
    estimate = ENGINE_S["kernels"] + ROW_S * len(variants)
    out = run.out / "quality-kernels"
    child = run.part(record["parts"], f"kernel child ({'+'.join(engines)})", estimate,
                     lambda r: run_child(run, "bench.quality_gpu", ["--groups", "+".join(groups)], out, site,
                                         min(2 * estimate, run.budget.left() - 5), r))  # fmt: skip
    stage = child.pop("results", {}).get("stages", {}).get("quality", {})
    for key in ("rows", "unpriced"):
        record[key] += stage.get(key, [])
    record["stacks"].update(stage.get("stacks", {}))
    record["parts"].update(stage.get("parts", {}))
    done = {(r["model"], r["variant"]) for r in stage.get("rows", []) + stage.get("unpriced", [])}
    for variant in variants:
        if (variant.model, variant.label) not in done:
            said = [child.get(k) or stage.get(k) for k in ("error", "reason")]
            reason = f"kernel child {stage.get('status') or child.get('status')}: {said[0] or said[1] or ''}"
            _unpriced(record, variant, reason, "skipped")


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
    run: Run,
    kind: str,
    models: list[str],
    models_dir: Path | None,
    holder: dict[str, Any],
    record: dict[str, Any],
    smoke_compile: bool,
) -> None:
    """Start the engine and load ``models`` on it (only those with rows to score: each costs compiles)."""
    from diffstack.cli import stack_summary
    from diffstack.config import load_settings
    from diffstack.engine import Engine
    from diffstack.plugins import load_plugins

    options = {"torch_compile": compile_options(run, run.work / "inductor-quality", smoke_compile)}
    engine_settings: dict[str, Any] = {"device": run.device, "models_dir": models_dir}
    settings = load_settings(
        None,
        engine=engine_settings,
        compose={"measure": "never", "decisions_dir": None},
        plugins={"allow": ENGINES[kind], "options": options},
    )
    began = time.perf_counter()
    engine = Engine.start(settings, load_plugins(settings.plugins))
    stacks, gaps = {}, {}
    kernel = _kernel_version(kind)
    for name in models:
        try:
            model = engine.model(name)
        except Exception as exc:  # a model that cannot load loses its rows, not the other model's
            stacks[name] = f"not loaded: {type(exc).__name__}: {exc}"
            holder["gaps"][name] = stacks[name]
            log(f"quality: {kind} engine, {name}: {stacks[name]}")
            continue
        stacks[name] = stack_summary({s.slot: s.chosen for s in model.report.slots})
        log(f"quality: {kind} engine, {name}: {stacks[name]}")
        found = stack_gaps(kind, model.report.slots)
        if kind == "sage2" and not kernel.startswith("sageattention 2."):
            found.insert(0, f"SageAttention 2.x does not import here ({kernel})")
        if found:
            runs = "eager" if kind == "compiled" else f"SDPA: {kernel} serves no shape of {name}"
            gaps[name] = holder["gaps"][name] = f"not priced, the stack runs {runs}: {'; '.join(found)}"
            log(f"[error] quality: {kind} engine, {name}: {gaps[name]}")
    record.update(stacks=stacks, start_s=round(time.perf_counter() - began, 1))
    if kernel:
        record["kernel"] = kernel
    if gaps:  # loud: the engine is not what its rows' labels say (those rows are marked error)
        record.update(status="error", gaps=gaps)
    holder["engine"] = engine


def _kernel_version(kind: str) -> str:
    """The attention kernel's distribution and version as this process imports it ('' for none)."""
    from importlib.metadata import PackageNotFoundError, version

    name = {"sage": "sageattention", "sage2": "sageattention", "sparge": "spas_sage_attn"}.get(kind)
    if name is None:
        return ""
    try:
        return f"{name} {version(name)}"
    except PackageNotFoundError:
        return f"{name} (not installed)"


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
    for name in variant.config.get("wrappers", {}):
        offer = model.stack.wrappers.get(name)
        if offer is None or (variant.engine == "compiled" and not offer.on_compiled):
            # Either would run the row without the wrapper, or on the eager denoiser: not what it says.
            raise RuntimeError(f"{name} is {'not offered' if offer is None else 'eager only'} on this stack")
    if variant.engine == "compiled":
        # evaluate's warm-up is one image: compile and record CUDA graphs at the timed batch too, untimed.
        prompts = [scene.prompt() for scene in scenes][:16]
        generate(prompts, [seeds[0]] * len(prompts), **variant.config, batch_size=16)
    with _block_calls(model.denoiser_for(with_wrappers=False), variant.counts_cache_hits) as calls:
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
def _block_calls(denoiser: Any, wanted: bool) -> Iterator[dict[str, int] | None]:
    """Count the first and the last transformer block's own ``forward`` calls. The first-block cache
    calls every block through diffusers' hooks, but a block it skips never runs its own forward, so
    1 - last/first is the share of steps served from cache. On a compiled transformer the cache runs
    its regionally compiled copy (the plugin's ``regional_twin``, made once): those blocks are counted."""
    if not wanted:
        yield None
        return
    from diffstack_first_block_cache.compiled import is_compiled, regional_twin

    transformer = regional_twin(denoiser) if is_compiled(denoiser) else denoiser
    blocks = list(getattr(transformer, "transformer_blocks", [])) + list(
        getattr(transformer, "single_transformer_blocks", [])
    )
    if len(blocks) < 2:
        yield None
        return
    calls = {"first": 0, "last": 0}
    own = [(block, vars(block).get("forward")) for block in (blocks[0], blocks[-1])]
    for (block, _), key in zip(own, calls, strict=True):
        block.forward = _counted(block.forward, calls, key)
    try:
        yield calls
    finally:
        for block, forward in own:
            if forward is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = forward


def _counted(forward: Callable[..., Any], calls: dict[str, int], key: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        calls[key] += 1
        return forward(*args, **kwargs)

    return run


def table(
    rows: list[dict[str, Any]], unpriced: list[dict[str, Any]], stacks: dict[str, dict[str, str]]
) -> list[str]:
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
    for u in unpriced:
        reason = u["reason"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {u['model']} | {u['variant']} | – | {reason} | – | – | – | – | |")
    lines.append("")
    for kind, per_model in stacks.items():
        for model, stack in per_model.items():
            lines.append(f"- {kind} engine, {model}: {stack}")
    return lines


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of the dense stacks, the flow schedule against the default at 2-20 steps, each cache's
    accuracy cost and hit rate (eager and compiled), and each attention kernel's accuracy."""
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
    for threshold in FBC_COMPILED_THRESHOLDS:
        label = f"compiled + first-block cache {threshold:g}, flow euler 20"
        put(f"quality_flux_compiled_fbc_{threshold:g}_accuracy", FLUX, label)
        put(f"quality_flux_compiled_fbc_{threshold:g}_hit_rate", FLUX, label, "cache_hit_rate")
        put(f"quality_flux_compiled_fbc_{threshold:g}_ms_per_image", FLUX, label, "ms_per_image")
    for interval in DEEPCACHE_INTERVALS:
        put(f"quality_sd64_deepcache_{interval}_accuracy", SD, f"compiled + DeepCache {interval}, euler 20")
    put("quality_sd64_compiled_accuracy", SD, "compiled, euler 20")
    put("quality_sd64_compiled_ms_per_image", SD, "compiled, euler 20", "ms_per_image")
    put("quality_flux_compiled_accuracy", FLUX, "compiled, flow euler 20")
    put("quality_flux_compiled_ms_per_image", FLUX, "compiled, flow euler 20", "ms_per_image")
    for key, kernel in (
        ("sage", "SageAttention"),
        ("sage2", "SageAttention 2"),
        ("sparge", "SpargeAttn (topk 0.5)"),
    ):
        put(f"quality_sd64_{key}_accuracy", SD, f"{kernel}, euler 20")
        put(f"quality_flux_{key}_accuracy", FLUX, f"{kernel}, flow euler 20")
    return found


def main(argv: list[str] | None = None) -> int:
    """The kernel child: the quality stage's :data:`CHILD_ENGINES` rows, results in ``--out``."""
    parser = argparse.ArgumentParser(description="quality's kernel child (run by the quality stage)")
    parser.add_argument("--groups", required=True, help="engines to run, e.g. sage2+sparge")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    budget = Budget(args.budget_s)
    command = " ".join([sys.executable, "-m", "bench.quality_gpu", *(argv or sys.argv[1:])])
    run = Run(args.out, args.work, budget, args.smoke, args.device, command)
    try:
        run.stage("quality", 10, quality_stage(run, set(args.groups.split("+")), in_child=True))
    finally:
        run.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
