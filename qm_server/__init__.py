"""queue manager server: durable work queues and string maps over gRPC."""

from ._version import __version__

__all__ = ["__version__"]
