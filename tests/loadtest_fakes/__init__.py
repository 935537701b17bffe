"""A fake OpenAI-compatible server with planted capacity limits, for the loadtest tests."""

from tests.loadtest_fakes.server import FakeBehaviour, create_fake_app, serve_in_thread

__all__ = ["FakeBehaviour", "create_fake_app", "serve_in_thread"]
