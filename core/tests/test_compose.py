"""Composition with fake plugins installed as a real distribution with entry points.

Each fake travels the same path as a third party's plugin: importlib.metadata finds its entry point,
the host imports it, calls its hooks, probes, checks and (where asked) times its offers.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest

from diffstack.engine import Engine, GenerationJob, GenerationRequest, GenerationResult
from diffstack.plugins import load_plugins
from diffstack.render import report_text
from diffstack.testing import BASELINE_PLUGINS, baseline_settings
from diffstack.types import CandidateStatus, PluginStatus, StackReport

FAKES = {
    "fake_good": """
        import torch
        from diffstack.hookspecs import hookimpl
        from diffstack.types import AttentionOffer

        def manual_attention(q, k, v):
            weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            return weights @ v

        @hookimpl
        def select_attention(model):
            return [AttentionOffer(name="manual", priority=5, build=lambda model: manual_attention)]
    """,
    "fake_import_error": """
        import a_module_that_does_not_exist
    """,
    "fake_probe_no": """
        from diffstack.hookspecs import hookimpl
        from diffstack.types import AttentionOffer, Availability

        @hookimpl
        def select_attention(model):
            return [AttentionOffer(
                name="quantum",
                probe=lambda model: Availability.no("needs a quantum GPU, found " + model.device),
                build=lambda model: None,
            )]
    """,
    "fake_wrong_numbers": """
        import torch
        from diffstack.hookspecs import hookimpl
        from diffstack.types import AttentionOffer, CompileOffer

        class Doubled(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
            def forward(self, *args, **kwargs):
                out = self.inner(*args, **kwargs)
                return (out[0] * 2,)

        @hookimpl
        def select_attention(model):
            zeros = lambda q, k, v: torch.zeros_like(q)
            return [AttentionOffer(name="garbage", priority=9, build=lambda model: zeros)]

        @hookimpl
        def compile_model(model):
            return [CompileOffer(name="doubler", priority=9, build=lambda denoiser, model: Doubled(denoiser))]
    """,
    "fake_slow": """
        import torch.nn.functional as F
        from diffstack.hookspecs import hookimpl
        from diffstack.types import AttentionOffer

        def slow_attention(q, k, v):
            for _ in range(40):
                out = F.scaled_dot_product_attention(q, k, v)
            return out

        @hookimpl
        def select_attention(model):
            return [AttentionOffer(name="slow", priority=100, build=lambda model: slow_attention)]
    """,
    "fake_hook_raises": """
        from diffstack.hookspecs import hookimpl

        @hookimpl
        def build_sigmas(model):
            raise RuntimeError("schedule table missing")
    """,
    "fake_misspelled": """
        from diffstack.hookspecs import hookimpl

        @hookimpl
        def select_atention(model):
            return []
    """,
    "fake_answers_badly": """
        from diffstack.hookspecs import hookimpl

        @hookimpl
        def select_attention(model):
            return {"name": "not an offer"}

        @hookimpl
        def build_sigmas(model):
            return ["karras"]
    """,
    "fake_defaults": """
        from diffstack.hookspecs import hookimpl

        @hookimpl
        def build_sigmas(model=None):
            return []
    """,
    "fake_impostor": """
        from diffstack.hookspecs import hookimpl
        from diffstack.types import SigmasOffer

        def linear(steps, scheduler):
            return [float(steps - i) for i in range(steps)] + [0.0]

        @hookimpl
        def build_sigmas(model):
            return [SigmasOffer(name="default", priority=1000, build=linear)]
    """,
    "fake_notes": """
        import torch
        from diffstack.hookspecs import hookimpl
        from diffstack.types import Availability, Built, CompileOffer

        class Unsized(torch.nn.Module):
            # Like torch.compile's module around a UNet: len() (so bool()) raises.

            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.config, self.device, self.dtype = inner.config, inner.device, inner.dtype

            def forward(self, *args, **kwargs):
                return self.inner(*args, **kwargs)

            def __len__(self):
                raise TypeError("UNet2DConditionModel does not support len()")

        @hookimpl
        def compile_model(model):
            return [CompileOffer(
                name="labelled",
                probe=lambda model: Availability.yes("runs anywhere"),
                build=lambda denoiser, model: Built(Unsized(denoiser), notes=("mode eager", "cache cold")),
            )]
    """,
}
ALIASES = {"fake_good_again": "fake_good"}
"""Entry points that name a module another entry point already loads."""


@pytest.fixture(scope="module")
def fake_distribution(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real installed distribution (a .dist-info with entry points) holding every fake plugin."""
    site = tmp_path_factory.mktemp("site")
    for name, source in FAKES.items():
        (site / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / "diffstack_fakes-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: diffstack-fakes\nVersion: 1.0\n")
    targets = {**{name: name for name in FAKES}, **ALIASES}
    (info / "entry_points.txt").write_text(
        "[diffstack]\n" + "".join(f"{n} = {t}\n" for n, t in targets.items())
    )
    return site


@pytest.fixture(scope="module")
def composed(fake_distribution: Path, models_dir: Path) -> tuple[Engine, StackReport]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(fake_distribution))
        settings = baseline_settings(
            models_dir,
            plugins={"allow": [*BASELINE_PLUGINS, *FAKES, *ALIASES]},
            compose={"measure": "always", "repeats": 5},
        )
        engine = Engine.start(settings, load_plugins(settings.plugins))
    return engine, engine.report()


def statuses(report: StackReport, slot: str, offer: str) -> set[CandidateStatus]:
    return {c.status for c in report.slot(slot).candidates if c.offer == offer}


def reasons(report: StackReport, slot: str, offer: str) -> str:
    return " ".join(c.reason for c in report.slot(slot).candidates if c.offer == offer)


def test_plugins_are_listed_with_their_distribution_and_status(composed: tuple[Engine, StackReport]) -> None:
    records = {r.name: r for r in composed[0].plugins}
    assert records["fake_good"].distribution == "diffstack-fakes"
    assert records["fake_good"].status == "loaded"
    assert records["fake_good"].hooks == ("select_attention",)
    assert records["fake_import_error"].status == "failed"
    assert "ModuleNotFoundError" in records["fake_import_error"].error
    assert records["fake_misspelled"].status == "failed"
    assert "select_atention" in records["fake_misspelled"].error


def test_a_correct_kernel_passes_the_numeric_check(composed: tuple[Engine, StackReport]) -> None:
    report = composed[1]
    manual = statuses(report, "select_attention", "manual")
    assert manual, "the manual kernel was considered"
    assert manual <= {CandidateStatus.CHOSEN, CandidateStatus.SLOWER}
    errors = [c.numeric_error for c in report.slot("select_attention").candidates if c.offer == "manual"]
    assert errors
    assert all(e is not None and e < 1e-4 for e in errors)


def test_a_probe_that_says_no_is_rejected_with_its_reason(composed: tuple[Engine, StackReport]) -> None:
    report = composed[1]
    assert statuses(report, "select_attention", "quantum") == {CandidateStatus.REJECTED}
    assert reasons(report, "select_attention", "quantum") == "needs a quantum GPU, found cpu"


def test_wrong_numbers_are_rejected_in_attention_and_compile(composed: tuple[Engine, StackReport]) -> None:
    report = composed[1]
    assert statuses(report, "select_attention", "garbage") == {CandidateStatus.REJECTED}
    assert "relative error" in reasons(report, "select_attention", "garbage")
    assert statuses(report, "compile_model", "doubler") == {CandidateStatus.REJECTED}
    assert report.slot("compile_model").chosen in {("eager",), ("labelled",)}  # both match eager


def test_the_choice_follows_measured_time_not_priority(composed: tuple[Engine, StackReport]) -> None:
    """``slow`` has the highest priority of all and loads last; measurement still turns it down."""
    report = composed[1]
    assert statuses(report, "select_attention", "slow") == {CandidateStatus.SLOWER}
    assert "x the fastest" in reasons(report, "select_attention", "slow")
    assert all(": slow" not in chosen for chosen in report.slot("select_attention").chosen)


def test_a_raising_hook_is_recorded_and_the_slot_still_composes(composed: tuple[Engine, StackReport]) -> None:
    report = composed[1]
    failed = [c for c in report.slot("build_sigmas").candidates if c.plugin == "fake_hook_raises"]
    assert failed[0].status is CandidateStatus.FAILED
    assert "schedule table missing" in failed[0].reason
    assert report.slot("build_sigmas").chosen == ("default",)


def test_generation_still_works_with_every_fake_installed(composed: tuple[Engine, StackReport]) -> None:
    engine = composed[0]
    request = engine.prepare(GenerationRequest("a red circle", steps=2, seeds=(1,)))
    (result,) = engine.run([GenerationJob(request)])
    assert isinstance(result, GenerationResult), result
    (image,) = result.images
    assert (image.seed, image.image.size) == (1, (64, 64))
    assert np.asarray(image.image).std() > 0, "a picture, not a blank"


def test_the_report_records_timings_when_measuring(composed: tuple[Engine, StackReport]) -> None:
    report = composed[1]
    assert report.measured
    timed = [c for c in report.slot("select_attention").candidates if c.status is CandidateStatus.CHOSEN]
    assert timed and all(c.time_ms is not None and c.time_ms > 0 for c in timed)
    assert report.slot("compile_model").candidates[0].setup_s is not None


def test_deny_list_turns_a_plugin_off(
    fake_distribution: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(fake_distribution))
    settings = baseline_settings(models_dir, plugins={"allow": None, "deny": ["fake_good"]})
    records = {r.name: r for r in load_plugins(settings.plugins).records}
    assert records["fake_good"].status == "disabled"
    assert records["sdpa"].status == "loaded"


def test_autoload_off_loads_nothing(models_dir: Path) -> None:
    settings = baseline_settings(models_dir, plugins={"autoload": False})
    assert load_plugins(settings.plugins).records == ()


def test_answers_that_are_not_offers_fail_their_plugin_not_the_stack(
    composed: tuple[Engine, StackReport],
) -> None:
    report = composed[1]
    for slot, expected in (
        ("select_attention", "hook returned dict; expected AttentionOffer"),
        ("build_sigmas", "hook returned 'karras'; expected SigmasOffer"),
    ):
        (failed,) = [c for c in report.slot(slot).candidates if c.plugin == "fake_answers_badly"]
        assert failed.status is CandidateStatus.FAILED and expected in failed.reason


def test_load_time_faults_are_recorded(composed: tuple[Engine, StackReport]) -> None:
    records = {r.name: r for r in composed[0].plugins}
    assert records["fake_good"].status is PluginStatus.LOADED
    assert records["fake_good_again"].status is PluginStatus.FAILED
    assert "already loaded as plugin 'fake_good'" in records["fake_good_again"].error
    assert records["fake_defaults"].status is PluginStatus.FAILED
    assert "build_sigmas gives its parameters defaults (model)" in records["fake_defaults"].error


def test_an_offer_named_like_a_built_in_does_not_replace_it(composed: tuple[Engine, StackReport]) -> None:
    report = composed[1]
    assert report.slot("build_sigmas").chosen == ("default",)
    (impostor,) = [c for c in report.slot("build_sigmas").candidates if c.plugin == "fake_impostor"]
    assert impostor.status is CandidateStatus.REJECTED
    assert "already offered in this slot by built-in plugin 'schedules'" in impostor.reason
    chosen = [c for c in report.slot("build_sigmas").candidates if c.status is CandidateStatus.CHOSEN]
    assert [c.plugin for c in chosen] == ["schedules"]


def test_probe_reasons_and_build_notes_reach_the_report(composed: tuple[Engine, StackReport]) -> None:
    report = composed[1]
    (labelled,) = [c for c in report.slot("compile_model").candidates if c.offer == "labelled"]
    assert labelled.notes == ("runs anywhere", "mode eager", "cache cold")
    assert labelled.status in {CandidateStatus.CHOSEN, CandidateStatus.SLOWER}, labelled.reason
    assert "labelled (fake_notes): runs anywhere; mode eager; cache cold" in report_text(report)


def test_the_composed_stack_is_frozen(composed: tuple[Engine, StackReport]) -> None:
    stack = composed[0].model().stack
    with pytest.raises(dataclasses.FrozenInstanceError):
        stack.auto_schedule = "karras"  # type: ignore[misc]
    with pytest.raises(TypeError):
        stack.schedules["karras"] = stack.schedules["default"]  # type: ignore[index]
