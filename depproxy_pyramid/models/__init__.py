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
from .audit import AuditEvent
from .cache import (
    CachedBlob,
    CachedListing,
    CachedManifest,
    CachedTag,
    CacheStatus,
    Lease,
    ListingKind,
)
from .meta import Base

__all__ = [
    "AuditEvent",
    "Base",
    "CacheStatus",
    "CachedBlob",
    "CachedListing",
    "CachedManifest",
    "CachedTag",
    "DeployToken",
    "Group",
    "ImageTtlPolicy",
    "Lease",
    "ListingKind",
    "Membership",
    "PersonalAccessToken",
    "ProxySettings",
    "Role",
    "Scope",
    "User",
    "Visibility",
    "database_prefix",
    "engine_from_settings",
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


def database_prefix(settings: Mapping[str, str]) -> str:
    """`depproxy.sqlalchemy.` when the add-on has a database of its own, else the host's."""
    return "depproxy.sqlalchemy." if settings.get("depproxy.sqlalchemy.url") else "sqlalchemy."


def get_engine(settings: Mapping[str, str], prefix: str = "sqlalchemy.") -> Engine:
    engine = engine_from_config(dict(settings), prefix)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def engine_from_settings(settings: Mapping[str, str]) -> Engine:
    """The engine of the add-on's database, from an app's (or host portal's) settings."""
    return get_engine(settings, database_prefix(settings))


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
    """`request.depproxy_dbsession`, joined to the request's transaction.

    Whatever transaction manager the host chose (pyramid_tm's thread-local default or
    `explicit_manager`) is the one the add-on's session joins: the host's `tm.*` settings and
    its own `request.dbsession` stay as they are.
    """
    config.include("pyramid_tm")
    engine = engine_from_settings(config.get_settings())
    session_factory = get_session_factory(engine)
    config.registry["depproxy.dbsession_factory"] = session_factory
    config.registry["depproxy.dbengine"] = engine

    def depproxy_dbsession(request: Request) -> Session:
        return get_tm_session(session_factory, request.tm, request=request)

    config.add_request_method(depproxy_dbsession, reify=True)
