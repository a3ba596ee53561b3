import pytest

from depproxy_pyramid import main
from depproxy_pyramid.settings import DOCKER_HUB_URL, ConfigurationError, parse_settings

BASE = {
    "sqlalchemy.url": "sqlite://",
    "depproxy.storage.path": "/tmp/unused",
    "depproxy.jwt.secret": "s" * 40,
}


def test_defaults():
    settings = parse_settings(BASE)
    assert settings.upstream_url == DOCKER_HUB_URL
    assert settings.jwt_expire_seconds == 900
    assert settings.external_url is None
    assert settings.storage == "filesystem"
    assert settings.upstream_registries == {}
    assert settings.upstream_max_in_flight == 192


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"sqlalchemy.url": ""}, "sqlalchemy.url"),
        ({"depproxy.jwt.secret": ""}, "depproxy.jwt.secret"),
        ({"depproxy.jwt.secret": "short"}, "depproxy.jwt.secret"),
        ({"depproxy.jwt.expire_seconds": "soon"}, "depproxy.jwt.expire_seconds"),
        ({"depproxy.jwt.expire_seconds": "10"}, "depproxy.jwt.expire_seconds"),
        ({"depproxy.upstream.url": "ftp://example.org"}, "depproxy.upstream.url"),
        ({"depproxy.upstream.url": "registry-1.docker.io"}, "depproxy.upstream.url"),
        ({"depproxy.upstream.username": "bob"}, "depproxy.upstream.password"),
        ({"depproxy.upstream.password": "pw"}, "depproxy.upstream.username"),
        ({"depproxy.external_url": "http://x/?q=1"}, "depproxy.external_url"),
        ({"depproxy.development": "maybe"}, "depproxy.development"),
        ({"depproxy.session.secret": "short"}, "depproxy.session.secret"),
        ({"depproxy.upstream.registries": "not a host"}, "depproxy.upstream.registries"),
        ({"depproxy.upstream.registries": "ghcr.io=gopher://x"}, "depproxy.upstream.registries"),
        *(
            ({"depproxy.storage.accel_redirect": prefix}, "depproxy.storage.accel_redirect")
            for prefix in ("/no-trailing-slash", "relative/", "/a/../b/", "/a?b=1/", "/a%2e/", "/")
        ),
        ({"depproxy.upstream.max_in_flight": "0"}, "depproxy.upstream.max_in_flight"),
        ({"depproxy.upstream.max_in_flight": "many"}, "depproxy.upstream.max_in_flight"),
    ],
)
def test_bad_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigurationError) as info:
        parse_settings({**BASE, **overrides})
    assert info.value.key == key
    assert key in str(info.value)


def test_startup_stops_on_a_bad_setting():
    with pytest.raises(ConfigurationError, match="depproxy.jwt.expire_seconds"):
        main({}, **{**BASE, "depproxy.jwt.expire_seconds": "-1"})


def test_development_supplies_a_secret():
    settings = parse_settings({**BASE, "depproxy.jwt.secret": "", "depproxy.development": "true"})
    assert settings.jwt_secret


def test_extra_registries():
    settings = parse_settings(
        {**BASE, "depproxy.upstream.registries": "ghcr.io quay.io=https://mirror.example/quay/"}
    )
    assert settings.upstream_registries == {
        "ghcr.io": "https://ghcr.io",
        "quay.io": "https://mirror.example/quay",
    }


def test_accel_redirect_is_off_by_default_and_takes_a_location():
    assert parse_settings(BASE).storage_accel_redirect is None
    settings = parse_settings({**BASE, "depproxy.storage.accel_redirect": "/_depproxy/storage/"})
    assert settings.storage_accel_redirect == "/_depproxy/storage/"


def test_accel_redirect_needs_filesystem_storage_at_startup():
    s3 = {**BASE, "depproxy.storage": "s3", "depproxy.storage.accel_redirect": "/_store/"}
    with pytest.raises(ConfigurationError, match="needs depproxy.storage = filesystem") as info:
        main({}, **s3)
    assert info.value.key == "depproxy.storage.accel_redirect"


def test_docker_hub_mirrors_name_configured_upstreams():
    settings = parse_settings(
        {
            **BASE,
            "depproxy.upstream.url": "https://Mirror.Internal:5000/",
            "depproxy.upstream.registries": "mirror.gcr.io ghcr.io",
            "depproxy.upstream.docker_hub_mirrors": "mirror.internal:5000 MIRROR.gcr.io",
        }
    )
    assert settings.upstream_docker_hub_mirrors == {"mirror.internal:5000", "mirror.gcr.io"}
    assert parse_settings(BASE).upstream_docker_hub_mirrors == frozenset()


@pytest.mark.parametrize(
    ("mirrors", "named"),
    [
        ("mirror.gcr.io", "'mirror.gcr.io'"),
        # The default upstream is named with its port, as credentials and realms name it.
        ("mirror.internal", "'mirror.internal'"),
        ("mirror.internal:5000 quay.io", "'quay.io'"),
    ],
)
def test_a_docker_hub_mirror_that_is_not_an_upstream_is_refused(mirrors, named):
    with pytest.raises(ConfigurationError) as info:
        parse_settings(
            {
                **BASE,
                "depproxy.upstream.url": "https://mirror.internal:5000",
                "depproxy.upstream.docker_hub_mirrors": mirrors,
            }
        )
    assert info.value.key == "depproxy.upstream.docker_hub_mirrors"
    assert str(info.value) == (
        f"setting 'depproxy.upstream.docker_hub_mirrors': {named} is not a configured "
        "upstream: name the default upstream as 'mirror.internal:5000' (the host[:port] of "
        "depproxy.upstream.url) or a host of depproxy.upstream.registries"
    )


def test_the_pages_session_secret_is_its_own_or_derived_from_the_signing_secret():
    derived = parse_settings(BASE).session_secret
    assert len(derived) == 64
    assert derived != BASE["depproxy.jwt.secret"]
    assert derived == parse_settings(BASE).session_secret
    own = "p" * 40
    assert parse_settings({**BASE, "depproxy.session.secret": own}).session_secret == own
