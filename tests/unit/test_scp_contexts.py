"""The SCP's supported presentation contexts: cheap per-association copies, same content."""

from __future__ import annotations

import copy
from pathlib import Path

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined,unused-ignore]

from node.catalog import Catalog
from node.config import DicomSettings
from node.db.engine import make_engine, make_sessionmaker
from node.ingest.callers import CallerPolicy
from node.ingest.scp import DicomServer, SharedSyntaxContext, StoreSCP
from node.storage import InstanceStore


def _context() -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = Verification
    context.transfer_syntax = list(ALL_TRANSFER_SYNTAXES)
    context.scp_role = True
    return context


def test_copy_is_equal_but_owns_its_list() -> None:
    shared = SharedSyntaxContext.of(_context())
    clone = copy.deepcopy(shared)
    assert clone is not shared and isinstance(clone, SharedSyntaxContext)
    assert clone.abstract_syntax == shared.abstract_syntax
    assert clone.transfer_syntax == shared.transfer_syntax
    assert clone.scp_role is True
    clone.transfer_syntax.append("1.2.3")  # what negotiation may do to its copy
    clone.context_id = 7
    assert "1.2.3" not in shared.transfer_syntax and shared.context_id is None


def test_server_offers_every_storage_class_and_verification(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    scp = StoreSCP(
        store=InstanceStore(tmp_path / "data"),
        catalog=Catalog(make_sessionmaker(engine)),
        callers=CallerPolicy([], "TRIAGE"),
    )
    server = DicomServer(DicomSettings(), scp)
    offered = {cx.abstract_syntax: cx for cx in server._contexts}
    expected = {cx.abstract_syntax for cx in AllStoragePresentationContexts} | {Verification}
    assert set(offered) == expected
    assert all(isinstance(cx, SharedSyntaxContext) for cx in offered.values())
    assert all(set(cx.transfer_syntax) == set(ALL_TRANSFER_SYNTAXES) for cx in offered.values())
    scp.close()
    engine.dispose()
