"""Model names from clients: one key per model, safe names only, loading by the admin's policy, capped."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from diffstack.config import Settings
from diffstack.errors import Overloaded
from diffstack_client import DiffstackClient, ServiceError
from diffstack_server import BackgroundServer
from diffstack_server.testing import WAIT_S

MODEL = "tiny-sd1"


@pytest.fixture
def models(models_dir: Path, tmp_path: Path) -> Path:
    """A models dir with the tiny model, a second copy ``other``, a link ``alias`` → ``other``, and a
    folder ``broken`` that claims to be a diffusers model but has no denoiser config."""
    root = tmp_path / "models"
    root.mkdir()
    shutil.copytree(models_dir / MODEL, root / MODEL)
    shutil.copytree(models_dir / MODEL, root / "other")
    (root / "alias").symlink_to(root / "other")
    (root / "broken").mkdir()
    (root / "broken" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture
def serve_models(
    models: Path, settings_at: Callable[..., Settings]
) -> Iterator[Callable[..., BackgroundServer]]:
    """``serve_models(engine={...}, server={...})``: a server that starts its own engine on ``models``."""
    servers: list[BackgroundServer] = []

    def start(**sections: dict[str, Any]) -> BackgroundServer:
        engine = {"warmup_steps": 0, **sections.pop("engine", {})}
        server = BackgroundServer(settings_at(models, engine=engine, **sections))
        servers.append(server)
        return server.start(ready_timeout=WAIT_S)

    yield start
    for server in servers:
        server.stop(grace=0)


def failure_of(client: DiffstackClient, **params: Any) -> ServiceError:
    with pytest.raises(ServiceError) as failure:
        client.generate("a cube", steps=1, **params)
    return failure.value


def loaded_models(client: DiffstackClient) -> set[str]:
    return {model.name for model in client.models() if model.loaded}


@pytest.mark.parametrize(
    "name",
    [
        "./other",
        "other/",
        "other/.",
        ".//other",
        "a/b",
        "..",
        ".",
        ".hidden",
        "x\x00y",
        "m" * 256,
        "tiny sd1",
    ],
)
def test_unsafe_model_names_are_invalid_arguments_naming_the_field(
    serve_models: Callable[..., BackgroundServer], name: str
) -> None:
    server = serve_models(engine={"load_on_request": True})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        error = failure_of(client, model=name)
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT, error
        assert "spec.model" in error.violations
        assert len(error.message) < 400  # the name is echoed bounded
        assert loaded_models(client) == {MODEL}


def test_every_spelling_of_a_model_loads_it_once(serve_models: Callable[..., BackgroundServer]) -> None:
    server = serve_models(engine={"load_on_request": True})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        for name in ("other", "alias", "other", "alias"):
            assert client.generate("a cube", steps=1, model=name).model == "other"
        assert loaded_models(client) == {MODEL, "other"}
        assert client.stats().engine["models_loaded"] == 2


def test_loading_on_request_is_off_unless_the_admin_turns_it_on(
    serve_models: Callable[..., BackgroundServer],
) -> None:
    server = serve_models()
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        error = failure_of(client, model="other")
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "not loaded" in error.violations["spec.model"]
        with pytest.raises(ServiceError) as stack_failure:
            client.stack("other")
        assert stack_failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert loaded_models(client) == {MODEL}
        assert failure_of(client, model="no-such-model").code is grpc.StatusCode.INVALID_ARGUMENT


def test_preloaded_models_serve_without_loading_on_request(
    serve_models: Callable[..., BackgroundServer],
) -> None:
    server = serve_models(engine={"preload": ["alias"]})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        assert loaded_models(client) == {MODEL, "other"}
        assert client.generate("a cube", steps=1, model="other").model == "other"


def test_loaded_models_are_capped_and_the_default_stays(
    serve_models: Callable[..., BackgroundServer], models: Path
) -> None:
    shutil.copytree(models / "other", models / "third")
    server = serve_models(engine={"load_on_request": True, "max_loaded_models": 2})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        client.generate("a cube", steps=1, model="other")
        assert loaded_models(client) == {MODEL, "other"}
        client.generate("a cube", steps=1, model="third")  # the least recently used other model goes
        assert loaded_models(client) == {MODEL, "third"}
        client.generate("a cube", steps=1)
        assert loaded_models(client) == {MODEL, "third"}


def test_a_model_that_does_not_fit_the_memory_budget_is_refused(
    serve_models: Callable[..., BackgroundServer],
) -> None:
    server = serve_models(engine={"load_on_request": True, "max_models_bytes": 1})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        error = failure_of(client, model="other")
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "engine.max_models_bytes" in error.message
        assert loaded_models(client) == {MODEL}  # the default model is never unloaded
        assert client.generate("a cube", steps=1).images


def test_a_model_that_cannot_load_is_named_without_server_paths(
    serve_models: Callable[..., BackgroundServer], models: Path
) -> None:
    server = serve_models(engine={"load_on_request": True})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        error = failure_of(client, model="broken")
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert "'broken'" in error.message
        assert str(models) not in error.message and str(models.resolve()) not in error.message
        listing = {model.name: model for model in client.models()}
        assert str(models.resolve()) not in listing["broken"].family


def test_a_model_in_use_is_never_unloaded(models: Path, settings_at: Callable[..., Settings]) -> None:
    from diffstack.engine import Engine

    shutil.copytree(models / "other", models / "third")
    engine = Engine.start(settings_at(models, engine={"warmup_steps": 0, "max_loaded_models": 2}))
    held = engine.load(engine.resolve("alias"))
    with pytest.raises(Overloaded, match=r"engine\.max_loaded_models"):
        engine.load(engine.resolve("third"))
    engine.unpin(held)
    engine.unpin(engine.load(engine.resolve("third")))
    assert engine.is_loaded("third") and engine.is_loaded() and not engine.is_loaded("other")


def test_a_caller_that_leaves_while_its_model_loads_does_not_hold_it(
    models: Path, settings_at: Callable[..., Settings]
) -> None:
    import threading

    from diffstack.engine import Engine
    from diffstack_server.testing import SpyEngine

    shutil.copytree(models / "other", models / "third")
    settings = settings_at(
        models, engine={"warmup_steps": 0, "max_loaded_models": 2, "load_on_request": True}
    )
    engine = Engine.start(settings)
    spy = SpyEngine(engine, load_gate=threading.Event())
    with BackgroundServer(settings, spy) as server, DiffstackClient(server.target) as client:
        with pytest.raises(ServiceError) as failure:
            client.generate("a cube", steps=1, model="other", timeout=0.5)
        assert failure.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        spy.load_gate.set()
        client.generate("a cube", steps=1, model="other", timeout=WAIT_S)
        # Had the abandoned load kept its hold, "other" could not make room for "third".
        assert client.generate("a cube", steps=1, model="third", timeout=WAIT_S).model == "third"
        assert loaded_models(client) == {MODEL, "third"}


def test_requests_for_a_loaded_model_are_prepared_while_another_model_loads(
    models: Path, settings_at: Callable[..., Settings]
) -> None:
    import threading

    from diffstack.engine import Engine
    from diffstack_client import Queued
    from diffstack_server.testing import SpyEngine

    settings = settings_at(models, engine={"warmup_steps": 0, "load_on_request": True})
    spy = SpyEngine(Engine.start(settings), load_gate=threading.Event())
    with BackgroundServer(settings, spy) as server, DiffstackClient(server.target, timeout=WAIT_S) as client:
        loading = client.stream("needs the other model", steps=1, model="other")
        waiter = threading.Thread(target=lambda: list(loading))
        waiter.start()
        assert spy.loading.wait(WAIT_S)  # the device thread is loading "other", held at the gate
        queued = client.stream("the default model", steps=1, seed=9)
        assert next(queued) == Queued(0)  # validated and queued while the load holds the device thread
        assert not spy.load_gate.is_set()
        spy.load_gate.set()
        assert list(queued)[-1].result.images[0].seed == 9
        waiter.join(WAIT_S)
