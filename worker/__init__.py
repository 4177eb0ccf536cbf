"""The GPU side: Celery workers that keep Phi-3-vision resident and run image tasks."""
