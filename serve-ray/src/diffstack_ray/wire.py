"""Protobuf messages across Ray's processes, and the service registrations Ray's gRPC proxy imports.

Ray pickles each request from its proxy to a replica and each answer back. Our generated classes are
named after the proto package (``diffstack.v1.generation_pb2``), which is no importable module (the
stubs live in ``diffstack_client``), so plain pickling fails. Importing this module registers every
diffstack.v1 message class with :mod:`copyreg` to travel as its full name and its wire bytes; the
proxy imports it through the ``add_*`` functions below, the replicas through :mod:`diffstack_ray.replica`.
"""

from __future__ import annotations

import copyreg
from typing import Any

import grpc
from google.protobuf import message, symbol_database

from diffstack_client.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    types_pb2,
)


def parse(full_name: str, data: bytes) -> message.Message:
    """The message of type ``full_name`` read from ``data`` (how a registered message unpickles)."""
    cls: Any = symbol_database.Default().GetSymbol(full_name)
    parsed: message.Message = cls.FromString(data)
    return parsed


def _reduce(msg: message.Message) -> tuple[Any, tuple[str, bytes]]:
    return parse, (msg.DESCRIPTOR.full_name, msg.SerializeToString())


def _register() -> None:
    for module in (types_pb2, generation_pb2, diagnostics_pb2):
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            _register_message(getattr(module, descriptor.name))


def _register_message(cls: Any) -> None:
    copyreg.pickle(cls, _reduce)
    for nested in cls.DESCRIPTOR.nested_types:
        if not nested.GetOptions().map_entry:
            _register_message(getattr(cls, nested.name))


_register()


def add_generation_service(servicer: Any, server: grpc.Server) -> None:
    """``GenerationService`` for Ray's proxy (importing this module makes its messages picklable)."""
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, server)


def add_diagnostics_service(servicer: Any, server: grpc.Server) -> None:
    """``DiagnosticsService`` for Ray's proxy (importing this module makes its messages picklable)."""
    diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(servicer, server)
