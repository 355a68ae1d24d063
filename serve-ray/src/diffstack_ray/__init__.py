"""diffstack as Ray Serve replicas: the server's own servicers, one replica per GPU or CPU slot, behind
Ray Serve's gRPC ingress. Ray stays out of the plain server's dependencies: this distribution adds it."""

from diffstack_ray.launch import build_app, grpc_options, run_replicas

__all__ = ["build_app", "grpc_options", "run_replicas"]
