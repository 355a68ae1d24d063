"""What the server needs from an engine: :class:`diffstack.engine.ServingEngine`, re-exported here.

The server is written against this protocol so that unit tests can drive the queue with a small fake,
and so that a replica host (Ray Serve) can hand the same servicers any object with these methods.
"""

from __future__ import annotations

from diffstack.engine.worker import ServingEngine

__all__ = ["ServingEngine"]
