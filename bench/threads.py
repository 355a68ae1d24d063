"""Does the composed, CUDA-graphed stack serve from another thread than the one that composed it?

The gRPC server composes the stack in one thread (its engine start-up) and runs every batch in another
(its batch worker). This stage reproduces that in a fresh process, with recompile logging on:

1. a dedicated "owner" thread starts the Engine (imports, composition, compilation) and generates two
   images (the first one shows whether the pipeline's call re-compiles what composition compiled);
2. a second thread then generates one image with the same engine.

It records times, each outcome with its traceback, and dynamo's recompile reasons from the log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.e2e import PROMPT, save_model, steps_for
from bench.harness import Run, compile_options
from bench.models import workload


def _child(models_dir: str, key: str, options_json: str, steps: int, width: int, height: int) -> None:
    """Runs in the subprocess: prints one JSON line with the results."""
    import traceback
    from concurrent.futures import ThreadPoolExecutor

    from diffstack.config import load_settings
    from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult

    settings = load_settings(
        None,
        engine={"models_dir": models_dir, "default_model": key},
        plugins={"options": {"torch_compile": json.loads(options_json)}},
    )
    result: dict[str, Any] = {}
    owner, other = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    began = time.perf_counter()
    engine = owner.submit(Engine.start, settings).result()
    result["engine_start_s"] = time.perf_counter() - began
    result["chosen_compile"] = list(engine.report().summary().get("compile_model", ()))

    def image(seed: int) -> float:
        request = engine.prepare(
            GenerationRequest(prompt=PROMPT, seeds=(seed,), steps=steps, width=width, height=height)
        )
        began = time.perf_counter()
        (outcome,) = engine.run([GenerationJob(request)])
        if not isinstance(outcome, GenerationResult):
            raise RuntimeError(f"generation failed: {outcome!r}")
        return time.perf_counter() - began

    for name, pool, seeds in (("owner_thread", owner, (1, 2)), ("other_thread", other, (3, 4))):
        entry: dict[str, Any] = {}
        result[name] = entry
        for seed in seeds:
            try:
                entry.setdefault("image_s", []).append(pool.submit(image, seed).result())
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"[:1000]
                entry["traceback"] = traceback.format_exc()[-5000:]
                break
    print("THREAD_CHECK_RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # skip interpreter teardown of live CUDA graphs and executor threads


def thread_stage(run: Run, key: str, smoke_compile: bool = False) -> Any:
    def body(record: dict[str, Any]) -> None:
        w = workload(key, run.smoke)
        record["workload"] = {
            "label": f"Engine composed in one thread, called from another (the server's pattern), "
            f"{w.width}x{w.height}, {steps_for(run)} steps"
        }
        models_dir = save_model(run, key).parent
        cache = run.work / "thread-check-cache"
        options = compile_options(run, cache, smoke_compile)
        env = {**os.environ, "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1"}
        args = [str(models_dir), key, json.dumps(options), str(steps_for(run)), str(w.width), str(w.height)]
        code = "import sys; from bench.threads import _child; _child(*sys.argv[1:4], *map(int, sys.argv[4:]))"
        log_path = run.work / f"thread-check-{key}.log"
        began = time.perf_counter()
        with log_path.open("w") as sink:
            completed = subprocess.run(
                [sys.executable, "-c", code, *args],
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
                cwd=str(Path(__file__).resolve().parent.parent),
                env=env,
                timeout=max(30.0, run.budget.left() - 5),
            )
        record["seconds_total"] = time.perf_counter() - began
        record["exit_code"] = completed.returncode
        line = next((x for x in completed.stdout.splitlines() if x.startswith("THREAD_CHECK_RESULT ")), "")
        if line:
            record.update(json.loads(line.removeprefix("THREAD_CHECK_RESULT ")))
        else:
            record["stdout_tail"] = completed.stdout[-3000:]
        text = log_path.read_text(errors="replace")
        reasons = [x.strip() for x in text.splitlines() if "guard" in x.lower() or "recompil" in x.lower()]
        record["recompile_log"] = reasons[:40]
        record["stderr_tail"] = text[-4000:]
        rows: list[dict[str, Any]] = []
        record["rows"] = rows
        for name in ("owner_thread", "other_thread"):
            entry = record.get(name, {})
            images = entry.get("image_s", [])
            rows.append(
                {
                    "variant": f"Engine in the {name.replace('_', ' ')}",
                    "kind": "threads",
                    "s": images[-1] if images else None,
                    "notes": (
                        f"images: {', '.join(f'{t:.2f} s' for t in images)}"
                        + (f"; FAILED: {entry['error'][:200]}" if "error" in entry else "")
                    ),
                }
            )

    return body
