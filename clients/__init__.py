"""memupdate's Python client library and command line."""

from clients.client import MemupdateClient

__all__ = ["MemupdateClient"]
