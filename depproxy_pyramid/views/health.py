"""`/-/health`: whether this process can serve, for load balancers and orchestrators.

It answers for the two things every pull needs besides upstream: the database and storage
(reachable, and the local spool directory writable). Upstream is deliberately not checked: the
cache keeps serving while it is down, so a node must not be taken out of rotation for it. The
body says which check failed, never why (hosts, credentials and paths go to the log).
"""

from __future__ import annotations

import logging
import os

from pyramid.request import Request
from pyramid.response import Response
from pyramid.security import NO_PERMISSION_REQUIRED
from pyramid.view import view_config
from sqlalchemy import text

from ..services.proxy import ProxyService

log = logging.getLogger(__name__)

# Never a real key's shape (`<group id>/<kind>/...`): asking for it reaches storage and finds
# nothing, which is the answer a reachable storage gives.
PROBE_KEY = "health/probe"


def database_reachable(service: ProxyService) -> bool:
    try:
        with service.session_factory() as session:
            session.execute(text("SELECT 1"))
    except Exception:
        log.warning("health check: the database is not reachable", exc_info=True)
        return False
    return True


def storage_reachable(service: ProxyService) -> bool:
    storage = service.storage
    if not os.access(storage.spool_dir, os.W_OK | os.X_OK):
        log.warning("health check: the spool directory %s is not writable", storage.spool_dir)
        return False
    try:
        storage.size(PROBE_KEY)
    except Exception:
        log.warning("health check: storage is not reachable", exc_info=True)
        return False
    return True


@view_config(
    route_name="depproxy.health", request_method="GET", permission=NO_PERMISSION_REQUIRED
)
def health_view(request: Request) -> Response:
    service: ProxyService = request.registry["depproxy.proxy"]
    checks = {"database": database_reachable(service), "storage": storage_reachable(service)}
    healthy = all(checks.values())
    response = Response(
        json_body={
            "status": "ok" if healthy else "unavailable",
            "checks": {name: "ok" if ok else "failing" for name, ok in checks.items()},
        },
        status=200 if healthy else 503,
        charset="utf-8",
    )
    response.content_type = "application/json"
    response.cache_control = "no-store"
    return response
