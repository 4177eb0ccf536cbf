"""Broker plumbing: our kombu transport and Celery consumer (leases, priorities, the door)."""
