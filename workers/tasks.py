"""Celery tasks: thin, idempotent, taking IDs only (never pixel data or PHI)."""

from __future__ import annotations

import functools
import logging

from celery import shared_task
from celery.signals import worker_process_init
from sqlalchemy.orm import Session, sessionmaker

from node.db.engine import make_engine, make_sessionmaker
from workers.celery_app import PROCESS_STUDY, settings_from_environment
from workers.processing import StudyProcessor

log = logging.getLogger(__name__)


@functools.cache
def _processor() -> StudyProcessor:
    """One processor per worker process: database engine and models created after fork."""
    from workers.inference import runner

    settings = settings_from_environment()
    sessions: sessionmaker[Session] = make_sessionmaker(make_engine(settings.database_url))
    return StudyProcessor(settings, sessions, runner(settings.models.weights_dir))


@shared_task(name=PROCESS_STUDY, acks_late=True, reject_on_worker_lost=True, ignore_result=True)  # type: ignore[untyped-decorator]
def process_study(study_id: int, version: int) -> str:
    """Process one version of a study; safe to run more than once."""
    return _processor().run(study_id, version).state


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _warm_up(**_: object) -> None:
    """Load the models when a worker process starts, not when its first study arrives."""
    from pydicom import config as pydicom_config

    from node.logs import silence_value_warnings

    # As in the node: no library warning may carry a patient attribute into the log.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    silence_value_warnings()
    try:
        processor = _processor()
        processor.runner.classifier  # noqa: B018 - loading is the point
        processor.runner.segmenter  # noqa: B018
    except Exception:
        log.exception("model warm-up failed; the first task will try again")
