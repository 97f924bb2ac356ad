"""Kept for jobs written before the `tessera` package: use `from tessera.checkpoint import
Checkpointer`."""

from tessera.checkpoint import MARKER, Checkpointer  # noqa: F401
