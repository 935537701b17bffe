"""Serving classes: one per endpoint, turning engine outputs into OpenAI responses and SSE chunks."""
