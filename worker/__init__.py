"""Celery workers: classify queued instances, build SC/SR results, deliver them, audit."""
