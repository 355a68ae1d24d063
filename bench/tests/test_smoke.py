"""The benchmark harness itself, on diffstack's tiny models on the CPU (about a minute).

Not in the workspace's default test paths (the harness is a tool, not the product); run it with
``pytest bench/tests`` before spending GPU time on a change to the harness.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.run import main


@pytest.mark.timeout(600)
def test_smoke_run_measures_every_stage_and_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    status = main(
        [
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--budget-s",
            "500",
            "--stages",
            "ceilings,step-sd15,step-flux,e2e-sd15,e2e-flux,serve-sd15",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert status == 0, {k: v.get("error") for k, v in results["stages"].items()}
    stages = results["stages"]
    assert {s["status"] for s in stages.values()} == {"ok"}
    variants = [row["variant"] for row in stages["step-sd15"]["rows"]]
    assert variants[0] == "diffusers eager (SDPA)"
    assert "diffstack composed stack" in variants
    stack = next(r for r in stages["step-sd15"]["rows"] if r["variant"] == "diffstack composed stack")
    assert stack["drift"] < 1e-3
    serve = {row["kind"] for row in stages["serve-sd15"]["rows"]}
    assert serve == {"start", "latency", "throughput"}
    assert "| diffusers eager (SDPA) |" in (out / "table.md").read_text()


def test_budget_too_small_skips_with_the_numbers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    main(
        [
            "--smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--budget-s",
            "1",
            "--stages",
            "step-sd15",
        ]
    )
    stage = json.loads((out / "results.json").read_text())["stages"]["step-sd15"]
    assert stage["status"] == "skipped"
    assert "s left" in stage["reason"]


@pytest.mark.timeout(600)
def test_lora_stage_swaps_without_recompiling(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--stages", "lora-sd15"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    stage = results["stages"]["lora-sd15"]
    assert stage["status"] == "ok" and stage["recompiled"] is False
    assert stage["compiled_vs_eager_after_swap"] < 1e-4 < stage["lora_effect"]
    assert {"lora_swap_ms_eager", "lora_swap_ms_compiled"} <= set(results["headline"])
