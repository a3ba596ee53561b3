"""A host portal includes the add-on and keeps its own pages, error views included."""

from __future__ import annotations

import webtest
from pyramid.config import Configurator
from pyramid.response import Response

from tests.conftest import app_settings


def test_host_portal_keeps_its_own_error_pages(database, tmp_path):
    with Configurator(settings=app_settings(database.url, tmp_path / "storage")) as config:
        config.add_route("home", "/")
        config.add_view(lambda request: Response("portal home"), route_name="home")
        config.add_notfound_view(lambda request: Response("portal 404", status=404))
        config.include("depproxy_pyramid")
    app = webtest.TestApp(config.make_wsgi_app())

    assert app.get("/").text == "portal home"
    missing = app.get("/no/such/page", status=404)
    assert missing.text == "portal 404"
    assert "Docker-Distribution-Api-Version" not in missing.headers

    registry = app.get("/v2/", status=401)
    assert registry.json["errors"][0]["code"] == "UNAUTHORIZED"
    assert registry.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    unknown = app.get("/v2/acme/not-a-registry-path", status=404)
    assert unknown.json["errors"][0]["code"] == "NOT_FOUND"
