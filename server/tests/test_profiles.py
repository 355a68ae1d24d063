"""A request naming a profile: its defaults under the spec's own fields and under the server's policy."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from diffstack.config import Limits, Settings
from diffstack.errors import InvalidRequest
from diffstack_client import DiffstackClient, ServiceError
from diffstack_client.v1 import types_pb2
from diffstack_server import BackgroundServer
from diffstack_server.convert import request_from_spec
from diffstack_server.testing import WAIT_S, SpyEngine


def test_a_spec_naming_a_profile_starts_from_its_defaults_and_its_own_fields_win() -> None:
    speed = request_from_spec(types_pb2.GenerationSpec(prompt="a", profile="speed"), Limits())
    assert (speed.steps, speed.sampler, speed.schedule) == (10, "euler", "ays")
    assert speed.wrappers == {"deepcache": {"interval": 2}}
    spec = types_pb2.GenerationSpec(prompt="a", profile="speed", steps=4, schedule="karras")
    spec.wrappers["deepcache"].options["interval"].int_value = 3
    own = request_from_spec(spec, Limits())
    assert (own.steps, own.sampler, own.schedule) == (4, "euler", "karras")
    assert own.wrappers == {"deepcache": {"interval": 3}}


def test_an_unknown_profile_is_refused_on_spec_profile() -> None:
    with pytest.raises(InvalidRequest) as caught:
        request_from_spec(types_pb2.GenerationSpec(prompt="a", profile="fastest"), Limits())
    assert [v.field for v in caught.value.violations] == ["spec.profile"]


PROFILES = {"two": {"steps": 2, "schedule": "karras"}}


def test_a_request_names_a_profile_from_the_servers_settings(
    start_server: Callable[..., BackgroundServer], spy: SpyEngine
) -> None:
    server = start_server(spy, profiles=PROFILES)
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        assert client.generate("a red circle", profile="two", seed=11).images
        assert spy.jobs[11].steps_total == 2
        assert client.generate("a red circle", profile="two", steps=3, seed=12).images
        assert spy.jobs[12].steps_total == 3


def test_the_servers_engine_profile_is_the_default_one(
    settings_for: Callable[..., Settings], spy: SpyEngine
) -> None:
    server = BackgroundServer(settings_for(profiles=PROFILES, engine={"profile": "two"}), spy)
    server.start(ready_timeout=WAIT_S)
    try:
        with DiffstackClient(server.target, timeout=WAIT_S) as client:
            assert client.generate("a red circle", seed=21).images
            assert spy.jobs[21].steps_total == 2
    finally:
        server.stop(grace=0)


def test_a_profile_cannot_enable_what_the_admin_left_out(
    start_server: Callable[..., BackgroundServer], spy: SpyEngine
) -> None:
    # The test server loads the baseline plugins only, as an admin's plugins.allow would: no DeepCache
    # and no AYS schedule.
    server = start_server(spy, profiles={"cached": {"wrappers": {"deepcache": {"interval": 2}}}})
    with DiffstackClient(server.target, timeout=WAIT_S) as client:
        for profile, refused in (("cached", "sets wrappers, refused"), ("speed", "sets schedule, refused")):
            with pytest.raises(ServiceError) as failure:
                client.generate("a red circle", profile=profile)
            assert failure.value.code is grpc.StatusCode.INVALID_ARGUMENT
            reason = failure.value.violations["spec.profile"]
            assert f"profile {profile!r} {refused}" in reason
            assert ("deepcache" if profile == "cached" else "'ays'") in reason
        with pytest.raises(ServiceError) as failure:
            client.generate("a red circle", profile="cached", wrappers={"deepcache": {}})
        assert "spec.wrappers" in failure.value.violations
