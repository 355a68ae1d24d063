"""Typed Python client for the diffstack gRPC service, sync and asyncio.

    from diffstack_client import DiffstackClient

    with DiffstackClient("127.0.0.1:50051") as client:
        client.wait_until_serving()
        client.generate("a large yellow triangle on the right on a black background", seed=7).save("out/")

The generated stubs live in :mod:`diffstack_client.v1` (made by scripts/gen_proto.py).
"""

from diffstack_client._common import (
    Event,
    Finished,
    GeneratedImage,
    Generation,
    Picture,
    Preview,
    Progress,
    Queued,
    ServiceError,
    SpecParams,
    outpaint,
    tls_credentials,
)
from diffstack_client.aio import AsyncDiffstackClient
from diffstack_client.client import DiffstackClient
from diffstack_client.diagnostics import (
    Candidate,
    CandidateStatus,
    OptionSchema,
    OptionType,
    Plugin,
    PluginStatus,
    SlotReport,
    StackReport,
    WrapperSchema,
)

__all__ = [
    "AsyncDiffstackClient",
    "Candidate",
    "CandidateStatus",
    "DiffstackClient",
    "Event",
    "Finished",
    "GeneratedImage",
    "Generation",
    "OptionSchema",
    "OptionType",
    "Picture",
    "Plugin",
    "PluginStatus",
    "Preview",
    "Progress",
    "Queued",
    "ServiceError",
    "SlotReport",
    "SpecParams",
    "StackReport",
    "WrapperSchema",
    "outpaint",
    "tls_credentials",
]
