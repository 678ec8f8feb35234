"""Processing one study version: claim it, analyse its images, record findings once.

Exactly-once results without trusting the broker: a task first *claims* the
study in the database (``queued`` → ``processing`` with a lease owned by this
run); it writes findings and the final state only if it still holds that lease,
in one transaction that replaces any findings of the same version. A duplicate
message, a redelivery after a crash, or a study re-opened meanwhile (new
version) therefore never yields two results. While the run works, a heartbeat
renews the lease (every third of ``pipeline.lease_seconds``), so a slow phase does
not let the supervisor hand the study out again; a run that lost its lease anyway
stops before writing any file or row.

Failures: an image whose pixels cannot be read is left out with a note on the study,
and the study's other images are analysed; when no image the models apply to can be
read, the study fails at once (retrying cannot help). Anything else is retried with
exponential backoff up to ``pipeline.max_attempts`` by putting the study back to
``queued`` with a not-before time that the node's supervisor honours. Result objects
(SEG, SR, heatmaps) that cannot be built leave the study done with its findings and a
note; a storage fault while building or storing them is retried like any other.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from node import __version__
from node.config import Settings
from node.db.models import Export, Finding, Instance, Priority, Series, Study, StudyStatus
from node.db.types import utcnow
from node.export import deliveries
from node.model_switches import disabled_models
from node.pipeline import escalated, worker_lost
from workers.inference import ModelRunner
from workers.output import AlgorithmInfo, ImageResult
from workers.pixels import ImageFrame, UnreadablePixels, read_instance, robust_unit
from workers.result_objects import (
    ResultObject,
    build_objects,
    encode_objects,
    output_context,
    store_objects,
)
from workers.selection import selector_for
from workers.storage import (
    InstanceRef,
    StorageChooser,
    StorageUnavailable,
    WorkerStorage,
    storage_from_settings,
)

log = logging.getLogger(__name__)

CLASSIFIER = "pneumonia-triage"
SEGMENTER = "lung-seg"


class LeaseLost(Exception):
    """The study is no longer this run's (the lease expired and was handed out again)."""


class LeaseHeartbeat:
    """Renews a study's lease every ``interval`` seconds while a run holds it.

    Renewing only between phases left a slow one (a DICOMweb fetch or upload, a long
    model run) to outlive the lease, and the supervisor handed the study to a second
    worker while the first still ran. ``renew`` returns False once the lease is gone:
    the heartbeat then stops and sets :attr:`lost`, and the run gives up at its next
    check. A failed renewal (database briefly unreachable) is tried again next beat.
    """

    def __init__(self, renew: Callable[[], bool], interval: float) -> None:
        self.renew = renew
        self.interval = interval
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def __enter__(self) -> LeaseHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                held = self.renew()
            except Exception as exc:
                log.warning("lease renewal failed error=%s; trying again", type(exc).__name__)
                continue
            if not held:
                self.lost.set()
                return


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # done | failed | retry | skipped
    reason: str | None = None


@dataclass
class _Analysis:
    findings: list[Finding] = field(default_factory=list)
    key_finding: str | None = None
    key_score: float | None = None
    note: str | None = None
    objects: list[ResultObject] = field(default_factory=list)

    def add_note(self, text: str) -> None:
        """Append to what the study's status_reason will say (earlier notes stay)."""
        self.note = f"{self.note}; {text}" if self.note else text


@dataclass
class _FrameResult:
    frame: ImageFrame
    source: InstanceRef
    probability: float | None = None
    present: bool = False
    heatmap: NDArray[np.float32] | None = None
    mask: NDArray[np.bool_] | None = None
    area_mm2: float | None = None


class StudyProcessor:
    """Runs the models a study was routed to and records what they found."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        runner: ModelRunner,
        storage: StorageChooser | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.runner = runner
        #: Where instances are read and results written: worker.storage (shared disk or DICOMweb).
        self.storage_chooser = storage or storage_from_settings(settings)
        self.storage: WorkerStorage | None = None  # the current study's
        #: The current study's instances that could not be read (`_select_frames`).
        self.unreadable: list[UnreadablePixels] = []
        self.lease = timedelta(seconds=settings.pipeline.lease_seconds)
        #: The current run's (`run`); None between runs.
        self.heartbeat: LeaseHeartbeat | None = None
        #: The current run's (study id, lease owner), for checks before writing.
        self._held: tuple[int, str] | None = None

    # -- the whole run -----------------------------------------------------------------
    def run(self, study_id: int, version: int, run_id: str | None = None) -> Outcome:
        """Claim, analyse and record one study version; ``run_id``: the task's id, if any."""
        owner = run_owner(os.getpid(), run_id or uuid.uuid4().hex[:12])
        if not self._claim(study_id, version, owner):
            log.info(
                "study_id=%d version=%d not claimable (done, taken or superseded)",
                study_id,
                version,
            )
            return Outcome("skipped")
        interval = self.lease.total_seconds() / 3
        try:
            with LeaseHeartbeat(lambda: self._renew(study_id, owner), interval) as heartbeat:
                self.heartbeat, self._held = heartbeat, (study_id, owner)
                try:
                    analysis = self._analyse(study_id, version, owner)
                finally:
                    self.heartbeat, self._held = None, None
        except LeaseLost:
            log.warning("study_id=%d version=%d lease lost; stopped", study_id, version)
            return Outcome("skipped", "lease lost")
        except UnreadablePixels as exc:
            return self._fail(study_id, version, owner, str(exc), permanent=True)
        except Exception as exc:
            log.exception("study_id=%d version=%d processing error", study_id, version)
            return self._fail(
                study_id, version, owner, f"{type(exc).__name__}: {exc}", permanent=False
            )
        return self._finish(study_id, version, owner, analysis)

    # -- lease ---------------------------------------------------------------------------
    def _claim(self, study_id: int, version: int, owner: str) -> bool:
        now = utcnow()
        with self.sessions.begin() as session:
            claimed = session.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.version == version,
                    Study.status == StudyStatus.QUEUED,
                    # A retry's backoff holds even if an old message arrives early.
                    or_(Study.lease_until.is_(None), Study.lease_until <= now),
                )
                .values(
                    status=StudyStatus.PROCESSING,
                    lease_owner=owner,
                    lease_until=now + self.lease,
                    attempts=Study.attempts + 1,
                    started_at=now,
                    status_reason=None,
                )
                .returning(Study.id)
            ).first()
        return claimed is not None

    def _renew(self, study_id: int, owner: str) -> bool:
        """Extend the lease by its full length; False if this run no longer holds it."""
        with self.sessions.begin() as session:
            held = session.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.lease_owner == owner,
                    Study.status == StudyStatus.PROCESSING,
                )
                .values(lease_until=utcnow() + self.lease)
                .returning(Study.id)
            ).first()
        return held is not None

    def _hold(self) -> None:
        """:meth:`_extend` for the current run, if any (a model run is over: files next)."""
        if self._held is not None:
            self._extend(*self._held)

    def _extend(self, study_id: int, owner: str) -> None:
        """Renew the lease before the next phase writes anything; raise if it is lost."""
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise LeaseLost
        if not self._renew(study_id, owner):
            raise LeaseLost

    # -- analysis ------------------------------------------------------------------------
    def _analyse(self, study_id: int, version: int, owner: str) -> _Analysis:
        with self.sessions() as session:
            study = session.get(Study, study_id)
            assert study is not None
            models = list(study.routing_models or [])
            switched_off = disabled_models(session)
            disabled = [m for m in models if m in switched_off]
            models = [m for m in models if m not in disabled]
            wanted_series = set(study.routing_series or [])
            study_uid = study.study_instance_uid
            rows = session.execute(
                select(Instance.sop_instance_uid, Instance.path, Series.series_instance_uid)
                .join(Series, Instance.series_id == Series.id)
                # A late instance can re-open a study whose files retention purged: their
                # rows stay (with purged_at), their files do not; analyse what is stored.
                .where(Instance.study_id == study_id, Instance.purged_at.is_(None))
                .order_by(Series.id, Instance.instance_number, Instance.id)
            ).all()
        sources = [
            InstanceRef(study_uid, r.series_instance_uid, r.sop_instance_uid, r.path)
            for r in rows
            if not wanted_series or r.series_instance_uid in wanted_series
        ]
        self.storage = self.storage_chooser.for_study(sources)
        analysis = _Analysis()
        if disabled:  # an admin switched them off (node.model_switches): say so on the study
            analysis.add_note("not run, disabled by an admin: " + ", ".join(disabled))
            log.info("study_uid=%s version=%d: %s", study_uid, version, analysis.note)
            if not models:
                return analysis
        self.unreadable = []
        per_frame, skipped = self._select_frames(sources, models)
        if skipped:
            analysis.add_note(f"{len(skipped)} image(s) not analysed: " + "; ".join(skipped[:3]))
        self._leave_out_unreadable(analysis, bool(per_frame), study_uid, version)
        if not per_frame:
            analysis.add_note("no image the requested models apply to")
            log.info("study_uid=%s version=%d: %s", study_uid, version, analysis.note)
            return analysis
        self._extend(study_id, owner)
        results_dir = f"results/{study_uid}/v{version}"
        key = (study_id, version, results_dir)
        # Each model run is followed by a check of the lease (`_hold`) before its files.
        if CLASSIFIER in models:
            self._classify(key, per_frame, analysis)
        if SEGMENTER in models:
            self._segment(key, per_frame, analysis)
        try:
            objects = self._result_objects(
                models, per_frame, self._previous_reports(study_id, version)
            )
            encoded = encode_objects(results_dir, objects)
        except (StorageUnavailable, OSError):
            # Re-reading the sources failed: the node (or its disk) is unreachable now, not
            # the objects unbuildable. Like any storage fault: retry later (run()).
            raise
        except Exception as exc:
            # Findings stand on their own; say on the study why PACS gets no objects.
            log.exception("study_uid=%s version=%d: result objects failed", study_uid, version)
            analysis.add_note(
                f"result objects could not be built: {type(exc).__name__}: {exc}"[:2000]
            )
        else:
            # Not caught: a node that cannot take the files now means "retry later".
            self._extend(study_id, owner)  # never over the objects of a run that took over
            analysis.objects = store_objects(self._storage(), encoded)
        return analysis

    def _leave_out_unreadable(
        self, analysis: _Analysis, others_readable: bool, study_uid: str, version: int
    ) -> None:
        """Note the images that could not be read; with nothing else to analyse, fail."""
        if not self.unreadable:
            return
        if not others_readable:
            raise self.unreadable[0]  # the study fails with the first reason, as it always did
        reasons = "; ".join(f"{exc.sop_instance_uid}: {exc.reason}" for exc in self.unreadable[:3])
        note = f"{len(self.unreadable)} unreadable image(s) not analysed: {reasons}"
        analysis.add_note(note)
        log.warning("study_uid=%s version=%d: %s", study_uid, version, note)

    def _storage(self) -> WorkerStorage:
        assert self.storage is not None, "storage is chosen when a study's analysis starts"
        return self.storage

    def _select_frames(
        self, sources: list[InstanceRef], models: list[str]
    ) -> tuple[list[_FrameResult], list[str]]:
        """Frames of the instances at least one requested model applies to, and why others not.

        Instances that cannot be read (their header, or a selected one's pixels) are left
        out and added to ``self.unreadable``, each with its SOP Instance UID.
        """
        per_frame: list[_FrameResult] = []
        skipped: list[str] = []
        unreadable = self.unreadable
        storage = self._storage()
        for ref in sources:
            with storage.instance(ref) as path:
                try:
                    header = dcmread(path, stop_before_pixels=True, force=True)
                except Exception as exc:
                    reason = f"stored instance cannot be read: {type(exc).__name__}"
                    unreadable.append(UnreadablePixels(reason, ref.sop_uid))
                    continue
                reasons = [selector_for(m).why_not(header) for m in models]
                if all(reason is not None for reason in reasons):
                    skipped.append(f"{header.SOPInstanceUID}: {reasons[0]}")
                    continue
                try:
                    decoded = read_instance(path)
                except UnreadablePixels as exc:
                    exc.sop_instance_uid = exc.sop_instance_uid or ref.sop_uid
                    unreadable.append(exc)
                    continue
                # A blank frame of a multi-frame instance: the others are analysed, and
                # the study says which frame was not, and why.
                skipped.extend(
                    f"{ref.sop_uid} frame {s.frame_number}: {s.reason}" for s in decoded.skipped
                )
                per_frame.extend(_FrameResult(frame, ref) for frame in decoded.frames)
        return per_frame, skipped

    def _classify(
        self, key: tuple[int, int, str], per_frame: list[_FrameResult], analysis: _Analysis
    ) -> None:
        study_id, version, results_dir = key
        model = self.runner.classifier
        cls = self.runner.classify([fr.frame.pixels for fr in per_frame])
        self._hold()
        threshold = float(model.threshold)
        now = utcnow()
        for fr, probs, heatmap in zip(per_frame, cls.probabilities, cls.heatmaps, strict=True):
            p = float(probs[1])
            fr.probability, fr.present, fr.heatmap = p, p >= threshold, heatmap
            analysis.findings.append(
                _image_finding(
                    key,
                    fr,
                    model,
                    "classification",
                    label="pneumonia" if fr.present else "normal",
                    probability=p,
                    heatmap_path=self._save(results_dir, fr.frame, "heatmap", heatmap),
                    inference_ms=cls.milliseconds / len(per_frame),
                    created_at=now,
                )
            )
        top = max(float(p[1]) for p in cls.probabilities)
        analysis.key_score = top
        analysis.key_finding = "pneumonia" if top >= threshold else "normal"
        analysis.findings.append(
            Finding(
                study_id=study_id,
                study_version=version,
                model_name=model.name,
                model_version=model.version,
                kind="classification",
                label=analysis.key_finding,
                probability=top,
                inference_ms=cls.milliseconds,
                created_at=now,
            )
        )

    def _segment(
        self, key: tuple[int, int, str], per_frame: list[_FrameResult], analysis: _Analysis
    ) -> None:
        results_dir = key[2]
        model = self.runner.segmenter
        seg = self.runner.segment([fr.frame.pixels for fr in per_frame])
        self._hold()
        now = utcnow()
        for fr, mask in zip(per_frame, seg.masks, strict=True):
            area_px = int(mask.sum())
            spacing = fr.frame.pixel_spacing_mm
            fr.mask = mask
            fr.area_mm2 = area_px * spacing[0] * spacing[1] if spacing else None
            analysis.findings.append(
                _image_finding(
                    key,
                    fr,
                    model,
                    "segmentation",
                    label="lung",
                    lung_area_px=area_px,
                    lung_area_mm2=fr.area_mm2,
                    mask_path=self._save(results_dir, fr.frame, "mask", mask),
                    inference_ms=seg.milliseconds / len(per_frame),
                    created_at=now,
                )
            )

    def _previous_reports(self, study_id: int, version: int) -> list[Dataset]:
        """The SRs earlier versions of the study sent (or are sending) to destinations.

        The new report lists those with another UID as predecessors, so a PACS that
        holds both shows which one is current. A file retention has removed (or one
        that cannot be read) is left out: the new report then stands alone.
        """
        with self.sessions() as session:
            paths = session.scalars(
                select(Export.path)
                .where(
                    Export.study_id == study_id,
                    Export.kind == "sr",
                    Export.study_version < version,
                )
                .distinct()
            ).all()
        reports: list[Dataset] = []
        storage = self._storage()
        for path in sorted(paths):
            try:
                reports.append(dcmread(io.BytesIO(storage.read_result(path))))
            except StorageUnavailable:
                raise  # the node is unreachable: retry the study later, as for its images
            except Exception as exc:  # gone (retention), or not DICOM: the report stands alone
                log.warning(
                    "study_id=%d version=%d: previous report %s not read (%s)",
                    study_id,
                    version,
                    path,
                    type(exc).__name__,
                )
        return reports

    def _result_objects(
        self,
        models: list[str],
        per_frame: list[_FrameResult],
        previous_reports: list[Dataset] | None = None,
    ) -> list[tuple[str, Dataset]]:
        """The study's SEG, SR and heatmap objects; reads each source again through storage."""
        sources: dict[str, Dataset] = {}
        results = []
        storage = self._storage()
        for fr in per_frame:
            uid = fr.source.sop_uid
            if uid not in sources:
                with storage.instance(fr.source) as path:
                    sources[uid] = dcmread(path)
            results.append(
                ImageResult(
                    source=sources[uid],
                    frame_number=fr.frame.frame_number,
                    pneumonia_probability=fr.probability or 0.0,
                    pneumonia_present=fr.present,
                    heatmap=fr.heatmap,
                    lung_mask=fr.mask,
                    lung_area_mm2=fr.area_mm2,
                    # For eyes, not the model: stretch contrast like a viewer's auto-window.
                    display=robust_unit(fr.frame.pixels),
                )
            )
        classifier = (
            AlgorithmInfo(self.runner.classifier.name, self.runner.classifier.version)
            if CLASSIFIER in models
            else None
        )
        segmenter = (
            AlgorithmInfo(self.runner.segmenter.name, self.runner.segmenter.version)
            if SEGMENTER in models
            else None
        )
        ctx = output_context(self.settings.results, __version__)
        return build_objects(
            results,
            classifier=classifier,
            segmenter=segmenter,
            ctx=ctx,
            previous_reports=previous_reports or (),
        )

    def _save(self, folder: str, frame: ImageFrame, kind: str, array: NDArray[np.generic]) -> str:
        """Store a heatmap or mask as .npy, atomically, under ``results/``; return its path."""
        rel = f"{folder}/{frame.sop_instance_uid}_{frame.frame_number}.{kind}.npy"
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        self._storage().write_result(rel, buffer.getvalue())
        return rel

    # -- outcomes ------------------------------------------------------------------------
    def _finish(self, study_id: int, version: int, owner: str, analysis: _Analysis) -> Outcome:
        with self.sessions.begin() as session:
            study = session.execute(
                select(Study).where(Study.id == study_id).with_for_update()
            ).scalar_one()
            if study.lease_owner != owner or study.version != version:
                log.warning(
                    "study_id=%d version=%d lease lost; result discarded", study_id, version
                )
                return Outcome("skipped", "lease lost")
            session.execute(
                delete(Finding).where(
                    Finding.study_id == study_id, Finding.study_version == version
                )
            )
            session.add_all(analysis.findings)
            for name in study.routing_destinations or []:
                destination = self.settings.destination(name)
                if destination is None:
                    continue
                for obj in analysis.objects:
                    if obj.kind in destination.kinds:
                        deliveries.enqueue(
                            session,
                            study_id=study_id,
                            study_version=version,
                            destination=name,
                            kind=obj.kind,
                            sop_instance_uid=obj.sop_instance_uid,
                            sop_class_uid=obj.sop_class_uid,
                            path=obj.path,
                        )
            score = analysis.key_score
            priority = escalated(study.base_priority, score, self.settings.pipeline)
            now = utcnow()
            study.status = StudyStatus.DONE
            study.status_reason = analysis.note
            study.priority = priority
            study.key_finding = analysis.key_finding
            study.key_score = score
            study.finished_at = now
            study.lease_owner = None
            study.lease_until = None
            uid = study.study_instance_uid
        log.info(
            "study done study_uid=%s version=%d findings=%d priority=%s",
            uid,
            version,
            len(analysis.findings),
            Priority(priority).name.lower(),
        )
        return Outcome("done")

    def _fail(
        self, study_id: int, version: int, owner: str, reason: str, *, permanent: bool
    ) -> Outcome:
        max_attempts = self.settings.pipeline.max_attempts
        with self.sessions.begin() as session:
            study = session.execute(
                select(Study).where(Study.id == study_id).with_for_update()
            ).scalar_one()
            if study.lease_owner != owner or study.version != version:
                return Outcome("skipped", "lease lost")
            study.lease_owner = None
            if permanent or study.attempts >= max_attempts:
                study.status = StudyStatus.FAILED
                study.status_reason = reason[:2000]
                study.finished_at = utcnow()
                study.lease_until = None
                state = "failed"
            else:
                delay = self.settings.pipeline.retry_backoff_seconds * 2 ** (study.attempts - 1)
                study.status = StudyStatus.QUEUED
                study.status_reason = f"retrying after attempt {study.attempts}: {reason}"[:2000]
                study.queued_at = None  # the supervisor re-sends it once not-before has passed
                study.lease_until = utcnow() + timedelta(seconds=delay)
                state = "retry"
            uid = study.study_instance_uid
        log.warning("study %s study_uid=%s version=%d reason=%s", state, uid, version, reason)
        return Outcome(state, reason)


def run_owner(pid: int, run_id: str) -> str:
    """A run's lease owner: its process and its task, so the Celery parent can name it."""
    return f"{pid}-{run_id}"[:64]


def release_lost_run(
    sessions: sessionmaker[Session], study_id: int, version: int, owner: str, max_attempts: int
) -> bool:
    """A run's process died and Celery gave its message back: queue the study again now.

    Only while that run still holds the study (its exact owner, under a row lock): a
    study handed out again meanwhile is left to its new run. The study is queued with
    the message counted as sent (the given-back message claims it, at its priority,
    no second one is sent), or failed after ``pipeline.max_attempts``, as the
    supervisor does when a lease expires (:func:`node.pipeline.worker_lost`).
    """
    with sessions.begin() as session:
        study = session.execute(
            select(Study)
            .where(
                Study.id == study_id,
                Study.version == version,
                Study.status == StudyStatus.PROCESSING,
                Study.lease_owner == owner,
            )
            .with_for_update()
        ).scalar_one_or_none()
        if study is None:
            return False
        worker_lost(study, max_attempts, utcnow(), message_given_back=True)
        study_uid, status = study.study_instance_uid, study.status
    log.warning("worker process lost study_uid=%s version=%d -> %s", study_uid, version, status)
    return True


def _image_finding(
    key: tuple[int, int, str], fr: _FrameResult, model: Any, kind: str, **values: Any
) -> Finding:
    """A per-image finding of ``model`` for the frame ``fr`` of study version ``key``."""
    study_id, version, _ = key
    return Finding(
        study_id=study_id,
        study_version=version,
        sop_instance_uid=fr.frame.sop_instance_uid,
        frame_number=fr.frame.frame_number,
        model_name=model.name,
        model_version=model.version,
        kind=kind,
        **values,
    )
