"""Ingest benchmark: one CT series into this node, DCMTK storescp and Orthanc, side by side.

Run from the repository root::

    .venv/bin/python bench/bench_ingest.py [--instances 500] [--repeat 3] [--single-associations 50]

What is measured: the wall-clock time of one DCMTK ``storescu`` sending a
generated CT series (512x512, 16 bit, explicit VR little endian) over one
association to each peer, after an untimed warm-up send. The sender is the
same program with the same options for every peer, with ``TCP_NODELAY=1`` in
its environment (Debian's DCMTK leaves Nagle's algorithm on otherwise, and
every image then waits for a delayed ACK, ~40 ms). Every peer runs at its best:

* the node (``triage-node serve``), durable (``fsync = true``, the default,
  used for the ratios) and not (``fsync = false``, shown for scale);
* ``storescp`` with ``TCP_NODELAY=1``, the largest PDU it takes, bit-preserving
  writes, one process; it never fsyncs, so it is the ceiling, not a like-for-like;
* Orthanc with ``TCP_NODELAY=1`` for its DCMTK network layer, the largest PDU it
  takes, no plugins; ``SyncStorageArea = true`` (its default) is used for the
  ratio, ``false`` is shown for scale. Orthanc's "sync" is weaker than the node's
  durability: strace shows one fdatasync per instance (the file), no rename, no
  directory fsync, and its SQLite index (WAL) commits without a sync, where the
  node fsyncs the file, the directory and the catalogue commit before it answers;
* a bare pynetdicom SCP (``bench/pynetdicom_scp.py``) on the node's event-driven
  association threads (``node/ingest/reactor.py``) that only writes the bytes:
  the ceiling of this node's DICOM layer, shown for scale; ``pynetdicom-stock``
  (not run by default) is the same on pynetdicom's own polling threads.

Each trial starts the peer fresh on free ports with an empty store, and the
page cache is flushed (``sync``) between trials so one peer's writeback does not
land in the next one's time. Trials are interleaved across peers, ``--repeat``
rounds; the table reports each peer's **best** trial (noise from the shared host
only slows runs down), the JSON also has every trial and the median.

A second table has the same peers receiving ``--single-associations`` more images
one association each (one ``storescu`` run per image, so the process start is in
every peer's time alike), the way many CR/DX modalities and PACS forwarders send:
there association set-up and release weigh as much as the data. The targets are
about the first table.

Every peer must have stored every instance (files and catalogue rows for the
node, files for storescp, ``/statistics`` for Orthanc), or the run fails.
Exit status: 0 targets met, 1 a target missed, 2 the benchmark itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The tests' peer definitions are the single source for how Orthanc is configured.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import (
    DCMTK_MAX_PDU,
    LOOPBACK,
    NODELAY_ENV,
    REPO,
    SENDER_SETTINGS,
    TRIAGE_NODE,
    BenchError,
    PeerProcess,
    PeerResult,
    Trial,
    console,
    free_port,
    interrupt_as_exception,
    machine_description,
    node_process,
    port_open,
    print_table,
    run_checked,
    storescu_argv,
    wait_until,
    write_json,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    PYDICOM_ROOT_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from tests.peers import orthanc_config

RESULTS = REPO / "bench" / "results" / "ingest.json"

#: Targets from the issue: node images/s over the peer's images/s.
TARGET_VS_ORTHANC = 1.0
TARGET_VS_STORESCP = 0.35

#: Generated UIDs live under pydicom's root, clearly test data, stable across runs.
UID_ROOT = PYDICOM_ROOT_UID
SEED = 20_240_601
WARMUP_INSTANCES = 10


# -- the series --------------------------------------------------------------------------
@dataclass(frozen=True)
class Series:
    directory: Path
    instances: int
    bytes: int


def generate_ct_series(directory: Path, *, instances: int, seed: int, label: str) -> Series:
    """Write a deterministic axial CT series: same seed and label, same bytes and UIDs.

    The header follows the CT Image IOD (PS3.3 A.3) modules a scanner fills in;
    pixels are a water cylinder in air with noise, stored as unsigned 16 bit with
    RescaleIntercept -1024 (PS3.3 C.8.2.1), uncompressed explicit VR little endian.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, *label.encode()])

    def uid(*parts: object) -> UID:
        return generate_uid(UID_ROOT, entropy_srcs=[f"triage-node bench {label}", *map(str, parts)])

    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame")
    size, spacing, thickness = 512, 0.703125, 1.0
    yy, xx = np.mgrid[0:size, 0:size]
    body = ((xx - size / 2) / 200.0) ** 2 + ((yy - size / 2) / 150.0) ** 2 <= 1.0
    total = 0
    for index in range(instances):
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0.0, 12.0, (size, size))
        stored = np.clip(hu + 1024.0, 0, 65535).astype("<u2")

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = uid("instance", index)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240601"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AcquisitionTime = ds.ContentTime = f"1016{index % 60:02d}"
        ds.AccessionNumber = "BENCH0001"
        ds.Modality = "CT"
        ds.Manufacturer = "triage-node bench"
        ds.InstitutionName = "Benchmark"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST W/O CONTRAST"
        ds.SeriesDescription = f"AXIAL 1.0 {label.upper()}"
        ds.ManufacturerModelName = "generated"
        ds.PatientName = "BENCH^INGEST"
        ds.PatientID = "BENCH-0001"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = f"{thickness:.1f}"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = "360"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "200"
        ds.Exposure = "100"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = index + 1
        z = -index * thickness
        ds.ImagePositionPatient = [f"{-size * spacing / 2:.4f}", f"{-size * spacing / 2:.4f}", z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = z
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [spacing, spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored.tobytes()

        path = directory / f"CT{index + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return Series(directory, instances, total)


# -- the sender -------------------------------------------------------------------------
def send(called_ae: str, port: int, series: Series) -> float:
    started = time.perf_counter()
    run_checked(storescu_argv(called_ae, port, [series.directory]), env=NODELAY_ENV)
    return time.perf_counter() - started


def send_one_per_association(called_ae: str, port: int, series: Series) -> float:
    """One ``storescu`` run, so one association, per image: how many CR/DX modalities and
    PACS forwarders send. Association set-up and release then count as much as the data."""
    files = sorted(series.directory.glob("*.dcm"))
    started = time.perf_counter()
    for path in files:
        run_checked(storescu_argv(called_ae, port, [path]), env=NODELAY_ENV)
    return time.perf_counter() - started


# -- peers ------------------------------------------------------------------------------
@dataclass
class RunningPeer:
    ae_title: str
    port: int
    stored: Callable[[], int]


@dataclass(frozen=True)
class PeerKind:
    name: str
    settings: str
    launch: Callable[[Path], contextlib.AbstractContextManager[RunningPeer]]


def _count_files(directory: Path, suffix: str = "") -> int:
    return sum(1 for p in directory.rglob(f"*{suffix}") if p.is_file())


def node_peer(*, fsync: bool) -> PeerKind:
    @contextlib.contextmanager
    def launch(work: Path) -> Iterator[RunningPeer]:
        port = free_port()
        data = work / "data"
        config: dict[str, dict[str, Any]] = {
            "dicom": {"ae_title": "TRIAGE", "host": LOOPBACK, "port": port},
            "storage": {"data_dir": str(data), "min_free_bytes": 0, "fsync": fsync},
            "web": {"enabled": False},
            # Ingest only: no worker process loading TensorFlow on the same cores meanwhile.
            "pipeline": {"workers": 0},
        }

        def stored() -> int:
            files = _count_files(data / "instances", ".dcm")
            with contextlib.closing(
                sqlite3.connect(f"file:{data / 'triage-node.db'}?mode=ro", uri=True)
            ) as db:
                rows = int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
            if files != rows:
                raise BenchError(f"node: {files} files on disk but {rows} catalogue rows")
            return rows

        with node_process(work, config):
            yield RunningPeer("TRIAGE", port, stored)

    durability = "fsync=true (durable, default)" if fsync else "fsync=false"
    return PeerKind(
        "node" if fsync else "node (no fsync)",
        f"{durability}, max PDU 4 MiB, SQLite WAL",
        launch,
    )


def storescp_peer() -> PeerKind:
    @contextlib.contextmanager
    def launch(work: Path) -> Iterator[RunningPeer]:
        port = free_port()
        out = work / "storescp"
        out.mkdir()
        argv = [
            "storescp",
            "-aet", "STORESCP",
            "--single-process",
            "-pdu", str(DCMTK_MAX_PDU),
            "+B",  # write the received bytes as they are, like the node
            "-dhl",
            "-od", str(out),
            str(port),
        ]  # fmt: skip
        with PeerProcess(
            name="storescp",
            argv=argv,
            log_path=work / "storescp.log",
            env=NODELAY_ENV,
            ready=lambda: port_open(port),
        ):
            yield RunningPeer("STORESCP", port, lambda: _count_files(out))

    return PeerKind(
        "storescp",
        f"TCP_NODELAY=1, -pdu {DCMTK_MAX_PDU}, +B, single process, no fsync",
        launch,
    )


def orthanc_peer(*, sync_storage: bool) -> PeerKind:
    @contextlib.contextmanager
    def launch(work: Path) -> Iterator[RunningPeer]:
        dicom_port, http_port = free_port(), free_port()
        storage = work / "orthanc"
        config = work / "orthanc.json"
        config.write_text(
            json.dumps(
                orthanc_config(
                    storage=storage,
                    dicom_port=dicom_port,
                    http_port=http_port,
                    sync_storage=sync_storage,
                    max_pdu=DCMTK_MAX_PDU,
                ),
                indent=2,
            )
        )
        base = f"http://{LOOPBACK}:{http_port}"

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/system", timeout=1) as r:
                    return bool(r.status == 200) and port_open(dicom_port)
            except OSError:
                return False

        def stored() -> int:
            with urllib.request.urlopen(f"{base}/statistics", timeout=10) as r:
                return int(json.load(r)["CountInstances"])

        with PeerProcess(
            name="Orthanc",
            argv=["/usr/sbin/Orthanc", str(config)],
            log_path=work / "orthanc.log",
            # Orthanc's DICOM side is DCMTK: the same Nagle switch as storescu/storescp.
            env=NODELAY_ENV,
            cwd=work,
            ready=answers,
        ):
            yield RunningPeer("ORTHANC", dicom_port, stored)

    return PeerKind(
        "Orthanc" if sync_storage else "Orthanc (no sync)",
        f"TCP_NODELAY=1, MaximumPduLength {DCMTK_MAX_PDU}, "
        f"SyncStorageArea={'true (default)' if sync_storage else 'false'}, no plugins",
        launch,
    )


def pynetdicom_floor_peer(*, stock: bool = False) -> PeerKind:
    @contextlib.contextmanager
    def launch(work: Path) -> Iterator[RunningPeer]:
        port = free_port()
        out = work / "floor"
        argv = [sys.executable, str(REPO / "bench" / "pynetdicom_scp.py"), str(port), str(out)]
        with PeerProcess(
            name="pynetdicom floor",
            argv=argv + (["--stock"] if stock else []),
            log_path=work / "floor.log",
            ready=lambda: port_open(port),
        ):
            yield RunningPeer("FLOOR", port, lambda: _count_files(out, ".dcm"))

    if stock:
        return PeerKind(
            "pynetdicom (stock)",
            "the floor on pynetdicom's own polling association threads (1 ms sleeps)",
            launch,
        )
    return PeerKind(
        "pynetdicom (floor)",
        "bare pynetdicom SCP on the node's event-driven threads: write bytes, no parse/DB/fsync",
        launch,
    )


PEERS: dict[str, Callable[[], PeerKind]] = {
    "node": lambda: node_peer(fsync=True),
    "node-nofsync": lambda: node_peer(fsync=False),
    "pynetdicom": pynetdicom_floor_peer,
    "pynetdicom-stock": lambda: pynetdicom_floor_peer(stock=True),
    "storescp": storescp_peer,
    "orthanc": lambda: orthanc_peer(sync_storage=True),
    "orthanc-nosync": lambda: orthanc_peer(sync_storage=False),
}


# -- trials -----------------------------------------------------------------------------
def run_trial(
    kind: PeerKind, work: Path, warmup: Series, series: Series, singles: Series | None
) -> tuple[Trial, Trial | None]:
    """Fresh peer, untimed warm-up send, timed send, then the one-image associations (if
    any), then check that everything was stored."""
    work.mkdir(parents=True)
    try:
        with kind.launch(work) as peer:
            send(peer.ae_title, peer.port, warmup)
            seconds = send(peer.ae_title, peer.port, series)
            expected = warmup.instances + series.instances
            single: Trial | None = None
            if singles is not None:
                single_seconds = send_one_per_association(peer.ae_title, peer.port, singles)
                single = Trial(single_seconds, singles.instances, singles.bytes)
                expected += singles.instances
            wait_until(lambda: peer.stored() >= expected, timeout=10, what=f"{kind.name} count")
            got = peer.stored()
            if got != expected:
                raise BenchError(f"{kind.name} stored {got} instances, expected {expected}")
        return Trial(seconds, series.instances, series.bytes), single
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()  # this trial's writeback must not land in the next one's time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3, help="rounds over all peers (best wins)")
    parser.add_argument(
        "--peers",
        default="node,node-nofsync,pynetdicom,storescp,orthanc,orthanc-nosync",
        help=f"comma-separated subset of {', '.join(PEERS)}",
    )
    parser.add_argument(
        "--single-associations",
        type=int,
        default=50,
        help="images then sent one per association (storescu run per image); 0: skip",
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers: {', '.join(unknown)}")
    for tool in ("storescu", "storescp", "/usr/sbin/Orthanc", str(TRIAGE_NODE)):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found (apt-get install dcmtk orthanc; pip install -e .)")

    kinds = [PEERS[n]() for n in names]
    results = {k.name: PeerResult(k.name, k.settings) for k in kinds}
    single_results = {k.name: PeerResult(k.name, k.settings) for k in kinds}
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        with interrupt_as_exception():
            with console.status("Generating the series..."):
                series = generate_ct_series(
                    root / "series", instances=args.instances, seed=SEED, label="ingest"
                )
                warmup = generate_ct_series(
                    root / "warmup", instances=WARMUP_INSTANCES, seed=SEED, label="warmup"
                )
                singles = (
                    generate_ct_series(
                        root / "singles",
                        instances=args.single_associations,
                        seed=SEED,
                        label="singles",
                    )
                    if args.single_associations
                    else None
                )
            console.print(
                f"{series.instances} CT instances, 512x512 uint16, "
                f"{series.bytes / 1e6:.1f} MB; sender: {SENDER_SETTINGS}"
            )
            for round_ in range(1, args.repeat + 1):
                for kind in kinds:
                    with console.status(f"round {round_}/{args.repeat}: {kind.name}..."):
                        trial, single = run_trial(
                            kind, root / f"{kind.name}-{round_}", warmup, series, singles
                        )
                    results[kind.name].trials.append(trial)
                    line = (
                        f"  round {round_} {kind.name:<18} {trial.seconds:6.2f} s  "
                        f"{trial.items_per_s:7.1f} images/s"
                    )
                    if single is not None:
                        single_results[kind.name].trials.append(single)
                        line += f"; one per association {single.items_per_s:6.1f} images/s"
                    console.print(line)
    except BenchError as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; every peer was stopped[/yellow]")
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)

    singles_done = [r for r in single_results.values() if r.trials]
    return report(args, list(results.values()), series, singles_done)


def report(
    args: argparse.Namespace,
    results: list[PeerResult],
    series: Series,
    singles: list[PeerResult],
) -> int:
    by_name = {r.peer: r for r in results}
    reference = by_name.get("node") or results[0]
    print_table(
        f"Ingest of {series.instances} CT images (512x512, 16 bit), best of {args.repeat}",
        results,
        reference=reference,
    )
    checks: list[tuple[str, float, float]] = []
    node = by_name.get("node")
    if node is not None:
        for peer, target in (("Orthanc", TARGET_VS_ORTHANC), ("storescp", TARGET_VS_STORESCP)):
            if peer in by_name:
                ratio = node.best().items_per_s / by_name[peer].best().items_per_s
                checks.append((f"node/{peer}", ratio, target))
    for label, ratio, target in checks:
        verdict = "[green]PASS[/green]" if ratio >= target else "[red]FAIL[/red]"
        console.print(f"{label:<14} {ratio:5.2f}x  (target >= {target:.2f}x)  {verdict}")
    nofsync = by_name.get("node (no fsync)")
    if node is not None and nofsync is not None:
        console.print(
            f"node durable (fsync=true) is used for the ratios; without fsync it runs at "
            f"{nofsync.best().items_per_s:.1f} images/s "
            f"({nofsync.best().items_per_s / node.best().items_per_s:.2f}x the durable rate)."
        )
    if singles:
        by_single = {r.peer: r for r in singles}
        print_table(
            f"The same peers, {args.single_associations} images sent one per association "
            f"(a storescu run each, process start included for every peer), best of "
            f"{args.repeat}",
            singles,
            reference=by_single.get("node") or singles[0],
        )
    write_json(
        args.json,
        {
            "benchmark": "ingest",
            "series": {
                "instances": series.instances,
                "bytes": series.bytes,
                "rows": 512,
                "columns": 512,
                "bits_allocated": 16,
                "transfer_syntax": str(ExplicitVRLittleEndian),
                "seed": SEED,
            },
            "sender": SENDER_SETTINGS,
            "repeat": args.repeat,
            "statistic": "best trial per peer (fastest); median_seconds also given",
            "results": [r.as_dict() for r in results],
            "one_image_per_association": {
                "instances": args.single_associations,
                "sender": "one storescu run per image, same options",
                "results": [r.as_dict() for r in singles],
            },
            "ratios": [
                {"ratio": label, "value": ratio, "target": target, "pass": ratio >= target}
                for label, ratio, target in checks
            ],
            "machine": machine_description(),
        },
    )
    console.print(f"results written to {args.json}")
    return 0 if all(ratio >= target for _, ratio, target in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
