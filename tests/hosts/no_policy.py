"""A host with no security policy at all, pyramid_tm's default (thread-local) manager, and a
view that names a permission nobody checks: without a policy Pyramid serves it to anyone.

With the add-on the host keeps exactly that, while the add-on's private groups stay private.
"""

from __future__ import annotations

import zope.sqlalchemy
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPForbidden
from pyramid.response import Response
from pyramid.router import Router
from sqlalchemy import Integer, String, engine_from_config, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


def notes(request):
    texts = request.dbsession.scalars(select(Note.text).order_by(Note.id)).all()
    return Response("notes: " + ", ".join(texts))


def add_note(request):
    request.dbsession.add(Note(text=request.POST["text"]))
    return Response("added")


def edit(request):
    return Response("anyone may edit: no policy")


def refuse(request):
    raise HTTPForbidden()


def main(global_config, **settings) -> Router:
    return make_app(settings, with_addon=True)


def make_app(settings: dict, with_addon: bool) -> Router:
    with Configurator(settings=settings) as config:
        config.include("pyramid_tm")
        session_factory = sessionmaker(bind=engine_from_config(settings, "sqlalchemy."))

        def dbsession(request):
            # The thread-local transaction manager: pyramid_tm's default.
            session = session_factory()
            zope.sqlalchemy.register(session)
            return session

        config.add_request_method(dbsession, reify=True)
        if with_addon:
            config.include("depproxy_pyramid")
        config.add_route("notes", "/notes")
        config.add_route("edit", "/edit")
        config.add_route("refuse", "/refuse")
        config.add_view(notes, route_name="notes", request_method="GET")
        config.add_view(add_note, route_name="notes", request_method="POST")
        config.add_view(edit, route_name="edit", permission="edit")
        config.add_view(refuse, route_name="refuse")
    return config.make_wsgi_app()
