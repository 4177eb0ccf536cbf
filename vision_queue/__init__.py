"""The contract both sides of vision-queue import: what a task is and how it travels.

Task names and prompts, request and result shapes, error codes, settings and their checks,
Redis URLs and connections, outage handling, worker presence, image and address checks, and
the Celery app settings. Producers (`producer/`: the clients, the CLI and the gateway) and
workers (`worker/`) import this package; it imports neither of them. No torch here.
"""
