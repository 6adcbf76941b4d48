"""How roles reach each other: message codec, ZeroMQ sockets, endpoint discovery
through torchrun's rendezvous store, and the bucketed weight broadcast.

Roles import this package (and ``config``, ``types``); they never import each other.
"""
