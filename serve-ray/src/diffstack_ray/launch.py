"""Starting the replicas: the Ray Serve application, its gRPC options, and ``diffstack serve --replicas``.

Each replica asks Ray for one GPU when the cluster has GPUs, else one CPU, so N replicas spread over
the cluster's GPUs (or CPU slots) and Ray places them on whatever machines joined it. The gRPC port is
Ray Serve's proxy, one per node that runs a replica (``server.port``); Ray's HTTP proxy listens on
loopback only. Ray 2.60's gRPC proxy binds every interface (``[::]``): put it behind a firewall.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import ray
import structlog
from ray import serve
from ray.serve.config import gRPCOptions

from diffstack.config import Settings
from diffstack_ray.replica import Replica

log = structlog.get_logger("diffstack.ray")

APP_NAME = "diffstack"
SERVICER_FUNCTIONS = (
    "diffstack_ray.wire.add_generation_service",
    "diffstack_ray.wire.add_diagnostics_service",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
)
"""The services Ray's gRPC proxy serves (ours through :mod:`diffstack_ray.wire`, so their messages
pickle); reflection, v1alpha only, is Ray's own."""


def grpc_options(settings: Settings) -> gRPCOptions:
    return gRPCOptions(
        port=settings.server.port,
        grpc_servicer_functions=list(SERVICER_FUNCTIONS),
        enable_reflection=settings.server.reflection,
    )


def build_app(settings: Settings, replicas: int, gpus: bool) -> Any:
    """The Ray Serve application: ``replicas`` copies of :class:`Replica` over ``settings``.

    Ray refuses requests beyond each replica's queue (``server.queue_size``) with RESOURCE_EXHAUSTED.
    """
    deployment = serve.deployment(
        name="Replica",
        num_replicas=replicas,
        ray_actor_options={"num_gpus": 1} if gpus else {"num_cpus": 1},
        max_ongoing_requests=settings.server.queue_size,
        max_queued_requests=settings.server.queue_size,
        health_check_period_s=2,
    )(Replica)
    return deployment.bind(settings.model_dump(mode="json"))


def unsupported(settings: Settings) -> list[str]:
    """Settings the replicas cannot honour yet: they live in the plain server's interceptors (admin
    token, API keys) and its port (TLS), none of which Ray's proxy runs. Refused, never ignored."""
    server = settings.server
    found = []
    if server.admin_token:
        found.append("server.admin_token")
    if server.api_keys or server.api_keys_file:
        found.append("server.api_keys")
    if server.tls_cert or server.tls_key or server.tls_client_ca:
        found.append("server TLS")
    return found


def start_replicas(settings: Settings, replicas: int) -> None:
    """Start Ray Serve with the gRPC proxy on ``server.port`` and run the application (blocks until the
    replicas are ready). Joins the cluster named by ``RAY_ADDRESS``, else starts a local one."""
    refused = unsupported(settings)
    if refused:
        raise ValueError(f"replicas cannot serve with {', '.join(refused)} yet: use the plain server")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    serve.start(http_options={"host": "127.0.0.1", "port": 0}, grpc_options=grpc_options(settings))
    serve.run(build_app(settings, replicas, gpus), name=APP_NAME)
    log.info("replicas_serving", replicas=replicas, port=settings.server.port, gpus=gpus)


def run_replicas(settings: Settings) -> int:
    """``diffstack serve --replicas N``: serve until SIGTERM or SIGINT, then shut Serve down."""
    start_replicas(settings, settings.server.replicas)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own handlers
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    log.info("draining")
    serve.shutdown()
    ray.shutdown()
    return 0
