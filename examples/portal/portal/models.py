"""The portal's own tables and its request session, `request.dbsession`.

The portal shares its database with the add-on. Its tables are prefixed `portal_`, the add-on's
`depproxy_`; each side has its own metadata, engine and session, and both sessions join the
request's one transaction (pyramid_tm).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime

import transaction
import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.request import Request
from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    MetaData,
    String,
    Text,
    engine_from_config,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

PORTAL_ROLES = ("admin", "member")
TEAM_ROLES = ("guest", "reporter", "developer", "maintainer", "owner")


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    return CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=column)


class PortalUser(Base):
    __tablename__ = "portal_users"
    __table_args__ = (_one_of("role", PORTAL_ROLES),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="member")


class RegistryTeam(Base):
    """The portal user is a member of the add-on group at `group_path`, with `role`."""

    __tablename__ = "portal_registry_teams"
    __table_args__ = (_one_of("role", TEAM_ROLES),)

    user_id: Mapped[int] = mapped_column(
        ForeignKey("portal_users.id", ondelete="CASCADE"), primary_key=True
    )
    group_path: Mapped[str] = mapped_column(String(255), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))


class Note(Base):
    __tablename__ = "portal_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(ForeignKey("portal_users.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=lambda: datetime.now(UTC)
    )


# scrypt at n=2**14, r=8, p=1: about 16 MiB and a few tens of milliseconds per check.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
# Checked against when the user name is unknown, so the answer takes as long either way.
_NO_USER_HASH = f"scrypt${'00' * 16}${'00' * 64}"


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, dklen=64, **_SCRYPT)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    return f"scrypt${salt.hex()}${_scrypt(password, salt).hex()}"


def check_password(password_hash: str, password: str) -> bool:
    scheme, _, rest = password_hash.partition("$")
    salt, _, digest = rest.partition("$")
    if scheme != "scrypt":
        return False
    return hmac.compare_digest(_scrypt(password, bytes.fromhex(salt)).hex(), digest)


def authenticate_user(dbsession: Session, username: str, password: str) -> PortalUser | None:
    """The user that `username` and `password` sign in, or None."""
    user = dbsession.scalar(select(PortalUser).where(PortalUser.username == username))
    matches = check_password(user.password_hash if user else _NO_USER_HASH, password)
    return user if user is not None and matches else None


def get_engine(settings: dict, prefix: str = "sqlalchemy.") -> Engine:
    return engine_from_config(settings, prefix)


def get_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine)


def get_tm_session(
    session_factory: sessionmaker[Session], transaction_manager: transaction.TransactionManager
) -> Session:
    """A session committed or aborted with `transaction_manager`'s transaction."""
    dbsession = session_factory()
    zope.sqlalchemy.register(dbsession, transaction_manager=transaction_manager)
    return dbsession


def includeme(config: Configurator) -> None:
    """`request.dbsession`: the portal's session, joined to pyramid_tm's `request.tm`."""
    engine = get_engine(config.get_settings())
    session_factory = get_session_factory(engine)
    config.registry["portal.dbengine"] = engine

    def dbsession(request: Request) -> Session:
        return get_tm_session(session_factory, request.tm)

    config.add_request_method(dbsession, reify=True)
