"""API keys for the generation service: UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED per key,
labels on the metrics, secrets never in logs or metrics."""

from __future__ import annotations

import logging
import re
import shutil
import threading
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from diffstack.config import load_settings
from diffstack_client import DiffstackClient, Finished, ServiceError, tls_credentials
from diffstack_server.keys import load_keys
from diffstack_server.testing import WAIT_S, SpyEngine, make_certificate

SECRET_A = "a-secret-key-0123456789"
SECRET_B = "b-secret-key-0123456789"


def _keys(**limits: Any) -> list[dict[str, Any]]:
    return [{"label": "team-a", "key": SECRET_A, **limits}, {"label": "team-b", "key": SECRET_B}]


def _refusal(client: DiffstackClient, **params: Any) -> ServiceError:
    with pytest.raises(ServiceError) as failure:
        client.generate("a cube", steps=1, **params)
    return failure.value


def test_generation_needs_a_known_key_and_diagnostics_do_not(
    start_server: Any, spy: SpyEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = start_server(spy, server={"api_keys": _keys(), "metrics_port": 0})
    with DiffstackClient(server.target, timeout=WAIT_S) as anonymous:
        missing = _refusal(anonymous)
        assert missing.code is grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in missing.message
        assert anonymous.models() and anonymous.health() == "SERVING"
    with DiffstackClient(server.target, timeout=WAIT_S, api_key="not-a-key-of-this-server") as stranger:
        assert _refusal(stranger).code is grpc.StatusCode.UNAUTHENTICATED
    with DiffstackClient(server.target, timeout=WAIT_S, api_key=SECRET_B) as caller:
        assert caller.generate("a cube", steps=1).images
        assert list(caller.stream("a cube", steps=1))
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'diffstack_key_calls_total{key="team-b",outcome="admitted"} 2.0' in text
    assert 'diffstack_key_calls_total{key="",outcome="unauthenticated"} 2.0' in text
    assert 'diffstack_key_in_flight{key="team-b"} 0.0' in text
    assert SECRET_B not in text and SECRET_B not in caplog.text and "not-a-key" not in caplog.text
    assert "team-b" in caplog.text  # the label names the caller in the access log


def test_a_key_limited_to_models_is_permission_denied_elsewhere(start_server: Any, spy: SpyEngine) -> None:
    server = start_server(spy, server={"api_keys": _keys(models=["other"])})
    with DiffstackClient(server.target, timeout=WAIT_S, api_key=SECRET_A) as caller:
        refused = _refusal(caller)
        assert refused.code is grpc.StatusCode.PERMISSION_DENIED and "'team-a'" in refused.message


def test_a_key_over_its_rate_is_resource_exhausted_with_a_retry_hint(
    start_server: Any, spy: SpyEngine
) -> None:
    server = start_server(spy, server={"api_keys": _keys(rate_per_minute=1, burst=2)})
    with (
        DiffstackClient(server.target, timeout=WAIT_S, api_key=SECRET_A) as limited,
        DiffstackClient(server.target, timeout=WAIT_S, api_key=SECRET_B) as other,
    ):
        limited.generate("a cube", steps=1)
        limited.generate("a cube", steps=1)
        refused = _refusal(limited)
        assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "rate" in refused.message
        assert refused.retry_after_s is not None and 0 < refused.retry_after_s <= 60
        assert other.generate("a cube", steps=1).images  # each key has its own limits


def test_a_key_at_its_concurrency_is_resource_exhausted(start_server: Any, spy: SpyEngine) -> None:
    spy.gate = threading.Event()
    server = start_server(spy, server={"api_keys": _keys(max_concurrent=1)})
    with DiffstackClient(server.target, timeout=WAIT_S, api_key=SECRET_A) as caller:
        first = threading.Thread(target=lambda: caller.generate("a cube", steps=1, seed=1))
        first.start()
        try:
            assert spy.entered.wait(WAIT_S)
            refused = _refusal(caller, seed=2)
            assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_concurrent" in refused.message
        finally:
            spy.gate.set()
            first.join(WAIT_S)
        assert caller.generate("a cube", steps=1, seed=3).images  # the slot came back


def test_keys_come_from_a_file_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(f'[[keys]]\nlabel = "filed"\nkey = "{SECRET_A}"\nmax_concurrent = 2\n')
    monkeypatch.setenv("DIFFSTACK_SERVER__API_KEYS", f'[{{"label": "env", "key": "{SECRET_B}"}}]')
    settings = load_settings(server={"api_keys_file": str(keys_file)})
    keys = load_keys(settings)
    assert [(k.label, k.max_concurrent) for k in keys] == [("env", None), ("filed", 2)]
    assert SECRET_A not in repr(keys) and SECRET_B not in repr(settings)
    keys_file.write_text(f'[[keys]]\nlabel = "env"\nkey = "{SECRET_A}"\n')
    with pytest.raises(ValueError, match="label of its own"):
        load_keys(settings)


# -------------------------------------------------------------------------------------------------
# mTLS identities as callers
# -------------------------------------------------------------------------------------------------


def _metric(server: Any, label: str, outcome: str) -> str:
    port = server.server.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.search(rf'diffstack_key_calls_total{{key="{label}",outcome="{outcome}"}} (\S+)', text)
    return found.group(1) if found else "absent"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_a_client_certificate_is_a_caller_with_its_limits_and_label(
    start_server: Any, spy: SpyEngine, tmp_path: Path
) -> None:
    ca = make_certificate(tmp_path, "test-ca")
    server_key, server_cert = make_certificate(tmp_path, "server", ca)
    people = {
        "alice": make_certificate(tmp_path, "alice", ca, "DNS:alice.example"),
        "carol": make_certificate(tmp_path, "carol", ca, "URI:spiffe://diffstack/carol"),
        "mallory": make_certificate(tmp_path, "mallory", ca, "DNS:mallory.example"),
    }
    callers = [
        {"label": "alice", "tls_identity": "alice", "rate_per_minute": 1.0, "burst": 2},  # subject CN
        {"label": "carol", "tls_identity": "spiffe://diffstack/carol"},  # a SAN URI
        {"label": "team-b", "key": SECRET_B},
    ]
    tls = {"tls_cert": server_cert, "tls_key": server_key, "tls_client_ca": ca[1]}
    server = start_server(spy, server={**tls, "api_keys": callers, "metrics_port": 0})

    def client(name: str, api_key: str | None = None) -> DiffstackClient:
        key, cert = people[name]
        credentials = tls_credentials(ca=ca[1], cert=cert, key=key)
        return DiffstackClient(server.target, timeout=WAIT_S, credentials=credentials, api_key=api_key)

    with client("alice") as alice:
        assert alice.generate("a cube", steps=1).images and alice.generate("a cube", steps=1).images
        limited = _refusal(alice)
        assert limited.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "'alice'" in limited.message
        assert limited.retry_after_s is not None and limited.retry_after_s > 0
    with client("carol") as carol:
        job_id = carol.submit_job("a cube", steps=1, seed=3)
        assert isinstance(list(carol.watch_job(job_id))[-1], Finished)
    with client("mallory") as mallory:
        refused = _refusal(mallory)
        assert refused.code is grpc.StatusCode.UNAUTHENTICATED and "'mallory'" in refused.message
    with client("mallory", api_key=SECRET_B) as keyed:  # a key sent wins over the certificate
        assert keyed.generate("a cube", steps=1).images
        assert job_id not in [job.job_id for job in keyed.list_jobs()]  # jobs stay with their caller
    assert (_metric(server, "alice", "admitted"), _metric(server, "alice", "rate_limited")) == ("2.0", "1.0")
    assert _metric(server, "carol", "admitted") == "2.0"  # SubmitJob and WatchJob
    assert _metric(server, "team-b", "admitted") == "2.0"
    assert _metric(server, "", "unauthenticated") == "1.0"


def test_a_tls_identity_needs_client_certificates_verified() -> None:
    callers = [{"label": "alice", "tls_identity": "alice"}]
    with pytest.raises(ValueError, match="tls_client_ca"):
        load_keys(load_settings(server={"api_keys": callers}))
    with pytest.raises(ValueError, match="a key, a tls_identity or both"):
        load_settings(server={"api_keys": [{"label": "nobody"}]})
