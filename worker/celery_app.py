"""The Celery application of the worker: defined in the foundation (:mod:`cxr.celery_app`),
named here for ``celery -A worker.celery_app`` and for code that thinks of it as the
worker's."""

from cxr.celery_app import QUEUE, TASK_CLASSIFY, TASK_DELIVER, get_app, make_celery

__all__ = ["QUEUE", "TASK_CLASSIFY", "TASK_DELIVER", "get_app", "make_celery"]
