"""gRPC beside HTTP, on the same chassis (``pip install 'kiban[grpc]'``).

A service serves gRPC by adding servicers: ``service.grpc.add(add_XServicer_to_server,
servicer, security=..., methods={...})``; ``kiban run`` then serves them on
``GRPC_PORT`` with the same context, access line, spans, metrics, security, rate limits,
health and shutdown as its HTTP routes. ``service.grpc_channel(target)`` calls another
service with the request context and deadline propagated. See docs/grpc.md.
"""

from kiban._rpc import GRPC_STATUS_OF, HTTP_STATUS_OF
from kiban._rpcclient import Channel, channel
from kiban._rpcserver import GrpcServer

__all__ = ["GRPC_STATUS_OF", "HTTP_STATUS_OF", "Channel", "GrpcServer", "channel"]
