"""The quality stage's own logic on the CPU: the stack check, the row filter, and a filtered smoke run
whose compiled engine cannot compile on a CPU, so its rows must come out not priced, never labelled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality_gpu import FLOW_LOW, FLUX, plan, selected, stack_gaps, table
from bench.run import chosen, main
from diffstack.types import CandidateReport, CandidateStatus, SlotReport


def _slot(slot: str, chosen: tuple[str, ...], *candidates: tuple[str, CandidateStatus, str]) -> SlotReport:
    return SlotReport(
        slot,
        chosen,
        tuple(CandidateReport("p", offer, 0, status, reason) for offer, status, reason in candidates),
    )


def test_a_compiled_engine_that_chose_eager_is_a_gap_naming_why() -> None:
    slots = [
        _slot(
            "compile_model",
            ("eager",),
            ("eager", CandidateStatus.CHOSEN, ""),
            ("torch_compile", CandidateStatus.SLOWER, "lower priority"),
        ),
        _slot("compile_vae", ("torch_compile_vae",), ("torch_compile_vae", CandidateStatus.CHOSEN, "")),
    ]
    (gap,) = stack_gaps("compiled", slots)
    assert gap.startswith("compile_model has no torch_compile (chose eager)")
    assert "slower (lower priority)" in gap


def test_a_stack_with_every_claimed_offer_has_no_gap() -> None:
    slots = [
        _slot("compile_model", ("torch_compile",)),
        _slot("compile_vae", ("torch_compile_vae",)),
        _slot("select_attention", ("h3xd64 q16 k16: sdpa", "h3xd64 q16 k77: sparge")),
    ]
    assert stack_gaps("compiled", slots) == []
    assert stack_gaps("sparge", slots) == []  # serving one shape of the model is serving it
    assert stack_gaps("eager", slots) == []  # the eager engine claims nothing


def test_a_kernel_that_serves_no_shape_is_a_gap_with_its_reasons() -> None:
    reason = "sageattention 1.0.6: diffusers' sage backend needs >= 2.1.1"
    slots = [
        _slot(
            "select_attention",
            ("h3xd64 q20 k20: sdpa",),
            ("sage", CandidateStatus.REJECTED, reason),
            ("sage", CandidateStatus.REJECTED, reason),  # once per shape: said once
        )
    ]
    (gap,) = stack_gaps("sage", slots)
    assert gap == f"select_attention has no sage (chose sdpa): sage rejected ({reason})"
    (missing,) = stack_gaps("sparge", slots)
    assert "sparge not offered" in missing


def test_the_filter_runs_only_the_named_engines_and_groups() -> None:
    rows = plan()
    new = selected(rows, {"compiled", "sage2", "sparge"})
    assert {v.engine for v in new} == {"compiled", "sage2", "sparge"}
    assert [v for v in rows if v.engine in ("compiled", "sage2", "sparge")] == new
    low = selected(rows, {"flow_low"})
    assert {(v.engine, v.model, v.config["steps"]) for v in low} == {("eager", FLUX, s) for s in FLOW_LOW}
    assert {v.config["schedule"] for v in low} == {"default", "flow_arcsine"}
    assert len(low) == 2 * len(FLOW_LOW)
    assert selected(rows, None) == rows
    flux_compiled = selected(rows, {"compiled", "flux"})
    assert flux_compiled and {(v.engine, v.model) for v in flux_compiled} == {("compiled", FLUX)}
    assert selected(rows, {"flux"}) == [v for v in rows if v.model == FLUX]
    with pytest.raises(ValueError, match=r"unknown quality group.*compile\b"):
        selected(rows, {"compile"})


def test_stage_selection_syntax() -> None:
    assert chosen("compiled+sage2+sparge", "") == {"compiled", "sage2", "sparge"}
    assert chosen("", "a, b") == {"a", "b"}
    assert chosen("", "") is None


def test_unpriced_rows_say_why_in_the_table() -> None:
    unpriced = [{"model": FLUX, "variant": "SageAttention, flow euler 20", "engine": "sage", "reason": "a|b"}]
    lines = table([], unpriced, {})
    assert f"| {FLUX} | SageAttention, flow euler 20 | – | a/b |" in lines[2]


@pytest.mark.timeout(300)
def test_smoke_compiled_rows_on_a_cpu_are_not_priced_as_compiled(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "--smoke",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "--stages",
        "quality:compiled+flow_low",
    ]
    assert main(argv) == 0
    stage = json.loads((out / "results.json").read_text())["stages"]["quality"]
    assert stage["status"] == "ok"
    assert stage["parts"]["compiled engine"]["status"] == "error"  # loud: it compiled nothing
    priced = {(r["engine"], r["variant"]) for r in stage["rows"]}
    assert {engine for engine, _ in priced} == {"eager"}
    assert len(priced) == 2 * len(FLOW_LOW)
    compiled = [u for u in stage["unpriced"] if u["engine"] == "compiled"]
    assert len(compiled) == len([v for v in plan() if v.engine == "compiled"])
    assert all("torch_compile" in u["reason"] for u in compiled)
    assert any("not priced, the stack runs eager" in line for line in stage["table"])


@pytest.mark.timeout(120)
def test_kernel_wheels_that_do_not_install_skip_only_their_rows(tmp_path: Path, monkeypatch) -> None:
    import bench.attn_shapes

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "sageattention-2.2.0-cp312-cp312-linux_x86_64.whl").write_bytes(b"not a wheel")
    monkeypatch.setattr(bench.attn_shapes, "DEFAULT_WHEELS", (wheels,))
    out = tmp_path / "out"
    argv = ["--smoke", "--out", str(out), "--work", str(tmp_path / "work"), "--stages", "quality:sage2"]
    assert main(argv) == 0
    stage = json.loads((out / "results.json").read_text())["stages"]["quality"]
    assert stage["status"] == "ok"  # the stage goes on: only the kernel rows are lost, with the reason
    sage2 = [u for u in stage["unpriced"] if u["engine"] == "sage2"]
    assert sage2 and len(sage2) == len([v for v in plan() if v.engine == "sage2"])
    assert all(u["reason"].startswith("the kernel wheels did not install") for u in sage2)
    assert stage["rows"] == []
