"""Celery tasks: thin, idempotent, taking IDs only (never pixel data or PHI)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from celery import Task, shared_task
from celery.exceptions import WorkerLostError
from celery.signals import worker_process_init
from celery.worker.request import Request
from sqlalchemy.orm import Session, sessionmaker

from node.db.engine import make_engine, make_sessionmaker
from node.observability.metrics import TASK_SECONDS
from workers.celery_app import PROCESS_STUDY, settings_from_environment
from workers.processing import StudyProcessor, release_lost_run, run_owner
from workers.storage import InstanceRef, StorageChooser, WorkerStorage, storage_from_settings

log = logging.getLogger(__name__)

#: Set by ``triage-node worker`` from worker.tf_threads (TensorFlow reads them too).
INTRA_OP_ENV = "TF_NUM_INTRAOP_THREADS"
INTER_OP_ENV = "TF_NUM_INTEROP_THREADS"


@functools.cache
def _processor() -> StudyProcessor:
    """One processor per worker process: database engine and models created after fork."""
    from workers.inference import runner

    settings = settings_from_environment()
    sessions: sessionmaker[Session] = make_sessionmaker(make_engine(settings.database_url))
    storage: StorageChooser
    try:
        storage = storage_from_settings(settings)
    except Exception as exc:  # a configuration error (worker.storage without cluster.*)
        log.error("worker storage unavailable: %s", exc)
        storage = UnavailableStorage(exc)
    return StudyProcessor(settings, sessions, runner(settings.models.weights_dir), storage)


class UnavailableStorage:
    """Stands in for a storage the settings cannot build: each claimed study fails with why.

    Raising while the processor is built would fail the task before its claim: attempts
    never count, no reason is written, and the supervisor re-sends the study forever.
    Raised after the claim, the error takes the normal retry-then-fail path instead.
    """

    kind = "unavailable"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def for_study(self, refs: Sequence[InstanceRef]) -> WorkerStorage:
        raise self.error.with_traceback(None)


class StudyRequest(Request):  # type: ignore[misc]
    """A ``process_study`` message in the Celery parent: a pool process lost is reported.

    When the pool process running a study dies (killed, out of memory, a crash in
    native code), Celery gives the message back, and its redelivery finds the study
    still leased to the dead run: it would wait for the whole lease (minutes) before
    the supervisor handed it out again, a STAT study too. The parent knows which
    process died and which run it held (the lease owner is that process's pid and
    this message's task id), so it queues the study again at once, and the message
    Celery gives back claims it, in the queue of its priority (or it fails the study
    after ``pipeline.max_attempts``). Only that exact run's study is touched; one
    another run holds meanwhile is not, so nothing is processed twice.
    """

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        # billiard may wrap it in an ExceptionWithTraceback, which keeps it as ``exc``.
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, WorkerLostError) and self.worker_pid is not None:
            try:
                self._release_lost_run()
            except Exception as error:  # the lease still expires; never stop the parent
                log.error("cannot release a lost run's lease error=%s", type(error).__name__)
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def _release_lost_run(self) -> None:
        study_id, version = self.args[:2]
        settings = settings_from_environment()
        # An engine of its own, disposed at once: the parent forks the next pool
        # processes, and they must not inherit its pooled database connections.
        engine = make_engine(settings.database_url)
        try:
            release_lost_run(
                make_sessionmaker(engine),
                study_id,
                version,
                run_owner(self.worker_pid, self.id),
                settings.pipeline.max_attempts,
            )
        finally:
            engine.dispose()


@shared_task(  # type: ignore[untyped-decorator]
    name=PROCESS_STUDY,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    Request=StudyRequest,
)
def process_study(self: Task, study_id: int, version: int) -> str:
    """Process one version of a study; safe to run more than once."""
    start, outcome = time.perf_counter(), "error"
    try:
        outcome = _processor().run(study_id, version, run_id=self.request.id).state
        return outcome
    finally:
        TASK_SECONDS.labels(outcome).observe(time.perf_counter() - start)


def configure_tensorflow_threads() -> tuple[int, int] | None:
    """Apply the thread counts ``triage-node worker`` exported, before TensorFlow runs anything.

    Without a bound every prefork child sizes its pools to all cores, and N children
    oversubscribe the CPU N times. Returns the (intra, inter) counts TensorFlow reports
    back, or None when no count was given.
    """
    intra, inter = os.environ.get(INTRA_OP_ENV), os.environ.get(INTER_OP_ENV)
    if not (intra and intra.isdigit() and inter and inter.isdigit()):
        return None
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(int(intra))
    tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    applied = (
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )
    log.info("TensorFlow threads intra_op=%d inter_op=%d", *applied)
    return applied


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _warm_up(**_: object) -> None:
    """Load the models when a worker process starts, not when its first study arrives."""
    from pydicom import config as pydicom_config

    from node.logs import silence_value_warnings

    # As in the node: no library warning may carry a patient attribute into the log.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    silence_value_warnings()
    try:
        configure_tensorflow_threads()
    except RuntimeError as exc:  # TensorFlow already initialised in this process
        log.warning("TensorFlow threads not set: %s", exc)
    try:
        processor = _processor()
        processor.runner.classifier  # noqa: B018 - loading is the point
        processor.runner.segmenter  # noqa: B018
    except Exception:
        log.exception("model warm-up failed; the first task will try again")
