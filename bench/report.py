"""Compact tables (markdown) from a results file: printed at the end of a run and kept beside the JSON.

python bench/report.py bench/results/*.json     # tables of one or more earlier runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import TARGETS

HEADLINE_ROWS = {
    # headline key: (stage, unit, what the row's variant starts with)
    "sd15_step_ms": ("step-sd15", "ms", "diffstack composed stack"),
    "sd15_step_ms_by_hand": ("step-sd15", "ms", "by-hand torch.compile"),
    "sd15_image_s": ("e2e-sd15", "s", "diffstack Engine (composed stack"),
    "sd15_image_s_by_hand": ("e2e-sd15", "s", "diffusers + by-hand"),
    "sd15_image_cached_s": ("e2e-sd15", "s", "diffstack Engine + deepcache"),
    "sdxl_step_ms": ("step-sdxl", "ms", "diffstack composed stack"),
    "sdxl_step_ms_by_hand": ("step-sdxl", "ms", "by-hand torch.compile"),
    "sdxl_image_s": ("e2e-sdxl", "s", "diffstack Engine (composed stack"),
    "sdxl_image_cached_s": ("e2e-sdxl", "s", "diffstack Engine + deepcache"),
    "flux_step_ms": ("step-flux", "ms", "diffstack composed stack"),
    "flux_step_ms_by_hand": ("step-flux", "ms", "by-hand torch.compile"),
    "flux_image_s": ("e2e-flux", "s", "diffstack Engine (composed stack"),
    "sd15_throughput_8_clients": ("serve-sd15", "images_per_s", "throughput, 8 concurrent clients"),
    "sd15_throughput_32_clients": ("load-sd15", "images_per_s", "closed loop 32 clients"),
    "sd15_p99_32_clients_s": ("load-sd15", "p99_s", "closed loop 32 clients"),
    "restart_to_serving_s": ("serve-sd15", "s", "restart to SERVING"),
    "cold_start_s": ("serve-sd15", "s", "cold start to SERVING"),
    "flux_step_ms_2gpu": ("cp-flux", "ms", "2 GPUs, composed stack"),
    "flux_image_s_2gpu": ("cp-flux", "s", "2 GPUs, 20-step"),
    "replicas_2_speedup": ("replicas-sd15", "x", "2 replicas vs 1"),
}
"""Where each key of a results file's ``headline`` comes from (issue 11); unmeasured keys are omitted."""


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's headline numbers of one run: medians in the unit the key names, plus the card."""
    found: dict[str, Any] = {
        "card": results.get("meta", {}).get("card", results.get("meta", {}).get("device"))
    }
    for key, (stage, unit, prefix) in HEADLINE_ROWS.items():
        rows = results.get("stages", {}).get(stage, {}).get("rows", [])
        values = [row[unit] for row in rows if row.get("variant", "").startswith(prefix) and unit in row]
        if values:
            found[key] = round(values[0], 4)
    for stage in results.get("stages", {}).values():  # stages that name their own keys (attn-shapes)
        found.update(stage.get("headline") or {})
    return found


def _num(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}f}{suffix}"


def _ratio(value: Any) -> str:
    return "—" if not isinstance(value, int | float) else f"{value:.2f}x"


def _drift(value: Any) -> str:
    if isinstance(value, int | float):
        return "0" if value == 0 else f"{value:.1e}"
    return "—" if value is None else str(value)


def _short(text: Any, width: int = 90) -> str:
    text = "" if text is None else str(text).replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def step_table(name: str, stage: dict[str, Any]) -> list[str]:
    label = stage.get("workload", {}).get("label", name)
    lines = [f"### {name}: {label} — {stage.get('status')}", ""]
    rows = stage.get("rows") or []
    if not rows:
        lines += [f"(no rows: {stage.get('reason') or stage.get('error') or 'nothing measured'})", ""]
        return lines
    lines += [
        "| variant | ms/step | vs eager | vs by-hand | drift vs eager | TFLOP/s | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms = row.get("ms")
        if ms is None and "kernel_ms" in row:
            ms_text = f"kernel {row['kernel_ms']:.3f} (SDPA {row['sdpa_ms']:.3f})"
        else:
            ms_text = _num(ms)
        drift = row.get("drift", row.get("drift_vs_host_reference"))
        notes = row.get("notes") or row.get("status") or ""
        if row.get("compile_s"):
            notes = f"compile {row['compile_s']:.0f} s; {notes}"
        lines.append(
            f"| {_short(row['variant'], 70)} | {ms_text} | {_ratio(row.get('speedup_vs_eager'))} | "
            f"{_ratio(row.get('speedup_vs_by_hand'))} | {_drift(drift)} | {_num(row.get('tflops'), 0)} | "
            f"{_short(notes)} |"
        )
    lines.append("")
    return lines


def e2e_table(name: str, stage: dict[str, Any]) -> list[str]:
    label = stage.get("workload", {}).get("label", name)
    lines = [f"### {name}: {label} — {stage.get('status')}", ""]
    rows = stage.get("rows") or []
    if not rows:
        lines += [f"(no rows: {stage.get('reason') or stage.get('error') or 'nothing measured'})", ""]
        return lines
    lines += ["| variant | s/image | vs eager | vs by-hand | notes |", "|---|---|---|---|---|"]
    for row in rows:
        notes = row.get("notes") or ""
        if row.get("compile_s"):
            notes = f"first image (compile) {row['compile_s']:.0f} s; {notes}"
        lines.append(
            f"| {_short(row['variant'], 80)} | {_num(row.get('s'), 3)} | "
            f"{_ratio(row.get('speedup_vs_eager'))} | {_ratio(row.get('speedup_vs_by_hand'))} | "
            f"{_short(notes)} |"
        )
    lines.append("")
    return lines


def serve_table(name: str, stage: dict[str, Any]) -> list[str]:
    label = stage.get("workload", {}).get("label", name)
    lines = [f"### {name}: {label} — {stage.get('status')}", ""]
    rows = stage.get("rows") or []
    if not rows:
        lines += [f"(not run: {stage.get('reason') or stage.get('error') or 'nothing measured'})", ""]
        return lines
    lines += ["| measurement | value | notes |", "|---|---|---|"]
    for row in rows:
        value = f"{row['images_per_s']:.2f} images/s" if "images_per_s" in row else f"{row.get('s', 0):.2f} s"
        lines.append(f"| {_short(row['variant'], 80)} | {value} | {_short(row.get('notes'), 120)} |")
    lines.append("")
    return lines


def load_table(name: str, stage: dict[str, Any]) -> list[str]:
    label = stage.get("workload", {}).get("label", name)
    lines = [f"### {name}: {label} — {stage.get('status')}", ""]
    rows = stage.get("rows") or []
    if not rows:
        lines += [f"(not run: {stage.get('reason') or stage.get('error') or 'nothing measured'})", ""]
        return lines
    lines += [
        "| load | images/s | p50 s | p95 s | p99 s | refused | busy | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {_num(row['images_per_s'])} | {_num(row.get('p50_s'))} | "
            f"{_num(row.get('p95_s'))} | {_num(row.get('p99_s'))} | {row.get('refused', 0)} | "
            f"{_num(row.get('busy_fraction'))} | {_short(row.get('notes'), 80)} |"
        )
    lines.append("")
    return lines


def target_table(results: dict[str, Any]) -> list[str]:
    stages = results.get("stages", {})

    def row_value(stage: str, variant_start: str, field: str) -> float | None:
        for row in stages.get(stage, {}).get("rows", []) or []:
            if row["variant"].startswith(variant_start) and isinstance(row.get(field), int | float):
                return float(row[field])
        return None

    measured = {
        "sd15_step_ms": row_value("step-sd15", "diffstack composed stack", "ms"),
        "sdxl_step_ms": row_value("step-sdxl", "diffstack composed stack", "ms"),
        "flux_step_ms": row_value("step-flux", "diffstack composed stack", "ms"),
        "sd15_image_s": row_value("e2e-sd15", "diffstack Engine (", "s"),
        "sdxl_image_s": row_value("e2e-sdxl", "diffstack Engine (", "s"),
        "sd15_throughput_images_per_s": row_value("serve-sd15", "throughput", "images_per_s"),
    }
    measured = {**headline(results), **{k: v for k, v in measured.items() if v is not None}}
    lines = [
        "### Targets (issues 11 and 12, one H200)",
        "",
        "| target | goal | this run | met |",
        "|---|---|---|---|",
    ]
    for key, goal in TARGETS.items():
        value = measured.get(key)
        higher = key.endswith("per_s") or "_throughput_" in key
        met = "—" if value is None else ("yes" if (value >= goal if higher else value <= goal) else "no")
        sign = "≥" if higher else "≤"
        lines.append(f"| {key} | {sign} {goal} | {_num(value, 3)} | {met} |")
    lines.append("")
    return lines


def catalogue_table(name: str, stage: dict[str, Any]) -> list[str]:
    lines = [f"### {name} — {stage.get('status')}", ""]
    rows = stage.get("rows") or []
    if rows:
        lines += ["| variant | s/image | vs plain | notes |", "|---|---|---|---|"]
        for row in rows:
            lines.append(
                f"| {_short(row['variant'], 70)} | {_num(row.get('s'), 3)} | "
                f"{_ratio(row.get('speedup_vs_plain'))} | {_short(row.get('notes'))} |"
            )
        lines.append("")
    phases = stage.get("parts", {}).get("multiscale_sdxl", {}).get("phases")
    if phases:
        lines += [f"SDXL UNet step by phase (ms, batch 2): {phases}", ""]
    return lines


def rows_table(name: str, stage: dict[str, Any]) -> list[str]:
    """The multi-GPU stages: one line per measured variant, whatever unit it has."""
    label = stage.get("workload", {}).get("label", name)
    lines = [f"### {name}: {label} — {stage.get('status')}", ""]
    rows = stage.get("rows") or []
    if not rows:
        return [*lines, f"(no rows: {stage.get('reason') or stage.get('error') or 'nothing measured'})", ""]
    lines += [
        "| variant | ms/step | s/image | images/s | ratio | drift vs 1 GPU | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        notes = row.get("notes") or ""
        if row.get("compile_s"):
            notes = f"setup {row['compile_s']:.0f} s; {notes}"
        ratio = row.get("x", row.get("speedup_vs_1gpu"))
        lines.append(
            f"| {_short(row['variant'], 80)} | {_num(row.get('ms'))} | {_num(row.get('s'), 3)} | "
            f"{_num(row.get('images_per_s'))} | {_ratio(ratio)} | {_drift(row.get('drift'))} | "
            f"{_short(notes)} |"
        )
    return [*lines, ""]


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines = [
        f"## diffstack benchmark — {meta.get('card', meta.get('device'))}, {meta.get('date_utc')}",
        "",
        f"torch {meta.get('torch')}, diffusers {meta.get('diffusers')}, triton {meta.get('triton')}, "
        f"driver {meta.get('nvidia_smi', {}).get('driver_version', '—')}; smoke={meta.get('smoke')}; "
        f"{meta.get('seconds_used')} s of a {meta.get('budget_s')} s budget",
        "",
    ]
    for name, stage in results.get("stages", {}).items():
        if name.startswith("step-"):
            lines += step_table(name, stage)
        elif name.startswith("e2e-"):
            lines += e2e_table(name, stage)
        elif name.startswith("serve-") or name.startswith("threads-"):
            lines += serve_table(name, stage)
        elif name.startswith("load-"):
            lines += load_table(name, stage)
        elif name.startswith("catalogue-"):
            lines += catalogue_table(name, stage)
        elif name in ("cp-flux", "replicas-sd15"):
            lines += rows_table(name, stage)
        else:
            lines += [f"### {name} — {stage.get('status')}", "", *stage.get("table", []), ""]
    lines += target_table(results)
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    for path in paths:
        print(render(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
