"""The generated diffstack.v1 modules under stable names: ``from diffstack_client.v1 import types_pb2``.

They are made by scripts/gen_proto.py from proto/diffstack/v1 and never edited by hand.
"""

from diffstack_client._generated.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    types_pb2,
)

__all__ = ["diagnostics_pb2", "diagnostics_pb2_grpc", "generation_pb2", "generation_pb2_grpc", "types_pb2"]
