"""The data model and the per-request session (zope.sqlalchemy + pyramid_tm)."""

from __future__ import annotations

from collections.abc import Mapping

import transaction
import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.request import Request
from sqlalchemy import Engine, engine_from_config, event
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from .accounts import (
    DeployToken,
    Group,
    ImageTtlPolicy,
    Membership,
    PersonalAccessToken,
    ProxySettings,
    Role,
    Scope,
    User,
    Visibility,
)
from .cache import CachedBlob, CachedManifest, CachedTag, CacheStatus
from .meta import Base

__all__ = [
    "Base",
    "CacheStatus",
    "CachedBlob",
    "CachedManifest",
    "CachedTag",
    "DeployToken",
    "Group",
    "ImageTtlPolicy",
    "Membership",
    "PersonalAccessToken",
    "ProxySettings",
    "Role",
    "Scope",
    "User",
    "Visibility",
    "get_engine",
    "get_session_factory",
    "get_tm_session",
]

configure_mappers()


def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    # WAL lets readers go on while a fill records its row; foreign keys are off by default.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def get_engine(settings: Mapping[str, str], prefix: str = "sqlalchemy.") -> Engine:
    engine = engine_from_config(dict(settings), prefix)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def get_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def get_tm_session(
    session_factory: sessionmaker[Session],
    transaction_manager: transaction.TransactionManager,
    request: Request | None = None,
) -> Session:
    """A session joined to `transaction_manager`, committed or aborted with it."""
    dbsession = session_factory(info={"request": request})
    zope.sqlalchemy.register(dbsession, transaction_manager=transaction_manager)
    return dbsession


def includeme(config: Configurator) -> None:
    settings = config.get_settings()
    settings["tm.manager_hook"] = "pyramid_tm.explicit_manager"
    # Annotating would resolve the identity before routing, when the policy cannot yet tell
    # the token endpoint (Basic) from the registry API (Bearer).
    settings["tm.annotate_user"] = False
    config.include("pyramid_tm")

    engine = get_engine(settings)
    session_factory = get_session_factory(engine)
    config.registry["depproxy.dbsession_factory"] = session_factory
    config.registry["depproxy.dbengine"] = engine

    def dbsession(request: Request) -> Session:
        # Tests may hand in their own session bound to a rolled-back outer transaction.
        session = request.environ.get("app.dbsession")
        if session is None:
            session = get_tm_session(session_factory, request.tm, request=request)
        return session

    config.add_request_method(dbsession, reify=True)
