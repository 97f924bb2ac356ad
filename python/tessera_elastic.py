"""Kept for jobs written before the `tessera` package: use `from tessera.elastic import
ReplicaSet`."""

from tessera.elastic import ReplicaSet  # noqa: F401
