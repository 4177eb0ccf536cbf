"""Delivering results: the result store, streamed text, and webhooks with their outbox."""
