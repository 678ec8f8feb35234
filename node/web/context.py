"""What request handlers get from the node: settings, sessions, store, rules, users, audit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

from fastapi import Depends, Query, Request
from fastapi import Path as PathParameter
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from node.config import Settings
from node.routing.store import RuleStore
from node.storage import InstanceStore
from node.users.accounts import Accounts
from node.users.web_sessions import WebSessions
from node.web.audit import AuditTrail

if TYPE_CHECKING:
    from node.runtime import Node

TEMPLATES_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")


@dataclass
class WebContext:
    settings: Settings
    sessions: sessionmaker[Session]
    #: Sessions for handlers that only read (see ``Node.reads``).
    reads: sessionmaker[Session]
    store: InstanceStore
    rules: RuleStore
    accounts: Accounts
    web_sessions: WebSessions
    audit: AuditTrail
    templates: Jinja2Templates
    node: Node

    @classmethod
    def of(cls, node: Node) -> WebContext:
        return cls(
            settings=node.settings,
            sessions=node.sessions,
            reads=node.reads,
            store=node.store,
            rules=node.rules,
            accounts=Accounts(node.sessions, node.reads),
            web_sessions=WebSessions(node.sessions, node.reads),
            audit=AuditTrail(node.sessions),
            templates=Jinja2Templates(directory=str(TEMPLATES_DIR)),
            node=node,
        )


def web_context(request: Request) -> WebContext:
    return cast(WebContext, request.app.state.ctx)


Context = Annotated[WebContext, Depends(web_context)]

#: The largest row offset or rules version a URL may give: the database's 32-bit
#: integers (a larger number overflowed the query: a 500 instead of a 422).
MAX_URL_NUMBER = 2**31 - 1
#: ``?offset=`` of a paged list.
Offset = Annotated[int, Query(ge=0, le=MAX_URL_NUMBER)]
#: A rules version in a path.
RulesVersion = Annotated[int, PathParameter(ge=1, le=MAX_URL_NUMBER)]


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None
