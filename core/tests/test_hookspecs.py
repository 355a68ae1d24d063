"""Each hook spec exercised through the host, and meta-tests that keep the design honest."""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path

import pluggy
import torch

from diffstack import hookspecs
from diffstack.engine import Engine, GenerationJob, GenerationRequest
from diffstack.hookspecs import HOOK_NAMES, hookimpl
from diffstack.plugins import PluginHost
from diffstack.types import (
    AttentionOffer,
    CompileOffer,
    DenoiserKind,
    DenoiserWrapperOffer,
    EncoderOffer,
    Family,
    ModelInfo,
    PluginRecord,
    PluginStatus,
    SigmasOffer,
)

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelInfo("m", Family.SD1, DenoiserKind.UNET, "cpu", torch.float32)


def host_with(plugin: object) -> PluginHost:
    host = PluginHost()
    host.register(plugin, PluginRecord("probe", "", "", "", (), PluginStatus.LOADED))
    return host


def test_select_attention_offers_reach_the_host_tied_to_their_plugin() -> None:
    class Plugin:
        @hookimpl
        def select_attention(self, model: ModelInfo) -> list[AttentionOffer]:
            return [
                AttentionOffer(name="k", build=lambda model: torch.nn.functional.scaled_dot_product_attention)
            ]

    offers, failures = host_with(Plugin()).collect("select_attention", model=MODEL)
    assert [(o.plugin, o.offer.name) for o in offers] == [("probe", "k")] and not failures


def test_build_sigmas_offer_may_return_a_single_offer() -> None:
    class Plugin:
        @hookimpl
        def build_sigmas(self) -> SigmasOffer:  # a subset of the spec's arguments is allowed
            return SigmasOffer(name="flat", build=lambda steps, scheduler: None)

    offers, _ = host_with(Plugin()).collect("build_sigmas", model=MODEL)
    assert [o.offer.name for o in offers] == ["flat"]


def test_encode_prompt_wrappers_see_every_encoding(engine: Engine) -> None:
    seen: list[str] = []

    class Plugin:
        @hookimpl
        def encode_prompt(self, model: ModelInfo) -> list[EncoderOffer]:
            def wrap(inner, model):  # type: ignore[no-untyped-def]
                def encode(spec):  # type: ignore[no-untyped-def]
                    seen.append(spec.prompt)
                    return inner(spec)

                return encode

            return [EncoderOffer(name="spy", wrap=wrap)]

    spied = Engine(engine.settings, host_with(Plugin()))
    request = spied.prepare(GenerationRequest("a blue square", steps=1))
    spied.run([GenerationJob(request)])
    assert "a blue square" in seen
    assert spied.report().slot("encode_prompt").chosen == ("spy",)


def test_wrap_denoiser_wrappers_are_applied_reset_and_removed(engine: Engine) -> None:
    events: list[str] = []

    class Handle:
        def __init__(self, module: torch.nn.Module) -> None:
            self.hook = module.register_forward_hook(lambda *_: events.append("forward"))

        def reset_state(self) -> None:
            events.append("reset")

        def remove(self) -> None:
            events.append("remove")
            self.hook.remove()

    class Plugin:
        @hookimpl
        def wrap_denoiser(self, model: ModelInfo) -> list[DenoiserWrapperOffer]:
            return [DenoiserWrapperOffer(name="spy", apply=lambda module, options: Handle(module))]

    spied = Engine(engine.settings, host_with(Plugin()))
    request = spied.prepare(GenerationRequest("a red circle", steps=2, wrappers={"spy": {}}))
    events.clear()  # composition already tried the wrapper once
    spied.run([GenerationJob(request)])
    assert events == ["reset", "forward", "forward", "remove"]


def test_wrap_denoiser_wrappers_that_take_the_compiled_denoiser_keep_it(engine: Engine) -> None:
    applied_to: dict[str, str] = {}

    class Handle:
        def reset_state(self) -> None: ...

        def remove(self) -> None: ...

    class Compiled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.config, self.device, self.dtype = inner, inner.config, inner.device, inner.dtype

        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return self.inner(*args, **kwargs)

    def spy(name: str, on_compiled: bool) -> DenoiserWrapperOffer:
        def apply(module: torch.nn.Module, options: object) -> Handle:
            applied_to[name] = type(module).__name__
            return Handle()

        return DenoiserWrapperOffer(name=name, apply=apply, on_compiled=on_compiled)

    class Plugin:
        @hookimpl
        def wrap_denoiser(self, model: ModelInfo) -> list[DenoiserWrapperOffer]:
            return [spy("compiled_ok", True), spy("eager_only", False)]

        @hookimpl
        def compile_model(self, model: ModelInfo) -> list[CompileOffer]:
            return [CompileOffer(name="wrapping", build=lambda denoiser, model: Compiled(denoiser))]

    spied = Engine(engine.settings, host_with(Plugin()))
    spied.prepare(GenerationRequest("a", steps=1))  # loads the model: composition tries each wrapper
    # The load's warm-up leaves the compiled wrapper to the server (warmed after SERVING): its own
    # graphs cost a minute of an H200's start, and clients enable it per request.
    assert spied.model().unwarmed_wrappers == ["compiled_ok"]
    for wrappers, expected in [
        ({"compiled_ok": {}}, {"compiled_ok": "Compiled"}),
        (
            {"compiled_ok": {}, "eager_only": {}},
            {"compiled_ok": "UNet2DConditionModel", "eager_only": "UNet2DConditionModel"},
        ),
    ]:
        applied_to.clear()
        (result,) = spied.run(
            [GenerationJob(spied.prepare(GenerationRequest("a", steps=1, wrappers=wrappers)))]
        )
        assert applied_to == expected
        assert bool(result.stack["compile_model"]) == (expected["compiled_ok"] == "Compiled")


def test_compile_model_result_replaces_the_denoiser(engine: Engine) -> None:
    calls: list[int] = []

    class Counting(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.config = inner.config
            self.device, self.dtype = inner.device, inner.dtype  # what pipelines ask of a denoiser

        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            calls.append(1)
            return self.inner(*args, **kwargs)

    class Plugin:
        @hookimpl
        def compile_model(self, model: ModelInfo) -> list[CompileOffer]:
            return [CompileOffer(name="counting", build=lambda denoiser, model: Counting(denoiser))]

    spied = Engine(engine.settings, host_with(Plugin()))
    request = spied.prepare(GenerationRequest("a red circle", steps=3))
    # Loading checked it once and warmed it up through one real generation.
    assert len(calls) == 1 + engine.settings.engine.warmup_steps
    calls.clear()
    spied.run([GenerationJob(request)])
    assert len(calls) == 3


def test_a_misspelled_hook_implementation_is_refused() -> None:
    class Plugin:
        @hookimpl
        def compile_modle(self, model: ModelInfo) -> list[CompileOffer]:
            return []

    host = host_with(Plugin())
    (record,) = host.records
    assert record.status == "failed" and "compile_modle" in record.error


# Meta-tests, in the spirit of datasette's: a hook is not done until it is documented and tested.


def test_every_hook_spec_has_a_test_named_after_it() -> None:
    folders = ["core/tests", "server/tests", "clients/python/tests", "plugins/*/tests", "tests"]
    sources = "\n".join(path.read_text() for folder in folders for path in REPO.glob(f"{folder}/test_*.py"))
    for name in HOOK_NAMES:
        assert re.search(rf"def test_{name}_", sources), f"no test named after hook {name}"


def test_every_hook_spec_is_in_the_plugin_guide_with_its_signature() -> None:
    readme = (REPO / "README.md").read_text()
    guide = readme[readme.index("## Writing a plugin") :]
    for name in HOOK_NAMES:
        parameters = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({parameters})`" in guide, f"README's plugin guide does not show {name}({parameters})"


def test_every_hook_spec_documents_its_parameters_and_its_offers() -> None:
    for name in HOOK_NAMES:
        spec = getattr(hookspecs, name)
        for parameter in inspect.signature(spec).parameters:
            assert f":param {parameter}:" in spec.__doc__, f"{name} does not document {parameter}"
        assert ":return:" in spec.__doc__, f"{name} does not say what it returns"


def test_every_offer_a_hook_returns_is_in_the_public_api() -> None:
    """Plugins import only ``diffstack``: whatever a hook returns must be importable from there."""
    import diffstack
    import diffstack.types

    for name in HOOK_NAMES:
        hints = typing.get_type_hints(getattr(hookspecs, name), localns=vars(diffstack.types))
        returned = hints["return"]
        (offer,) = typing.get_args(returned)
        assert offer.__name__ in diffstack.__all__, f"{name} returns {offer.__name__}, not in diffstack"
        assert getattr(diffstack, offer.__name__) is offer


def test_hook_names_match_the_specs() -> None:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    assert set(HOOK_NAMES) == {name for name in dir(manager.hook) if not name.startswith("_")}
    for name in HOOK_NAMES:
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and "versionadded" in spec.__doc__
        assert list(inspect.signature(spec).parameters) == ["model"]


def test_every_hook_spec_says_a_version_this_package_has_reached() -> None:
    """A spec added in a release the package has not reached would promise what no install has."""
    import diffstack

    installed = tuple(int(part) for part in diffstack.__version__.split(".")[:2])
    for name in HOOK_NAMES:
        added = re.search(r"versionadded:: (\d+)\.(\d+)", getattr(hookspecs, name).__doc__ or "")
        assert added, f"{name} has no versionadded"
        assert (int(added[1]), int(added[2])) <= installed, f"{name} is newer than diffstack {installed}"
