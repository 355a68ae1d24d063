"""Bad requests: every problem reported at once, each naming the client's field."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from diffstack.config import CPU_MAX_COST, CUDA_MAX_COST, Limits
from diffstack.engine import Engine, GenerationRequest
from diffstack.engine.tokens import TokenCounter
from diffstack.engine.validation import prepare_request
from diffstack.errors import MAX_VIOLATIONS, FieldViolation, InvalidRequest
from diffstack.hookspecs import hookimpl
from diffstack.plugins import PluginHost
from diffstack.testing import BASELINE_PLUGINS, baseline_settings, clip_tokenizer
from diffstack.types import PluginRecord, SigmasOffer


def fields_of(engine: Engine, **fields: object) -> set[str]:
    with pytest.raises(InvalidRequest) as error:
        engine.prepare(GenerationRequest(**{"prompt": "a red circle", **fields}))  # type: ignore[arg-type]
    return {v.field for v in error.value.violations}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 65}, "width"),
        ({"height": -8}, "height"),
        ({"width": 4096, "height": 4096}, "width"),
        ({"steps": 1000}, "steps"),
        ({"guidance": -1.0}, "guidance"),
        ({"guidance": float("nan")}, "guidance"),
        ({"sampler": "nope"}, "sampler"),
        ({"sampler": "flow_euler"}, "sampler"),
        ({"schedule": "nope"}, "schedule"),
        ({"schedule": "karras", "sampler": "ddim"}, "schedule"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 99}, "num_images"),
        ({"seeds": (1, 2, 3)}, "seeds"),
        ({"seeds": (-1,)}, "seeds"),
        ({"prompt": "cat " * 100}, "prompt"),
        ({"negative_prompt": "dog " * 100}, "negative_prompt"),
        ({"wrappers": {"nope": {}}}, "wrappers"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 1.5}, "strength"),
        ({"init_image": Image.new("RGB", (64, 64)), "strength": 0.01}, "strength"),
        ({"model": "../etc"}, "model"),
    ],
)
def test_each_bad_field_is_named(engine: Engine, fields: dict[str, object], field: str) -> None:
    assert field in fields_of(engine, **fields)


def test_all_violations_come_back_together(engine: Engine) -> None:
    assert fields_of(engine, width=3, steps=10_000, sampler="x") >= {"width", "steps", "sampler"}


def test_flux_takes_no_negative_prompt(engine: Engine) -> None:
    assert "negative_prompt" in fields_of(engine, model="tiny-flux", negative_prompt="blurry")


def test_defaults_come_from_the_model_card(engine: Engine) -> None:
    request = engine.prepare(GenerationRequest("a red circle"))
    assert (request.width, request.height, request.steps, request.sampler) == (64, 64, 4, "euler")
    assert len(request.seeds) == 1


# -------------------------------------------------------------------------------------------------
# Prompts are measured before they are tokenized, with validation's own tokenizer
# -------------------------------------------------------------------------------------------------


def violations(engine: Engine, limits: Limits, **fields: object) -> dict[str, str]:
    request = GenerationRequest(**{"prompt": "a red circle", **fields})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as error:
        prepare_request(request, engine.model(), limits)
    return {v.field: v.description for v in error.value.violations}


def test_a_long_prompt_is_refused_by_its_length_before_tokenizing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(text: str) -> int:
        raise AssertionError("tokenized a prompt that is too long to tokenize")

    monkeypatch.setattr(engine.model(), "count_tokens", never)
    found = violations(engine, Limits(max_prompt_bytes=3999), prompt="x" * 2001, negative_prompt="é" * 2000)
    assert found == {
        "prompt": "2001 characters, more than the limit of 2000",
        "negative_prompt": "4000 bytes of UTF-8, more than the limit of 3999",
    }


def test_prompt_bytes_are_checked_after_characters(engine: Engine) -> None:
    found = violations(engine, Limits(max_prompt_bytes=100), prompt="😀" * 26)
    assert found == {"prompt": "104 bytes of UTF-8, more than the limit of 100"}


def test_a_lone_surrogate_is_a_field_violation(engine: Engine) -> None:
    assert "prompt" in violations(engine, Limits(), prompt="a \ud800 b")


def test_validation_counts_with_its_own_tokenizer(engine: Engine) -> None:
    model = engine.model()
    assert model.count_tokens._tokenizer is not model.pipeline.tokenizer


def test_token_counts_stay_right_while_the_engine_tokenizes() -> None:
    """The engine truncates to 77 on its thread while validation counts untruncated on others: with a
    shared fast tokenizer, counts of 77 came back for a 302-token prompt (measured here)."""
    shared = clip_tokenizer()
    counter = TokenCounter(shared)
    prompt = "cat " * 100
    expected = len(shared(prompt, truncation=False).input_ids)
    assert expected > 77
    seen: set[int] = set()

    def engine_thread() -> None:
        for _ in range(200):
            shared(prompt, padding="max_length", truncation=True, max_length=77)

    def validation_thread() -> None:
        for _ in range(200):
            seen.add(counter(prompt))

    threads = [threading.Thread(target=t) for t in (engine_thread, validation_thread) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert seen == {expected}


# -------------------------------------------------------------------------------------------------
# Cost: steps x pixels x images, sized to the device
# -------------------------------------------------------------------------------------------------


def test_cost_limits_are_sized_to_the_device() -> None:
    assert Limits().cost_limit("cpu") == CPU_MAX_COST
    assert Limits().cost_limit("cuda:0") == CUDA_MAX_COST > CPU_MAX_COST
    assert Limits(max_cost=5).cost_limit("cuda") == 5
    # The request the issue measured at ~50 minutes on a CPU is refused there by default.
    assert CPU_MAX_COST < 150 * 1024 * 1024 * 8


def test_a_request_over_the_cost_limit_is_refused(engine: Engine) -> None:
    limit = 4 * 64 * 64 * 2
    assert prepare_request(
        GenerationRequest("a red circle", steps=4, num_images=2, width=64, height=64),
        engine.model(),
        Limits(max_cost=limit),
    )
    found = violations(engine, Limits(max_cost=limit), steps=4, num_images=3, width=64, height=64)
    assert found == {
        "steps": "4 steps x 64x64 x 3 images = 49152 pixel-steps, more than this server allows on cpu "
        "(32768): ask for fewer steps, fewer images or a smaller size"
    }


def test_img2img_costs_the_steps_it_runs(engine: Engine) -> None:
    picture = Image.new("RGB", (64, 64))
    limits = Limits(max_cost=2 * 64 * 64)
    assert prepare_request(
        GenerationRequest("a red circle", steps=4, strength=0.5, init_image=picture), engine.model(), limits
    )
    assert "steps" in violations(engine, limits, steps=4, strength=0.75, init_image=picture)


# -------------------------------------------------------------------------------------------------
# Wrapper options are checked against the offer's declaration before any plugin runs
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def with_deepcache(models_dir: Path) -> Engine:
    settings = baseline_settings(
        models_dir, plugins={"allow": [*BASELINE_PLUGINS, "deepcache"]}, engine={"warmup_steps": 0}
    )
    return Engine.start(settings)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"interval": 0}, "wrappers.deepcache.interval"),
        ({"interval": float("nan")}, "wrappers.deepcache.interval"),
        ({"interval": "three"}, "wrappers.deepcache.interval"),
        ({"branch": -1}, "wrappers.deepcache.branch"),
        ({"start": 0.5}, "wrappers.deepcache.start"),
        ({"intervall": 2}, "wrappers.deepcache.intervall"),
    ],
)
def test_bad_wrapper_options_name_the_option(
    with_deepcache: Engine, options: dict[str, object], field: str
) -> None:
    assert fields_of(with_deepcache, wrappers={"deepcache": options}) == {field}


def test_good_wrapper_options_pass(with_deepcache: Engine) -> None:
    request = with_deepcache.prepare(
        GenerationRequest("a red circle", wrappers={"deepcache": {"interval": 2}})
    )
    assert request.wrappers == {"deepcache": {"interval": 2}}


# -------------------------------------------------------------------------------------------------
# Schedules are checked at the request's own step count
# -------------------------------------------------------------------------------------------------


def _capped(steps: int, scheduler: object) -> list[float]:
    """Right at composition's 10 steps, short at 20: 17 steps' worth of sigmas at most."""
    count = min(steps, 17)
    return [float(count - i) for i in range(count + 1)]


def _linear(steps: int, scheduler: object) -> list[float]:
    return [1 - i / steps for i in range(steps + 1)]


@pytest.fixture(scope="module")
def with_schedules(engine: Engine) -> Engine:
    class Plugin:
        @hookimpl
        def build_sigmas(self) -> list[SigmasOffer]:
            return [
                SigmasOffer(name="capped", priority=10, build=_capped),
                SigmasOffer(name="linear", priority=0, build=_linear),
            ]

    host = PluginHost()
    host.register(Plugin(), PluginRecord("schedules", "", "", "", (), "loaded"))
    return Engine(engine.settings, host)


def test_a_schedule_that_cannot_serve_these_steps_is_refused(with_schedules: Engine) -> None:
    assert with_schedules.prepare(GenerationRequest("a", steps=10, schedule="capped")).schedule == "capped"
    with pytest.raises(InvalidRequest) as error:
        with_schedules.prepare(GenerationRequest("a", steps=20, schedule="capped"))
    [violation] = error.value.violations
    assert violation.field == "schedule"
    assert violation.description == (
        "schedule 'capped' cannot serve 20 steps: gave 18 sigmas for 20 steps, expected 21"
    )


def test_auto_takes_the_best_schedule_that_serves_these_steps(with_schedules: Engine) -> None:
    assert with_schedules.prepare(GenerationRequest("a", steps=10)).schedule == "capped"
    assert with_schedules.prepare(GenerationRequest("a", steps=20)).schedule == "linear"


# -------------------------------------------------------------------------------------------------
# What errors repeat of the client's input is bounded
# -------------------------------------------------------------------------------------------------


def test_echoed_input_is_bounded(engine: Engine) -> None:
    found = violations(engine, Limits(), schedule="s" * 4000, sampler="x" * 4000, wrappers={"w" * 4000: {}})
    assert set(found) == {"schedule", "sampler", "wrappers"}
    assert all(len(description) <= 300 for description in found.values())


def test_a_flood_of_violations_is_cut_short() -> None:
    error = InvalidRequest([FieldViolation(f"f{i}", "bad") for i in range(10_000)])
    assert len(error.violations) == MAX_VIOLATIONS
    assert error.violations[-1].description == f"and {10_000 - MAX_VIOLATIONS + 1} more problems"
    assert len(FieldViolation("x" * 10_000, "y" * 10_000).description) <= 300


def test_defaults_live_on_the_request_type() -> None:
    request = GenerationRequest("a")
    assert (request.schedule, request.strength, request.num_images) == ("auto", 0.75, 1)
    assert GenerationRequest.strength == 0.75


HOSTILE: dict[str, list[object]] = {
    "width": [0, -64, 7, 2**62, 10**30],
    "height": [0, -64, 7, 2**62],
    "steps": [0, -1, 2**62, 10**30],
    "guidance": [float("nan"), float("inf"), -float("inf"), -1.0, 1e308],
    "sampler": ["", "x" * 10_000, "\x00", "flow_euler"],
    "schedule": ["", "x" * 10_000, "\x00", "karras"],
    "num_images": [0, -1, 2**62],
    "seeds": [(-1,), (2**63,), tuple(range(100))],
    "strength": [float("nan"), float("inf"), -1.0, 0.0, 2.0],
    "negative_prompt": ["\ud800", "x" * 100_000],
    "wrappers": [{"": {}}, {"x" * 10_000: {"k": float("nan")}}],
}


@pytest.mark.parametrize(
    ("field", "value"), [(field, value) for field, values in HOSTILE.items() for value in values]
)
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_hostile_values_are_refused_or_served_never_raised(
    engine: Engine, field: str, value: object, img2img: bool
) -> None:
    fields: dict[str, object] = {"prompt": "a red circle", field: value}
    if img2img:
        fields["init_image"] = Image.new("RGB", (64, 64))
    try:
        engine.prepare(GenerationRequest(**fields))  # type: ignore[arg-type]
    except InvalidRequest as error:
        violations = error.violations
    else:
        return
    assert violations
    assert all(len(v.description) <= 300 for v in violations)
