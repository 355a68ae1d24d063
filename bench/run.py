"""diffstack's GPU benchmark: one command, bounded in time, results as JSON plus a table.

    python bench/run.py --out OUT [--budget-s 540] [--stages step-sd15,step-sdxl,...]
    python bench/run.py --smoke --out /tmp/smoke          # the same code on tiny models, on the CPU

Stages (run in the order given; each is skipped, and says so, when the budget left is too small):

    step-sd15, step-sdxl, step-flux   per denoiser step: eager, by-hand compile, each offer, the stack
    e2e-sd15, e2e-sdxl, e2e-flux      one image end to end: plain diffusers vs diffstack's Engine
    serve-sd15                        gRPC loopback: cold start, latency, throughput, warm restart
    serve-sd15-eager                  the same with the torch_compile plugin turned off (eager stack)
    load-sd15                         latency under load: open-loop 10-40 req/s, closed-loop 8/32/64 clients
    threads-sd15                      the compiled stack composed in one thread, run from another
    attn-shapes                       attention kernels per SD1.5/SDXL/FLUX shape (SDPA, SageAttention
                                      1.0.6 and 2, SpargeAttn per sparsity) and the step with each;
                                      installs --kernel-wheels (bench/build_kernels.sh's output)
    ceilings                          the card's dense matmul rate (what the step times are measured against)
    quality                           `diffstack quality` on the GPU for both trained models
                                      (synthetic-shapes-64, synthetic-shapes-flux): dense, compiled,
                                      DeepCache 2-5 and first-block cache on the compiled denoiser,
                                      first-block cache thresholds with hit rates, flow_arcsine vs
                                      default at 2-20 steps, SageAttention 1.x, 2.x and SpargeAttn;
                                      accuracy, all-5-right, pixel error, ms/image. quality:A+B runs
                                      only those groups (eager, compiled, sage, sage2, sparge, flow_low),
                                      and naming a model (sd64, flux) keeps only its rows
    catalogue-sdxl                    multi-scale on SDXL 1024² (step by phase, image), each named profile's
                                      SD1.5 image, CFG++ against Euler (eager stacks; about 2-3 min)
    cp-flux                           2 GPUs: FLUX.1 step on 1 GPU vs Ulysses-2/ring-2 (torchrun), and a
                                      20-step image through the context-parallel gRPC server (~240 s)
    replicas-sd15                     SD1.5 throughput with 1 and 2 Ray Serve replicas, 32 clients
                                      (needs ray[serve]: bench/join_wheels.sh)
    lora-sd15                         LoRA hot-swap cost, eager and compiled (CUDA graphs); no recompile

On the GPU machine see ``bench/gpu.sh``, which installs the carried wheels and the repo's packages
first. Everything lands in OUT: ``results.json`` (rewritten after every part), ``table.md``, and
``server-logs.txt`` for the serving stage.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_STAGES = "ceilings,step-sd15,step-sdxl,step-flux,serve-sd15,e2e-sd15,e2e-sdxl"
STAGE_MINIMUM = {
    "ceilings": 5,
    "step-sd15": 105,
    "step-sdxl": 145,
    "step-flux": 185,
    "e2e-sd15": 60,
    "e2e-sdxl": 90,
    "e2e-flux": 150,
    "serve-sd15": 150,
    "serve-sd15-eager": 60,
    "load-sd15": 150,
    "threads-sd15": 100,
    "attn-shapes": 60,
    "catalogue-sdxl": 100,
    "cp-flux": 200,
    "replicas-sd15": 100,
    "quality": 60,
    "lora-sd15": 90,
}
"""Seconds a stage needs at least (its essential parts) before it is started at all."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    parser.add_argument(
        "--work", type=Path, help="scratch folder (models, caches); default /tmp/diffstack-bench"
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="the whole run's time budget")
    parser.add_argument(
        "--stages", default=DEFAULT_STAGES, help=f"comma-separated (default {DEFAULT_STAGES})"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny models on the CPU: checks the harness itself"
    )
    parser.add_argument(
        "--smoke-compile", action="store_true", help="in a smoke run, also run the compiles (slow on a CPU)"
    )
    parser.add_argument("--device", default="", help="default: cuda when present (cpu for --smoke)")
    parser.add_argument(
        "--kernel-wheels",
        type=Path,
        help="attn-shapes: folder of built SageAttention 2 / SpargeAttn wheels (default .gpu-state/wheels)",
    )
    parser.add_argument(
        "--parts",
        default="",
        help="step stages: run only these parts (comma-separated; build/eager always); "
        "per stage: --stages step-flux:fused_drift+by_hand_compile",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.harness import Budget, Run, log

    budget = Budget(args.budget_s)  # counts imports too: they are part of the run's time
    import torch

    _quiet_libraries()
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    work = args.work or Path("/tmp/diffstack-bench-smoke" if args.smoke else "/tmp/diffstack-bench")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-bench"))
    _configure_dynamo()
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    run = Run(args.out, work, budget, args.smoke, device, command)
    log(f"device {device}; budget {args.budget_s:.0f} s; stages {args.stages}; out {args.out}")

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    try:
        for spec in stages:
            name, _, selected = spec.partition(":")  # step-flux:fused_drift+by_hand_compile
            body = _stage_body(run, args, name, selected)
            if body is None:
                run.results["stages"][name] = {"status": "failed", "error": f"unknown stage {name!r}"}
                continue
            run.stage(name, STAGE_MINIMUM.get(name, 10), body)
    except KeyboardInterrupt:
        log("interrupted: results so far are saved")
    finally:
        run.save()
        from bench.report import render

        table = render(run.results)
        (args.out / "table.md").write_text(table + "\n")
        print("\n" + table, flush=True)
    failed = [n for n, s in run.results["stages"].items() if s.get("status") == "failed"]
    return 1 if failed else 0


def _stage_body(run, args, name: str, selected: str):  # type: ignore[no-untyped-def]
    """The body of stage ``name`` (``selected``: what follows ``name:``), or None for an unknown name."""
    from bench.e2e import e2e_stage
    from bench.load import load_stage
    from bench.measure import matmul_ceiling
    from bench.quality_gpu import quality_stage
    from bench.serving import serve_stage
    from bench.steps import step_stage
    from bench.threads import thread_stage

    kind, _, key = name.partition("-")
    if name == "ceilings":
        return _ceilings(run, matmul_ceiling)
    if kind == "step" and key in ("sd15", "sdxl", "flux"):
        return step_stage(run, key, args.smoke_compile, chosen(selected, args.parts))
    if name == "quality":
        return quality_stage(run, chosen(selected, ""), smoke_compile=args.smoke_compile)
    if kind == "e2e" and key in ("sd15", "sdxl", "flux"):
        return e2e_stage(run, key, args.smoke_compile)
    if kind == "serve" and key in ("sd15", "sd15-eager"):
        return serve_stage(run, "sd15", args.smoke_compile, eager_only=key.endswith("-eager"))
    if kind == "load" and key == "sd15":
        return load_stage(run, args.smoke_compile)
    if kind == "threads" and key == "sd15":
        return thread_stage(run, key, args.smoke_compile)
    if name in OTHER_STAGES:
        return OTHER_STAGES[name](run, args)
    return None


def chosen(selected: str, parts: str) -> set[str] | None:
    """The parts (or groups) a stage runs: ``stage:a+b``'s, else ``--parts a,b``; None for all."""
    names = selected.split("+") if selected else parts.split(",")
    return {n.strip() for n in names if n.strip()} or None


def _attn_shapes(run, args):  # type: ignore[no-untyped-def]
    from bench.attn_shapes import attn_shapes_stage

    return attn_shapes_stage(run, args.kernel_wheels)


def _catalogue(run, args):  # type: ignore[no-untyped-def]
    from bench.catalogue import catalogue_stage

    return catalogue_stage(run)


def _cp_flux(run, args):  # type: ignore[no-untyped-def]
    from bench.multigpu import cp_flux_stage

    return cp_flux_stage(run)


def _replicas(run, args):  # type: ignore[no-untyped-def]
    from bench.multigpu import replicas_stage

    return replicas_stage(run)


def _lora(run, args):  # type: ignore[no-untyped-def]
    from bench.lora import lora_stage

    return lora_stage(run, args.smoke_compile)


OTHER_STAGES = {
    "lora-sd15": _lora,
    "attn-shapes": _attn_shapes,
    "catalogue-sdxl": _catalogue,
    "cp-flux": _cp_flux,
    "replicas-sd15": _replicas,
}
"""Stages of one name, built from the run and the arguments."""


def _ceilings(run, matmul_ceiling):  # type: ignore[no-untyped-def]
    import torch

    def body(record: dict) -> None:  # type: ignore[type-arg]
        record["fp16_matmul_8192"] = matmul_ceiling(run.device, torch.float16)
        record["bf16_matmul_8192"] = matmul_ceiling(run.device, torch.bfloat16)

    return body


def _configure_dynamo() -> None:
    """Several models and variants compile in one process: allow that many recompiles of a forward."""
    import torch._dynamo

    config = torch._dynamo.config
    for name, value in (
        ("cache_size_limit", 64),
        ("recompile_limit", 64),
        ("accumulated_cache_size_limit", 512),
        ("accumulated_recompile_limit", 512),
    ):
        if hasattr(config, name):
            setattr(config, name, value)


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    except Exception:
        pass
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(main())
