"""When the proxy serves a kept tag list or referrers instead of asking upstream: the service's
decisions, with the upstream client's calls replaced and a real database on each backend."""

from __future__ import annotations

import itertools

import pytest

from depproxy_pyramid.errors import RegistryError
from depproxy_pyramid.metrics import Metrics
from depproxy_pyramid.models import Group
from depproxy_pyramid.requestlog import Result
from depproxy_pyramid.services import upstreams_from_settings
from depproxy_pyramid.services.listing import TagQuery
from depproxy_pyramid.services.proxy import GroupUpstream, ProxyService
from depproxy_pyramid.settings import parse_settings
from depproxy_pyramid.storage import storage_from_settings
from depproxy_pyramid.upstream import (
    UpstreamNotFound,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from depproxy_pyramid.upstream.gate import BUSY_RETRY_AFTER, FAILURES_TO_OPEN
from depproxy_pyramid.upstream.listing import TagPage
from tests.conftest import app_settings

IMAGE = "library/alpine"
SUBJECT = "sha256:" + "a" * 64
SBOM = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha256:" + "b" * 64}
_groups = itertools.count()


class FakeUpstream:
    """Answers the client's listing calls with `answer`, or raises it when it is an error."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def make_service(database, tmp_path, **extra: str) -> ProxyService:
    settings = parse_settings(
        app_settings(
            database.url,
            tmp_path / "storage",
            **{"depproxy.upstream.url": "https://registry.example", **extra},
        )
    )
    return ProxyService(
        settings,
        storage_from_settings(settings.raw),
        upstreams_from_settings(settings),
        database.session_factory,
        Metrics(),
    )


@pytest.fixture
def group(database) -> GroupUpstream:
    manager, session = database.session()
    with manager:
        row = Group(path=f"listing-{next(_groups)}", name="listing")
        session.add(row)
        session.flush()
        return GroupUpstream(row.id)


def upstream_calls(service: ProxyService, monkeypatch, method: str, answer) -> FakeUpstream:
    fake = FakeUpstream(answer)
    client, _ = service.upstreams.resolve(IMAGE)
    monkeypatch.setattr(client, method, fake)
    return fake


def test_a_list_is_asked_of_upstream_every_time_by_default(database, tmp_path, group, monkeypatch):
    service = make_service(database, tmp_path)
    fake = upstream_calls(service, monkeypatch, "list_tags", TagPage(("b", "a")))
    first = service.tag_list(group, IMAGE, TagQuery())
    assert (first.content, first.result, first.upstream_status) == (
        {"tags": ["a", "b"], "next": None},
        Result.MISS,
        200,
    )
    fake.answer = TagPage(("c",))
    assert service.tag_list(group, IMAGE, TagQuery()).content["tags"] == ["c"]
    assert fake.calls == 2


def test_within_the_freshness_time_the_kept_list_is_served(database, tmp_path, group, monkeypatch):
    service = make_service(database, tmp_path, **{"depproxy.manifest.freshness_seconds": "60"})
    fake = upstream_calls(service, monkeypatch, "list_tags", TagPage(("a",)))
    service.tag_list(group, IMAGE, TagQuery(1))
    again = service.tag_list(group, IMAGE, TagQuery(1))
    assert (again.content["tags"], again.result) == (["a"], Result.HIT)
    # Another page is another answer.
    service.tag_list(group, IMAGE, TagQuery(2))
    assert fake.calls == 2


@pytest.mark.parametrize(
    ("failure", "status"),
    [(UpstreamTimeout("read timed out"), 504), (UpstreamRateLimited("slow down"), 429)],
)
def test_a_failing_upstream_gets_the_kept_list_or_its_error(
    database, tmp_path, group, monkeypatch, failure, status
):
    service = make_service(database, tmp_path)
    fake = upstream_calls(service, monkeypatch, "list_tags", TagPage(("a", "b", "c")))
    kept = service.tag_list(group, IMAGE, TagQuery(2))
    fake.answer = failure
    stale = service.tag_list(group, IMAGE, TagQuery(2))
    assert (stale.content, stale.result) == (kept.content, Result.STALE)
    with pytest.raises(RegistryError) as raised:
        service.tag_list(group, IMAGE, TagQuery(1))
    assert raised.value.status == status


def test_an_open_breaker_or_a_full_budget_serves_the_kept_list_without_asking(
    database, tmp_path, group, monkeypatch
):
    service = make_service(database, tmp_path, **{"depproxy.upstream.max_in_flight": "1"})
    fake = upstream_calls(service, monkeypatch, "list_tags", TagPage(("a",)))
    service.tag_list(group, IMAGE, TagQuery())
    with service.gate.slot("registry.example"):
        busy = service.tag_list(group, IMAGE, TagQuery())
        assert busy.result == Result.STALE
        with pytest.raises(RegistryError) as raised:
            service.tag_list(group, IMAGE, TagQuery(5))
        assert (raised.value.status, raised.value.headers["Retry-After"]) == (
            503,
            str(BUSY_RETRY_AFTER),
        )
    assert fake.calls == 1

    fake.answer = UpstreamTimeout("read timed out")
    for _ in range(FAILURES_TO_OPEN):
        service.tag_list(group, IMAGE, TagQuery())
    calls = fake.calls
    assert service.tag_list(group, IMAGE, TagQuery()).result == Result.STALE
    assert fake.calls == calls


def test_a_missing_repository_is_name_unknown(database, tmp_path, group, monkeypatch):
    service = make_service(database, tmp_path)
    upstream_calls(service, monkeypatch, "list_tags", UpstreamNotFound("no", status=404))
    with pytest.raises(RegistryError) as raised:
        service.tag_list(group, IMAGE, TagQuery())
    assert (raised.value.status, raised.value.code) == (404, "NAME_UNKNOWN")


def test_referrers_are_kept_and_served_stale_like_tag_lists(database, tmp_path, group, monkeypatch):
    service = make_service(database, tmp_path)
    fake = upstream_calls(service, monkeypatch, "get_referrers", (SBOM,))
    assert service.referrers(group, IMAGE, SUBJECT).content == {"manifests": [SBOM]}
    fake.answer = UpstreamTimeout("read timed out")
    stale = service.referrers(group, IMAGE, SUBJECT)
    assert (stale.content, stale.result) == ({"manifests": [SBOM]}, Result.STALE)


def test_referrers_are_served_stale_when_the_fallback_tag_fails_upstream(
    database, tmp_path, group, monkeypatch
):
    service = make_service(database, tmp_path)
    api = upstream_calls(service, monkeypatch, "get_referrers", (SBOM,))
    assert service.referrers(group, IMAGE, SUBJECT).content == {"manifests": [SBOM]}
    # Now upstream has no referrers API, and its referrers tag times out.
    api.answer = UpstreamNotFound("no referrers API", status=404)
    tag = upstream_calls(service, monkeypatch, "get_manifest", UpstreamTimeout("timed out"))
    stale = service.referrers(group, IMAGE, SUBJECT)
    assert (stale.content, stale.result) == ({"manifests": [SBOM]}, Result.STALE)
    assert tag.calls == 1
    # With nothing kept, the fallback's error is the answer.
    with pytest.raises(RegistryError) as raised:
        service.referrers(group, IMAGE, "sha256:" + "c" * 64)
    assert raised.value.status == 504
