"""attn-shapes: every attention kernel on SD1.5's, SDXL's and FLUX's attention shapes (time, error
against float32 SDPA), SpargeAttn at several sparsities, and the whole step with each kernel.

The kernels run in child processes of the benchmark, each writing its own results file:

- ``v1``: the run's own environment (sageattention 1.0.6 from ``.whl/``): SDPA and SageAttention 1.0.6.
- ``v2``: the built wheels (SageAttention 2, SpargeAttn, einops) first on the path: SDPA, each
  SageAttention 2 kernel, SpargeAttn per sparsity setting.
- ``steps``: the same path as ``v2``; per model (FLUX, SDXL, SD1.5) the step stages' own parts
  ``attention_offers`` (each offer alone on the eager step; FLUX through diffusers' backend) and
  ``attention_composed`` (composition's attention slot: checked, timed, the winners installed).

Children, because 1.0.6 and 2.x share one import name (and diffusers decides at import whether its
sage backends work), and because a crashing CUDA kernel must not end the run. Every kernel goes through
the real plugins (``diffstack_sage``, ``diffstack_sparge``): their probes decide what is skipped, and
why, and their wrappers (padding, scale, layouts) are what is timed.

The wheels: ``--kernel-wheels DIR`` (default ``.gpu-state/wheels``, what ``bench/build_kernels.sh``
writes, else ``.gpu-src/built-wheels``) is installed at stage start into the scratch folder (``pip
--target``, offline) unless a SageAttention 2 is importable already; a missing folder leaves the 2.x
kernels skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_WHEELS = (REPO / ".gpu-state" / "wheels", REPO / ".gpu-src" / "built-wheels")
"""Where the built wheels are looked for when ``--kernel-wheels`` is not given: the GPU machine's kept
output of ``bench/build_kernels.sh``, else a copy carried along (both git-ignored)."""
CHILD_ESTIMATES = {"v1": 25.0, "v2": 50.0, "steps": 150.0}
"""Seconds each child needs on an H200 (building the three models dominates ``steps``)."""
CHILD_CAPS = {"v1": 45.0, "v2": 80.0, "steps": 180.0}
"""The most each child may take; ``steps`` skips a model (FLUX, SDXL, SD1.5 in that order) rather than
run past its share."""
STAGE_BUDGET_S = float(os.environ.get("ATTN_SHAPES_BUDGET_S", "240"))
"""The whole stage's bound (about 4 minutes), whatever the run's budget."""
SPARGE_SETTINGS: tuple[dict[str, Any], ...] = (
    {"method": "topk", "topk": 0.25},
    {"method": "topk", "topk": 0.5},
    {"method": "topk", "topk": 0.75},
    {"method": "cdf", "cdfthreshd": 0.9},
    {"method": "cdf", "cdfthreshd": 0.98},
)
"""SpargeAttn's sparsity settings timed per shape: ``topk`` keeps that fraction of key blocks; ``cdf``
keeps blocks up to that share of the attention mass (``simthreshd1``: upstream's default per method)."""
SPARGE_HEADLINE = "sparge_topk0.5"
SAGE2_KERNELS = ("auto", "fp8_sm90", "fp8_cuda", "fp16_cuda", "fp16_triton")


@dataclass(frozen=True)
class Shape:
    """One attention call as the model makes it (SDPA layout: batch, heads, length, head dim)."""

    name: str
    batch: int
    heads: int
    query_len: int
    key_len: int
    head_dim: int
    bf16: bool = False


SHAPES = (
    Shape("sd15_self_4096", 2, 8, 4096, 4096, 40),  # SD1.5 512²: 64x64 latent, 320 channels
    Shape("sd15_cross_4096", 2, 8, 4096, 77, 40),
    Shape("sd15_self_1024", 2, 8, 1024, 1024, 80),  # 32x32 level
    Shape("sd15_self_256", 2, 8, 256, 256, 160),  # 16x16 level: no 8-bit kernel serves d160
    Shape("sdxl_self_4096", 2, 10, 4096, 4096, 64),  # SDXL 1024²: 64x64 level, 640 channels
    Shape("sdxl_cross_4096", 2, 10, 4096, 77, 64),
    Shape("sdxl_self_1024", 2, 20, 1024, 1024, 64),  # 32x32 level, 1280 channels
    Shape("sdxl_cross_1024", 2, 20, 1024, 77, 64),
    Shape("flux_joint", 1, 24, 4608, 4608, 128, bf16=True),  # FLUX 1024²: 4096 image + 512 text tokens
)
HEADLINE_SHAPES = ("flux_joint", "sdxl_self_4096", "sdxl_self_1024", "sd15_self_4096", "sdxl_cross_4096")
"""Shapes whose times (and errors) go into the run's headline."""


# -- the stage (parent process) ----------------------------------------------------------------------


def attn_shapes_stage(run: Any, wheels: Path | None) -> Any:
    """The stage body: install the wheels, run the three children, collect their results."""
    from bench.harness import log

    def body(record: dict[str, Any]) -> None:
        parts: dict[str, Any] = {}
        record["parts"] = parts
        ends = time.monotonic() + STAGE_BUDGET_S
        site = kernel_site(run, wheels, record)
        for mode in ("v1", "v2", "steps"):
            path = None if mode == "v1" else site
            allowed = min(CHILD_CAPS[mode], ends - time.monotonic(), run.budget.left() - 15)

            def child(r: dict[str, Any], m: str = mode, p: Path | None = path, s: float = allowed) -> None:
                _child(run, m, p, s, r)

            run.part(parts, mode, min(CHILD_ESTIMATES[mode], max(allowed, 0)), child)
            record["headline"] = headline(parts)
            log(f"[attn-shapes] {mode}: {parts[mode].get('status')}")
        record["table"] = table(parts)

    return body


def kernel_site(run: Any, wheels: Path | None, record: dict[str, Any]) -> Path | None:
    """A folder with the built wheels installed (offline), or ``None`` to use the environment as is.

    ``wheels`` ``None``: the first of :data:`DEFAULT_WHEELS` holding wheels. What was found and used
    goes into ``record["wheels"]``. Other stages whose 2.x kernels must import (``quality``) use it too.
    """
    from importlib.metadata import PackageNotFoundError, version

    if wheels is None:
        found_in = [folder for folder in DEFAULT_WHEELS if any(folder.glob("*.whl"))]
        wheels = (found_in or DEFAULT_WHEELS)[0]
    try:
        installed = version("sageattention")
    except PackageNotFoundError:
        installed = None
    found = sorted(p.name for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    record["wheels"] = {"folder": str(wheels), "found": found, "environment_sageattention": installed}
    if (installed is not None and not installed.startswith("1.")) or not found:
        record["wheels"]["used"] = "environment"
        if not found:
            record["wheels"]["note"] = f"no wheels in {wheels}: 2.x kernels only if the environment has them"
        return None
    site = run.work / "kernel-site"
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade"]
    command += ["--target", str(site), *(str(wheels / name) for name in found)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"installing {found} failed: {done.stderr[-2000:]}")
    record["wheels"]["used"] = str(site)
    return site


def _child(run: Any, mode: str, site: Path | None, budget: float, record: dict[str, Any]) -> None:
    run_child(
        run, "bench.attn_shapes", ["--mode", mode], run.out / f"attn-shapes-{mode}", site, budget, record
    )


def run_child(
    run: Any,
    module: str,
    argv: list[str],
    out: Path,
    site: Path | None,
    budget: float,
    record: dict[str, Any],
) -> None:
    """Run ``python -m module ARGV --out OUT ...`` with ``site`` first on its path, under ``budget``
    seconds (it stops itself; killed 30 s later), and keep its ``results.json`` in ``record``."""
    if budget < 5:
        raise RuntimeError(f"no time left for {module} {' '.join(argv)} ({budget:.0f} s)")
    env = dict(os.environ)
    paths = [str(site)] if site is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", module, *argv, "--out", str(out)]
    command += ["--device", run.device, "--budget-s", f"{budget:.0f}", "--work", str(run.work)]
    if run.smoke:
        command.append("--smoke")
    record["command"] = " ".join(command)
    record["site"] = str(site) if site is not None else "environment"
    began = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=budget + 30)
        record["exit_code"] = done.returncode
        record["log_tail"] = (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        record["exit_code"] = "timed out"
        record["log_tail"] = str(exc.stdout or "")[-3000:]
    record["seconds_in_child"] = round(time.perf_counter() - began, 1)
    results = out / "results.json"
    if results.exists():
        record["results"] = json.loads(results.read_text())
    if record["exit_code"] != 0 and "results" not in record:
        raise RuntimeError(f"child {module} ended with {record['exit_code']}: {record['log_tail'][-800:]}")


def headline(parts: dict[str, Any]) -> dict[str, Any]:
    """``{kernel}_{shape}_ms`` / ``_err`` for SDPA, Sage 1.0.6, Sage 2 (``auto``) and SpargeAttn (topk
    0.5), plus ``{model}_step_{kernel}_ms`` for the whole step with each offer alone."""
    found: dict[str, Any] = {}
    names = {"sdpa": "sdpa", "sage1": "sage1", "sage2_auto": "sage2", SPARGE_HEADLINE: "sparge"}
    for mode in ("v1", "v2"):  # v2's SDPA (same card, same process as the 2.x kernels) wins
        kernels = parts.get(mode, {}).get("results", {}).get("kernels", {})
        for kernel, short in names.items():
            for shape in HEADLINE_SHAPES:
                cell = kernels.get(kernel, {}).get(shape, {})
                if "ms" in cell:
                    found[f"{short}_{shape}_ms"] = round(cell["ms"], 4)
                    found[f"{short}_{shape}_err"] = cell.get("rel_error")
                    found[f"{short}_{shape}_err_clustered"] = cell.get("rel_error_clustered")
    stages = parts.get("steps", {}).get("results", {}).get("stages", {})
    for stage_name, stage in stages.items():
        found.update(_step_keys(stage_name.removeprefix("step-"), stage.get("rows", [])))
    return found


def _step_keys(model: str, rows: list[dict[str, Any]]) -> dict[str, float]:
    keys: dict[str, float] = {}
    for row in rows:
        variant, ms = row.get("variant", ""), row.get("ms")
        if ms is None:
            continue
        if variant.startswith("diffusers eager"):
            keys[f"{model}_step_sdpa_ms"] = round(ms, 3)
        elif variant.endswith(" attention alone"):
            keys[f"{model}_step_{variant.split()[0]}_ms"] = round(ms, 3)
        elif variant.startswith("composition's attention choice"):
            keys[f"{model}_step_composed_ms"] = round(ms, 3)
    return keys


def table(parts: dict[str, Any]) -> list[str]:
    """Markdown: shape × kernel (ms, errors vs float32 SDPA, SpargeAttn's skipped share), then each
    kernel that did not run and why, then the whole-step rows."""
    kernels: dict[str, dict[str, Any]] = {}
    for mode in ("v2", "v1"):
        for name, cells in parts.get(mode, {}).get("results", {}).get("kernels", {}).items():
            kernels.setdefault(name, cells)
    lines = [
        "| shape | kernel | ms | TOPS | rel. error | max abs error | rel. error, clustered | sparsity "
        "(random / clustered) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    skipped: dict[str, str] = {}
    for shape in SHAPES:
        for name, cells in kernels.items():
            cell = cells.get(shape.name) or {}
            if "skipped" in cell:
                skipped.setdefault(name, cell["skipped"])
                continue
            if not cell:
                continue
            sparsity = "/".join(
                _number(cell.get(key), ".2f") for key in ("sparsity", "sparsity_clustered") if key in cell
            )
            lines.append(
                f"| {shape.name} | {name} | {_number(cell.get('ms'), '.4f')} "
                f"| {_number(cell.get('tops'), '.0f')} "
                f"| {_number(cell.get('rel_error'), '.2e')} | {_number(cell.get('max_abs_error'), '.2e')} "
                f"| {_number(cell.get('rel_error_clustered'), '.2e')} | {sparsity} "
                f"| {' '.join(str(cell.get('error') or cell.get('note') or '').split())[:100]} |"
            )
    lines += ["", *(f"- {name}: not run ({reason})" for name, reason in skipped.items()), ""]
    stages = parts.get("steps", {}).get("results", {}).get("stages", {})
    for stage_name, stage in stages.items():
        lines.append(f"{stage_name} ({stage.get('status')}):")
        for row in stage.get("rows", []):
            detail = row.get("notes") or row.get("status") or ""
            lines.append(
                f"- {row['variant']}: {_number(row.get('ms'), '.2f')} ms, "
                f"drift {_number(row.get('drift'), '.1e')}"
                f"{'; ' + str(detail)[:160] if detail else ''}"
            )
    return lines


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, int | float) else "—"


# -- the children --------------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="attn-shapes child (run by bench/run.py)")
    parser.add_argument("--mode", choices=("v1", "v2", "steps"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=120.0)
    parser.add_argument("--smoke", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from bench.harness import Budget, Run

    budget = Budget(args.budget_s)
    command = " ".join([sys.executable, "-m", "bench.attn_shapes", *(argv or sys.argv[1:])])
    run = Run(args.out, args.work, budget, args.smoke, args.device, command)
    try:
        if args.mode == "steps":
            _steps(run)
        else:
            run.results["kernels"] = {}
            _kernels(run, args.mode)
    finally:
        run.save()
    return 0


def _steps(run: Any) -> None:
    """The step stages' attention parts, in a process where the built kernels import."""
    from bench.steps import step_stage

    for key, minimum in (("flux", 50), ("sdxl", 45), ("sd15", 35)):
        run.stage(
            f"step-{key}", minimum, step_stage(run, key, False, {"attention_offers", "attention_composed"})
        )


def _kernels(run: Any, mode: str) -> None:
    """Each kernel of this environment on each shape, results saved after every kernel."""
    import torch

    from bench.harness import log

    repeats = 3 if run.smoke else 20
    candidates = _candidates(run, mode)
    for shape in SHAPES:
        q, k, v, reference = _inputs(shape, run.device, run.smoke)
        clustered = _inputs(shape, run.device, run.smoke, CLUSTER_STRENGTH)
        for name, (build, supports, skipped) in candidates.items():
            cells = run.results["kernels"].setdefault(name, {})
            if skipped:
                cells[shape.name] = {"skipped": skipped}
                continue
            cell = _measure(build, supports, shape, (q, k, v), reference, run.device, repeats)
            cells[shape.name] = cell
            if "ms" not in cell:
                continue
            cell.update(_clustered_error(build, clustered))
            if name.startswith("sparge"):
                cell["sparsity"] = _sparge_sparsity(name, q, k, v)
                cell["sparsity_clustered"] = _sparge_sparsity(name, *clustered[:3])
        del q, k, v, reference, clustered
        if run.device.startswith("cuda"):
            torch.cuda.empty_cache()
        run.save()
        log(f"[attn-shapes {mode}] {shape.name} done ({run.budget.left():.0f} s left)")
        if run.budget.left() < 5:
            run.results["stopped"] = f"budget spent after {shape.name}"
            return


Candidate = tuple[Any, Any, str]
"""(build, supports, reason it is skipped or "")."""


def _candidates(run: Any, mode: str) -> dict[str, Candidate]:
    import torch.nn.functional as F

    from diffstack.types import Availability

    def every(_: Any) -> Any:
        return Availability.yes()

    candidates: dict[str, Candidate] = {"sdpa": (lambda: F.scaled_dot_product_attention, every, "")}
    version = _sage_version()
    if mode == "v1":
        if version is not None and version.startswith("1."):
            candidates["sage1"] = _plugin_candidate(run, "sage", {})
        else:
            candidates["sage1"] = (None, None, f"sageattention 1.x is not installed here (found {version})")
        return candidates
    if version is None or version.startswith("1."):
        reason = f"sageattention 2.x is not installed (found {version}): build it with bench/build_kernels.sh"
        candidates.update({f"sage2_{k}": (None, None, reason) for k in SAGE2_KERNELS})
    else:
        for kernel in SAGE2_KERNELS:
            candidates[f"sage2_{kernel}"] = _plugin_candidate(run, "sage", {"kernel": kernel})
    for setting in SPARGE_SETTINGS:
        candidates[_sparge_name(setting)] = _plugin_candidate(run, "sparge", setting)
    return candidates


def _sparge_name(setting: dict[str, Any]) -> str:
    return "sparge_" + (
        "topk" + str(setting["topk"]) if setting["method"] == "topk" else "cdf" + str(setting["cdfthreshd"])
    )


def _plugin_candidate(run: Any, plugin: str, options: dict[str, Any]) -> Candidate:
    """A kernel as its plugin offers it: probed, then built, for a model with these options."""
    import torch

    from diffstack.types import DenoiserKind, Family, ModelInfo

    support: Any
    if plugin == "sage":
        from diffstack_sage import support
    else:
        from diffstack_sparge import support
    info = ModelInfo(
        "attn-shapes",
        Family.FLUX,
        DenoiserKind.TRANSFORMER,
        run.device,
        torch.bfloat16,
        options={plugin: options},
    )
    try:
        answer = support.probe(info)
    except Exception as exc:
        return (None, None, f"probe failed: {type(exc).__name__}: {exc}")
    if not answer.ok:
        return (None, None, f"probe: {answer.reason}")
    return (lambda: support.build(info), support.supports, "")


def _sage_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sageattention")
    except PackageNotFoundError:
        return None


CLUSTER_STRENGTH = 0.6
CLUSTER_TOKENS = 256
"""Structured inputs: queries and keys in runs of 256 tokens share a random centre (token = 0.6·centre +
noise), so each query puts most of its attention on its own run (logits ≈ 0.36·√d higher there: ~78%
of the mass at 4608 tokens, d = 128), a stand-in for the locality of a trained model's attention.
Random Gaussian q and k (what the host's check uses) have no structure at all: a kernel that drops key
blocks loses about as much of the output as it keeps there, whatever it drops."""


def _inputs(shape: Shape, device: str, smoke: bool, clustered: float = 0.0) -> tuple[Any, Any, Any, Any]:
    """q, k, v in the shape's dtype and float32 SDPA on them: random, or ``clustered`` (see above)."""
    import torch
    import torch.nn.functional as F

    scale = 16 if smoke else 1  # a smoke run keeps the shapes' proportions at a CPU's size
    dtype = torch.bfloat16 if shape.bf16 else torch.float16
    if device == "cpu":
        dtype = torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    query_len = max(shape.query_len // scale, 8)
    regions = max(1, query_len // (CLUSTER_TOKENS // scale))
    centres = torch.randn(
        shape.batch, shape.heads, regions, shape.head_dim, device=device, generator=generator
    )

    def rand(length: int, structured: bool) -> torch.Tensor:
        length = max(length // scale, 8)
        size = (shape.batch, shape.heads, length, shape.head_dim)
        tokens = torch.randn(size, device=device, generator=generator)
        if structured and clustered:
            region = torch.arange(length, device=device) * regions // length
            tokens = tokens + clustered * centres[:, :, region]
        return tokens.to(dtype)

    q, k = rand(shape.query_len, True), rand(shape.key_len, True)
    v = rand(shape.key_len, False)
    with torch.inference_mode():
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return q, k, v, reference


def _clustered_error(build: Any, clustered: tuple[Any, ...]) -> dict[str, Any]:
    """The kernel's relative error on the clustered inputs (see :data:`CLUSTER_STRENGTH`)."""
    import torch

    try:
        with torch.inference_mode():
            out = build()(*clustered[:3]).float()
        return {"rel_error_clustered": float((out - clustered[3]).norm() / clustered[3].norm())}
    except Exception as exc:
        return {"error_clustered": f"{type(exc).__name__}: {str(exc)[:200]}"}


def _measure(
    build: Any, supports: Any, shape: Shape, qkv: tuple[Any, ...], reference: Any, device: str, repeats: int
) -> dict[str, Any]:
    """Time and error of one kernel on one shape; a failure is recorded, never raised."""
    import torch

    from bench import measure
    from diffstack.types import AttentionShape

    cell: dict[str, Any] = {}
    answer = supports(AttentionShape(shape.heads, shape.head_dim, shape.query_len, shape.key_len))
    if not answer.ok:
        cell["note"] = f"the plugin leaves this shape to the next offer: {answer.reason}"
    try:
        kernel = build()
        with torch.inference_mode():
            out = kernel(*qkv)
        difference = (out.float() - reference).abs()
        cell.update(
            rel_error=float((out.float() - reference).norm() / reference.norm()),
            max_abs_error=float(difference.max()),
            mean_abs_error=float(difference.mean()),
        )
        timing = measure.timed(lambda: kernel(*qkv), device, repeats)
        cell.update(ms=timing["median"], min_ms=timing["min"], max_ms=timing["max"])
        batch, heads, length, dim = qkv[0].shape
        cell["tops"] = 4 * batch * heads * length * qkv[1].shape[2] * dim / (timing["median"] / 1000) / 1e12
    except Exception as exc:
        cell["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return cell


def _sparge_sparsity(name: str, q: Any, k: Any, v: Any) -> float | str:
    """The share of key blocks the setting skipped on this input (upstream's ``return_sparsity``)."""
    import spas_sage_attn

    from diffstack_sparge.config import SpargeConfig

    setting = next(s for s in SPARGE_SETTINGS if _sparge_name(s) == name)
    config = SpargeConfig(**setting)
    function = (
        spas_sage_attn.spas_sage2_attn_meansim_topk_cuda
        if config.method == "topk"
        else spas_sage_attn.spas_sage2_attn_meansim_cuda
    )
    try:
        _, sparsity = function(
            q, k, v, tensor_layout="HND", return_sparsity=True, **config.kernel_arguments()
        )
        return float(sparsity)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:200]}"


if __name__ == "__main__":
    sys.exit(main())
