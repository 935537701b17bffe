"""Test doubles for the HTTP layer."""

from tests.fakes.engine import FakeEngine

__all__ = ["FakeEngine"]
