"""The Celery application: queues by urgency, late acknowledgement, one task at a time.

Workers start with ``triage-node worker`` (or ``celery -A workers.celery_app worker``);
the node's configuration file is found through ``TRIAGE_NODE_CONFIG`` like every
other command. Importing this module never imports TensorFlow.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Queue

from node.config import Settings, load_settings
from node.db.models import Priority
from workers import broker

#: Queues in consumption order: a worker always takes the most urgent work first.
QUEUES: dict[Priority, str] = {
    Priority.STAT: "stat",
    Priority.URGENT: "urgent",
    Priority.ROUTINE: "routine",
}
QUEUE_ORDER = [QUEUES[p] for p in sorted(QUEUES, reverse=True)]
PROCESS_STUDY = "triage.process_study"


def queue_for(priority: int) -> str:
    return QUEUES[Priority(priority)]


def celery_config(settings: Settings) -> dict[str, Any]:
    url = settings.broker_url
    config: dict[str, Any] = {
        "broker_url": url,
        "task_queues": [Queue(name) for name in QUEUE_ORDER],
        "task_default_queue": QUEUES[Priority.ROUTINE],
        # Acknowledge after the work is done, take one message at a time, and give a
        # message back if the process running it dies (Celery Tasks guide).
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # How long the parent waits for a dead pool process's result before it reports
        # the task lost (default 10 s). Results are ignored here, and a lost task's
        # study is queued again at once (workers.tasks.StudyRequest): 1 s, not 10.
        "worker_lost_wait": 1.0,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "broker_connection_retry_on_startup": True,
        "task_track_started": False,
        "worker_send_task_events": False,
        "broker_transport_options": {},
    }
    if url.startswith("sqla+sqlite:///"):
        sqlite_url = url.removeprefix("sqla+")
        broker.prepare_sqlite(sqlite_url)
        config["broker_url"] = sqlite_url
        config["broker_transport"] = broker.TRANSPORT
        config["broker_transport_options"] = {"connect_args": {"timeout": 30}}
    elif url.startswith(("redis://", "rediss://")):
        config["broker_transport_options"] = {
            "queue_order_strategy": "priority",
            # Redelivery of a message a dead worker held; the supervisor usually acts first.
            "visibility_timeout": max(3600, int(settings.pipeline.lease_seconds * 2)),
        }
    return config


def make_celery(settings: Settings) -> Celery:
    app = Celery("triage-node")
    app.config_from_object(celery_config(settings))
    app.conf.triage_settings = settings
    app.autodiscover_tasks(["workers"], related_name="tasks", force=True)
    return app


def settings_from_environment() -> Settings:
    path = os.environ.get("TRIAGE_NODE_CONFIG")
    return load_settings(Path(path) if path else None)


_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """``app`` for the ``celery -A workers.celery_app`` command, built on first use.

    Lazy, so that importing this module (the node does, to send tasks with its
    own settings) neither reads the environment's config nor builds a second app.
    """
    global _app  # noqa: PLW0603 - one lazily built app per process
    if name == "app":
        if _app is None:
            _app = make_celery(settings_from_environment())
        return _app
    raise AttributeError(name)
