"""Strings from a DICOM file (anyone who can send one chooses them) are text on every page.

Markup, a template expression and a ``</script>`` in a patient name, ID, accession,
description or status reason must reach the browser escaped, on the worklist, its
live update, the study page and the audit page; the JSON API stays JSON.
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from node.runtime import Node
from tests.unit.web.test_web_api import add_study, login

PAYLOAD = '"><img src=x onerror=alert(1)></script><script>alert(2)</script>{{ 7*7 }}'


def test_dicom_strings_are_escaped_everywhere(client: TestClient, node: Node) -> None:
    uid = add_study(
        node,
        patient_name="EVIL^" + PAYLOAD[:58],
        patient_id=PAYLOAD[:64],
        accession_number=PAYLOAD[:16],
        study_description=PAYLOAD[:64],
        status_reason=PAYLOAD,
        routing_rule=PAYLOAD[:64],
        key_finding=PAYLOAD[:32],
        key_score=0.9,
    )
    login(client, "admin")
    client.get("/api/worklist", params={"modality": PAYLOAD})  # into the audit trail
    for path in ("/", "/worklist/rows", f"/studies/{uid}", "/admin/audit"):
        text = client.get(path).text
        for raw in ("<img src=x", "<script>alert", "</script><script>", "onerror=alert(1)>"):
            assert raw not in text, (path, raw)
        # {{ 7*7 }} is not evaluated: it follows </script> in the payload, so an evaluated
        # copy would read "...script&gt;49" (a bare "49" also occurs in times and ids).
        assert "script&gt;49" not in text and "script>49" not in text, path
    assert "{{ 7*7 }}" in client.get(f"/studies/{uid}").text  # shown whole, as text
    api = client.get(f"/api/studies/{uid}")
    assert api.headers["content-type"] == "application/json"
    assert api.json()["status_reason"] == PAYLOAD
