"""The members gRPC API (``members.v1.Members``): the HTTP API's domain code, over gRPC.

``members.proto`` is the contract; ``members_pb2*.py`` are generated from it
(``python -m services.clients`` regenerates them; a test fails when they drift).
"""
