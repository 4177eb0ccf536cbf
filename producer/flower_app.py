"""The Celery app Flower loads (`celery -A producer.flower_app:app flower`).

It carries the same broker, backend and serializer settings as the workers, so Flower
reads task events and results exactly as they are stored.
"""

from vision_queue.celery_config import make_celery_app
from vision_queue.settings import Settings

app = make_celery_app(Settings.from_env(reader="client"))
