"""DICOM text cannot reorder the text beside it on a page (Unicode bidi controls).

A PatientName ending in U+202E (RIGHT-TO-LEFT OVERRIDE) made the study page show the
patient ID after it backwards: "PID-12345" read "54321-DIP", another patient's ID for
all the reader can tell. Every DICOM string that shares a line with other text is put
in its own <bdi> (HTML's bidi isolation); table cells are isolated already.
"""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from node.runtime import Node
from tests.unit.web.test_web_api import add_study, login

RLO = "\u202e"


def test_a_patient_name_cannot_reverse_the_patient_id_beside_it(
    client: TestClient, node: Node
) -> None:
    uid = add_study(node, patient_name=f"DOE^JOHN{RLO}", patient_id=f"PID-12345{RLO}")
    login(client, "rad")
    page = client.get(f"/studies/{uid}").text
    heading = re.search(r"<h1>(.*?)</h1>", page, re.S)
    assert heading is not None
    assert heading.group(1) == (
        f"<bdi>DOE^JOHN{RLO}</bdi> <small><bdi>PID-12345{RLO}</bdi></small>"
    )
