"""The web tests' node (SQLite and PostgreSQL, an admin and a radiologist) and client,
for every test file here (defined with the API tests)."""

from tests.unit.web.test_web_api import client, node

__all__ = ["client", "node"]
