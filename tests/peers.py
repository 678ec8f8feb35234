"""Real DICOM peers for the tests: DCMTK command-line tools and a raw-bytes sender.

DCMTK decodes and re-encodes what it sends and refuses files it cannot read,
as a modality would. The raw sender (pynetdicom, chunked) puts a file's dataset
bytes on the wire unchanged, like a misbehaving device: that is how broken
bytes reach the node, and how byte-identical storage can be checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, _config


def dcmtk_env() -> dict[str, str]:
    """DCMTK leaves Nagle's algorithm on unless told; each image would wait ~40 ms."""
    return {**os.environ, "TCP_NODELAY": "1"}


def require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} not found: run the test command, which installs dcmtk/dicom3tools"
    return path


def echoscu(
    port: int, *, aet: str = "ECHOSCU", aec: str = "TRIAGE"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("echoscu"), "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=60,
        check=False,
    )


def storescu(
    port: int,
    files: list[Path],
    *,
    aet: str = "STORESCU",
    aec: str = "TRIAGE",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require("storescu"),
            "-v",
            "-nh",
            "-aet",
            aet,
            "-aec",
            aec,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=600,
        check=False,
    )


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def storescu_responses(output: str) -> list[tuple[Path, str]]:
    """(file, status text) for every file storescu got a C-STORE response for."""
    results: list[tuple[Path, str]] = []
    current: Path | None = None
    for line in output.splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
        elif (m := _RESPONSE.search(line)) and current is not None:
            results.append((current, m.group(1) or ""))
            current = None
    return results


@dataclass(frozen=True)
class SendReport:
    filename: Path
    sop_instance_uid: str
    original_xfer: str
    network_xfer: str
    status: str  # "0x0000 (Success)", "0xc000 (...)", "<not sent>"

    @property
    def code(self) -> int | None:
        m = re.match(r"0x([0-9a-fA-F]{4})", self.status)
        return int(m.group(1), 16) if m else None


def dcmsend(port: int, files: list[Path], *, aec: str = "TRIAGE") -> list[SendReport]:
    """Send with dcmsend (each file in its own transfer syntax); parse its report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.txt"
        subprocess.run(
            [
                require("dcmsend"),
                "-nh",
                "-aec",
                aec,
                "+crf",
                str(report),
                "127.0.0.1",
                str(port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            timeout=600,
            check=False,
        )
        text = report.read_text()
    entries = []
    for block in text.split("\n\n"):
        fields = dict(re.findall(r"^(\w[\w. ]*?)\s*: ?(.*)$", block, re.M))
        if "Filename" in fields:
            entries.append(
                SendReport(
                    Path(fields["Filename"]),
                    fields.get("SOP Instance", ""),
                    fields.get("Original Xfer", "").split(" ")[0],
                    fields.get("Network Xfer", "").split(" ")[0],
                    fields.get("DIMSE Status", ""),
                )
            )
    return entries


def split_part10(data: bytes) -> tuple[FileMetaDataset | None, bytes]:
    """(file meta or None, dataset bytes after the meta) of a file's bytes."""
    fp = BytesIO(data)
    preamble = read_preamble(fp, force=True)
    if preamble is None and data[:4] != b"DICM":
        fp.seek(0)
    try:
        meta = _read_file_meta_info(fp)
    except Exception:
        return None, data
    if "TransferSyntaxUID" not in meta and len(meta) == 0:
        fp.seek(0 if preamble is None else 132)
        return None, data[fp.tell() :]
    return meta, data[fp.tell() :]


@dataclass(frozen=True)
class RawSend:
    status: int | None  # None: no response (association refused or aborted)
    sent_dataset: bytes
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def raw_store(port: int, path: Path, *, aet: str = "STORESCU", aec: str = "TRIAGE") -> RawSend:
    """C-STORE the dataset bytes of ``path`` exactly as they are in the file.

    A file without usable file meta is sent as Implicit VR Little Endian (the
    DICOM default) with whatever SOP UIDs can be read, or made-up ones.
    """
    from pydicom import dcmread

    data = path.read_bytes()
    meta, body = split_part10(data)
    try:
        ds = dcmread(BytesIO(data), force=True, stop_before_pixels=True)
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    except Exception:
        sop_class = sop_instance = ""
    tsuid = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    tsuid = tsuid or ImplicitVRLittleEndian
    sop_class = sop_class or str(SecondaryCaptureImageStorage)
    sop_instance = sop_instance or generate_uid()
    new_meta = FileMetaDataset()
    new_meta.MediaStorageSOPClassUID = sop_class
    new_meta.MediaStorageSOPInstanceUID = sop_instance
    new_meta.TransferSyntaxUID = tsuid
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw.dcm"
        buf = BytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, new_meta, enforce_standard=True)  # type: ignore[arg-type]
        buf.write(body)
        out.write_bytes(buf.getvalue())
        ae = AE(ae_title=aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(sop_class, [tsuid])
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title=aec)
            status: int | None = None
            if assoc.is_established:
                try:
                    rsp = assoc.send_c_store(out)
                    status = int(rsp.Status) if rsp and "Status" in rsp else None
                finally:
                    if assoc.is_established:
                        assoc.release()
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
            ae.shutdown()
    return RawSend(status, body, sop_class, sop_instance, tsuid)


def orthanc_config(
    *,
    storage: Path,
    dicom_port: int,
    http_port: int,
    aet: str = "ORTHANC",
    sync_storage: bool = True,
    max_pdu: int = 131072,
) -> dict[str, object]:
    """An Orthanc (Debian package, no plugins) configuration on local ports, at its fastest fair settings."""
    return {
        "Name": "triage-node-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "KeepAlive": True,
        "TcpNoDelay": True,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "MaximumPduLength": max_pdu,
        "SyncStorageArea": sync_storage,
        "SaveJobs": False,
        "StableAge": 3600,
    }


class Orthanc:
    """Orthanc as the PACS: started on free ports with its own storage; REST for checks."""

    def __init__(
        self, workdir: Path, *, dicom_port: int, http_port: int, aet: str = "ORTHANC"
    ) -> None:
        import json

        self.workdir = workdir
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.aet = aet
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orthanc.json"
        self.config.write_text(
            json.dumps(
                orthanc_config(
                    storage=workdir / "db", dicom_port=dicom_port, http_port=http_port, aet=aet
                )
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> Orthanc:
        import time

        with (self.workdir / "orthanc.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [require("Orthanc"), str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dcmtk_env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("Orthanc did not answer on its REST port")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def get(self, path: str) -> object:
        import json
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.load(r)

    def instances(self) -> list[dict[str, object]]:
        """Every stored instance: Orthanc id, SOPInstanceUID, SOPClassUID, Modality, StudyInstanceUID."""
        out: list[dict[str, object]] = []
        for oid in self.get("/instances"):  # type: ignore[attr-defined]
            tags = self.get(f"/instances/{oid}/tags?short")
            assert isinstance(tags, dict)
            out.append(
                {
                    "id": oid,
                    "SOPInstanceUID": tags.get("0008,0018"),
                    "SOPClassUID": tags.get("0008,0016"),
                    "Modality": tags.get("0008,0060"),
                    "StudyInstanceUID": tags.get("0020,000d"),
                }
            )
        return out

    def file(self, instance_id: str) -> bytes:
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file", timeout=30
        ) as r:
            return bytes(r.read())
