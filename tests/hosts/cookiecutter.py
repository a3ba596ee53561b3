"""A host shaped like Pyramid's cookiecutter starter plus the wiki2 tutorial's security.

Its own `request.dbsession` with pyramid_tm's explicit manager, its own `users` table and
Alembic migrations (`alembic_version`), an auth-ticket policy whose principals include
`role:<role>`, and pages of its own. With the add-on it keeps the default account source (the
add-on's own tables) and shares its database.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import zope.sqlalchemy
from pyramid.authentication import AuthTktCookieHelper
from pyramid.authorization import ACLHelper, Allow, Authenticated, Everyone
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPSeeOther
from pyramid.request import RequestLocalCache
from pyramid.response import Response
from pyramid.router import Router
from pyramid.security import remember
from sqlalchemy import Integer, MetaData, String, engine_from_config, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

ALEMBIC = Path(__file__).with_name("cookiecutter_alembic")


class Base(DeclarativeBase):
    # The cookiecutter's naming convention, which the add-on's tables used to collide with.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    password_hash: Mapped[str] = mapped_column(String(200))


class MyModel(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


def hash_password(password: str) -> str:
    return hashlib.sha256(b"cookiecutter-test-salt" + password.encode()).hexdigest()


class HostSecurityPolicy:
    """wiki2's policy: an auth ticket names the user; principals carry the user's role."""

    def __init__(self, secret: str) -> None:
        self.authtkt = AuthTktCookieHelper(secret=secret)
        self.identity_cache = RequestLocalCache(self.load_identity)
        self.acl = ACLHelper()

    def load_identity(self, request):
        ticket = self.authtkt.identify(request)
        if ticket is None:
            return None
        return request.dbsession.get(User, int(ticket["userid"]))

    def identity(self, request):
        return self.identity_cache.get_or_create(request)

    def authenticated_userid(self, request):
        user = self.identity(request)
        return user.id if user is not None else None

    def remember(self, request, userid, **kw):
        return self.authtkt.remember(request, userid, **kw)

    def forget(self, request, **kw):
        return self.authtkt.forget(request, **kw)

    def permits(self, request, context, permission):
        principals = [Everyone]
        user = self.identity(request)
        if user is not None:
            principals += [Authenticated, f"u:{user.id}", f"role:{user.role}"]
        return self.acl.permits(context, principals, permission)


class RootFactory:
    __acl__ = [(Allow, "role:editor", "edit"), (Allow, "role:admin", ("edit", "admin"))]

    def __init__(self, request) -> None:
        pass


def home(request):
    count = len(request.dbsession.scalars(select(MyModel)).all())
    user = request.identity
    return Response(f"cookiecutter home: {count} models, user {user.name if user else '-'}")


def login(request):
    user = request.dbsession.scalar(select(User).where(User.name == request.POST.get("login")))
    password_hash = hash_password(request.POST.get("password", ""))
    if user is None or not hmac.compare_digest(user.password_hash, password_hash):
        return Response("cookiecutter: bad login", status=400)
    return HTTPSeeOther("/", headers=remember(request, user.id))


def add_model(request):
    request.dbsession.add(MyModel(name=request.POST["name"]))
    return Response("added")


def admin(request):
    return Response("cookiecutter admin")


def main(global_config, **settings) -> Router:
    return make_app(settings, with_addon=True)


def make_app(settings: dict, with_addon: bool) -> Router:
    settings = dict(settings)
    settings["tm.manager_hook"] = "pyramid_tm.explicit_manager"
    with Configurator(settings=settings, root_factory=RootFactory) as config:
        config.include("pyramid_tm")
        session_factory = sessionmaker(bind=engine_from_config(settings, "sqlalchemy."))

        def dbsession(request):
            session = session_factory()
            zope.sqlalchemy.register(session, transaction_manager=request.tm)
            return session

        config.add_request_method(dbsession, reify=True)
        config.set_security_policy(HostSecurityPolicy(settings["auth.secret"]))
        if with_addon:
            config.include("depproxy_pyramid")
        config.add_route("home", "/")
        config.add_route("login", "/login")
        config.add_route("models", "/models")
        config.add_route("admin", "/admin")
        config.add_view(home, route_name="home")
        config.add_view(login, route_name="login", request_method="POST")
        config.add_view(add_model, route_name="models", request_method="POST", permission="edit")
        config.add_view(admin, route_name="admin", permission="admin")
        config.add_forbidden_view(lambda request: Response("cookiecutter 403", status=403))
        config.add_notfound_view(lambda request: Response("cookiecutter 404", status=404))
    return config.make_wsgi_app()
