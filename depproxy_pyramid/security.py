"""Who is asking on the add-on's URLs: HTTP Basic on the token endpoint, Bearer JWTs on `/v2`.

A token request without credentials is the anonymous caller, as on Docker Hub: its token opens
only what an ACL grants `ANONYMOUS_PULLER` (an open mirror group), and it is no one to the
host: `request.identity` is None for it.

A Pyramid application has one security policy. The add-on's `SecurityPolicy` judges the add-on's
URLs only; `HostAndAddonPolicy` puts it beside whatever policy the host portal has (or none), so
the host's URLs keep theirs and the add-on's never depend on the host having one.

Every pull is a run of requests with one bearer token. `BearerTokens` keeps a verified token's
claims until the token expires, and who its subject is (account, memberships, the credential it
was minted from) for `depproxy.lookup_cache_seconds`: a disabled account, a removed membership
or a revoked token is refused within that time.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import jwt
from pyramid.authorization import ACLHelper, Authenticated, Everyone
from pyramid.config import PHASE2_CONFIG, Configurator
from pyramid.events import ApplicationCreated
from pyramid.interfaces import ISecurityPolicy
from pyramid.request import Request, RequestLocalCache
from pyramid.security import Allowed, Denied
from sqlalchemy import select
from zope.interface import Interface

from .accounts import Account, IAccountSource, valid_account, valid_memberships
from .addresses import client_address, in_networks, networks
from .api.auth import API_PATHS, api_account, is_api_path
from .caching import MISSING, BoundedCache
from .credentials import token_digest
from .errors import RegistryError
from .models import DeployToken, PersonalAccessToken, Role, Scope
from .names import Repository
from .permissions import (
    ANONYMOUS_PULLER,
    INSTANCE_ADMIN,
    SIGNED_IN_ACCOUNT,
    Permission,
    account_principal,
    deploy_token_principal,
    member_principal,
)
from .settings import Settings
from .throttle import (
    SIGN_IN_REFUSAL,
    ISignInGuard,
    SignInGuard,
    SignInRefused,
    sign_in_guard,
)

JWT_ISSUER = "depproxy-pyramid"
JWT_AUDIENCE = "dependency_proxy"
ANONYMOUS_SUBJECT = "anonymous"
MAX_BASIC_HEADER = 4096
TOKEN_PATH = "/jwt/auth"
# The add-on's own URLs: the registry API (clients require it at the root), the token endpoint,
# the metrics and the health check, and the JSON API's (`api`). Everything else belongs to the
# host.
REGISTRY_PATHS = r"^/v2(/|$)|^/jwt/auth$|^/-/(metrics|health)$"
ADDON_PATHS = rf"{REGISTRY_PATHS}|{API_PATHS}"
_ADDON_PATHS_RE = re.compile(ADDON_PATHS)


def is_addon_path(request: Request) -> bool:
    # The raw WSGI value: decoding a malformed path must not fail here, before any view.
    return _ADDON_PATHS_RE.match(request.environ.get("PATH_INFO", "")) is not None


@dataclass(frozen=True)
class DeployTokenRef:
    id: int
    username: str


@dataclass(frozen=True)
class Identity:
    """An account, a deploy token or the anonymous caller, and what its credential may be used
    for. The anonymous caller (neither account nor deploy token) is the add-on's own business:
    `request.identity` is None for it, as for anyone who presented nothing."""

    account: Account | None
    deploy_token: DeployTokenRef | None
    scopes: frozenset[str]
    principals: tuple[str, ...]
    # The repositories a bearer token grants; None when the caller did not present one.
    access: frozenset[tuple[str, str]] | None = None
    via: str = field(default="password")
    # The mirror group the token's grants of bare image names were for.
    mirror_group: str | None = None

    @property
    def is_anonymous(self) -> bool:
        return self.account is None and self.deploy_token is None

    @property
    def name(self) -> str:
        if self.account is not None:
            return self.account.name
        if self.deploy_token is not None:
            return self.deploy_token.username
        return ANONYMOUS_SUBJECT

    @property
    def subject(self) -> str:
        if self.account is not None:
            return f"account:{self.account.id}"
        if self.deploy_token is not None:
            return f"deploy_token:{self.deploy_token.id}"
        return ANONYMOUS_SUBJECT

    def may_pull_repository(self, repository: Repository) -> bool:
        if self.access is None:
            return True
        # A grant of `library/alpine` was for the mirror group of its day: after the operator
        # names another, the token opens nothing there.
        if repository.mirror_name is not None and repository.group_path != self.mirror_group:
            return False
        return (repository.name, "pull") in self.access


# What a request without credentials may do: pull where an ACL grants ANONYMOUS_PULLER that,
# and nothing else (no api scope, no account, no membership).
ANONYMOUS = Identity(
    account=None,
    deploy_token=None,
    scopes=frozenset({Scope.READ_REGISTRY.value}),
    principals=(ANONYMOUS_PULLER,),
    via="anonymous",
)


def _is_live(expires_at: datetime | None, revoked: bool) -> bool:
    return not revoked and (expires_at is None or expires_at > datetime.now(UTC))


def _seconds_until(expires_at: datetime | None) -> float | None:
    return None if expires_at is None else (expires_at - datetime.now(UTC)).total_seconds()


def _account_sources(request: Request) -> IAccountSource:
    return request.registry.getUtility(IAccountSource)


def account_identity(request: Request, account: Account, via: str) -> Identity:
    principals = [account_principal(account.id), SIGNED_IN_ACCOUNT]
    if account.is_admin:
        principals.append(INSTANCE_ADMIN)
    memberships = valid_memberships(_account_sources(request).memberships(request, account))
    for path, role in memberships.items():
        principals.extend(member_principal(path, r) for r in Role if r <= role)
    return Identity(
        account=account,
        deploy_token=None,
        scopes=frozenset(account.scopes),
        principals=tuple(principals),
        via=via,
    )


def deploy_token_identity(token: DeployToken) -> Identity:
    scopes = token.scope_set
    principals = (
        (f"depproxy:deploy_token:{token.id}", deploy_token_principal(token.group.path))
        if Scope.READ_REGISTRY in scopes
        else (f"depproxy:deploy_token:{token.id}",)
    )
    return Identity(
        account=None,
        deploy_token=DeployTokenRef(token.id, token.username),
        scopes=scopes,
        principals=principals,
        via="deploy_token",
    )


def parse_basic(header: str) -> tuple[str, str] | None:
    """(username, password) from an `Authorization: Basic` header, None if it is malformed."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.strip() or len(header) > MAX_BASIC_HEADER:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep or not username or not password or "\x00" in decoded:
        return None
    return username, password


def authenticate_basic(request: Request, username: str, password: str) -> Identity | None:
    """A group deploy token, or whatever the account source signs in; None when neither does."""
    deploy_token = request.depproxy_dbsession.scalar(
        select(DeployToken).where(DeployToken.username == username)
    )
    if deploy_token is not None:
        if secrets.compare_digest(deploy_token.token_digest, token_digest(password)) and _is_live(
            deploy_token.expires_at, deploy_token.revoked
        ):
            return deploy_token_identity(deploy_token)
        return None
    account = valid_account(_account_sources(request).authenticate(request, username, password))
    if account is None:
        return None
    return account_identity(request, account, via="password")


def issue_jwt(
    settings: Settings, identity: Identity, access: list[dict], mirror_group: str | None = None
) -> tuple[str, int, datetime]:
    """A registry token granting `access`; `mirror_group` is the group its grants of bare
    image names are for, when it has any."""
    issued = int(time.time())
    claims = {
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "sub": identity.subject,
        "name": identity.name,
        "iat": issued,
        "nbf": issued,
        "exp": issued + settings.jwt_expire_seconds,
        "jti": secrets.token_hex(16),
        "access": access,
    }
    if mirror_group is not None:
        claims["mirror"] = mirror_group
    if identity.account is not None and identity.account.personal_access_token_id is not None:
        # Checked again with the subject: revoking the token (or its expiry) ends this one too.
        claims["pat"] = identity.account.personal_access_token_id
    token = jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
    return token, settings.jwt_expire_seconds, datetime.fromtimestamp(issued, UTC)


def decode_jwt(settings: Settings, token: str) -> dict | None:
    try:
        return jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=["HS256"],
            audience=JWT_AUDIENCE,
            issuer=JWT_ISSUER,
            options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            leeway=5,
        )
    except jwt.PyJWTError:
        return None


def _granted(claims: dict) -> frozenset[tuple[str, str]] | None:
    access = claims.get("access")
    if not isinstance(access, list):
        return None
    granted: set[tuple[str, str]] = set()
    for entry in access:
        if not isinstance(entry, dict) or entry.get("type") != "repository":
            continue
        name, actions = entry.get("name"), entry.get("actions")
        if isinstance(name, str) and isinstance(actions, list):
            granted.update((name, action) for action in actions if isinstance(action, str))
    return frozenset(granted)


@dataclass(frozen=True)
class BearerClaims:
    """What a verified registry token says: whose it is and which repositories it opens."""

    kind: str
    subject_id: str
    # Who the subject was when the token was minted: a removed account's or deploy token's id
    # can be given to a new one (SQLite reuses the highest), which must not inherit the token.
    name: str
    # The personal access token it was minted from, if any.
    personal_access_token_id: int | None
    access: frozenset[tuple[str, str]]
    expires: float
    mirror_group: str | None

    @property
    def is_anonymous(self) -> bool:
        return self.kind == ANONYMOUS_SUBJECT


def bearer_claims(settings: Settings, token: str) -> BearerClaims | None:
    claims = decode_jwt(settings, token)
    if claims is None:
        return None
    access = _granted(claims)
    kind, _, subject_id = str(claims["sub"]).partition(":")
    pat = claims.get("pat")
    mirror = claims.get("mirror")
    name = claims.get("name")
    if (
        access is None
        or not isinstance(name, str)
        or not (subject_id or kind == ANONYMOUS_SUBJECT)
        or ("pat" in claims and type(pat) is not int)
        or not isinstance(mirror, str | None)
    ):
        return None
    return BearerClaims(kind, subject_id, name, pat, access, float(claims["exp"]), mirror)


def subject_identity(
    request: Request, kind: str, subject_id: str, pat: int | None
) -> tuple[Identity | None, float | None]:
    """Who a token's subject is now, and for how many seconds at most that can hold (until
    the credential behind it expires; None: no expiry of its own)."""
    if kind == "account":
        account = valid_account(_account_sources(request).account(request, subject_id))
        if account is None:
            return None, None
        lifetime = None
        if pat is not None:
            # Minted from a personal access token: revoking it (or its expiry) ends this too.
            token = request.depproxy_dbsession.get(PersonalAccessToken, pat)
            if (
                token is None
                or str(token.user_id) != account.id
                or not _is_live(token.expires_at, token.revoked)
            ):
                return None, None
            lifetime = _seconds_until(token.expires_at)
        return account_identity(request, account, via="bearer"), lifetime
    if kind == "deploy_token" and subject_id.isdigit():
        deploy_token = request.depproxy_dbsession.get(DeployToken, int(subject_id))
        if deploy_token is None or not _is_live(deploy_token.expires_at, deploy_token.revoked):
            return None, None
        return deploy_token_identity(deploy_token), _seconds_until(deploy_token.expires_at)
    return None, None


class BearerTokens:
    """Bearer tokens to identities: claims kept until the token expires, subjects briefly."""

    MAX_TOKENS = 4096
    MAX_SUBJECTS = 4096

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._claims: BoundedCache[str, BearerClaims] = BoundedCache(self.MAX_TOKENS)
        self._subjects: BoundedCache[tuple[str, str, int | None], Identity | None] = (
            BoundedCache(self.MAX_SUBJECTS, ttl=settings.lookup_cache_seconds)
        )

    def identity(self, request: Request, token: str) -> Identity | None:
        claims = self._verified(token)
        if claims is None:
            return None
        if claims.is_anonymous:
            return replace(ANONYMOUS, access=claims.access, mirror_group=claims.mirror_group)
        key = (claims.kind, claims.subject_id, claims.personal_access_token_id)
        subject = self._subjects.get(key)
        if subject is MISSING:
            subject, lifetime = subject_identity(request, *key)
            self._subjects.put(key, subject, lifetime=lifetime)
        if subject is None or subject.name != claims.name:  # type: ignore[union-attr]
            return None
        assert isinstance(subject, Identity)
        return Identity(
            account=subject.account,
            deploy_token=subject.deploy_token,
            # Bearer tokens only ever carry pull grants; they never administer anything.
            scopes=subject.scopes & {Scope.READ_REGISTRY.value},
            principals=subject.principals,
            access=claims.access,
            via="bearer",
            mirror_group=claims.mirror_group,
        )

    def signed_in(self, identity: Identity) -> None:
        """Forget what was remembered of whoever just signed in: the tokens they are about to
        use then see their memberships as they are now, not as they were."""
        if identity.account is not None:
            account = identity.account
            self._subjects.discard(("account", account.id, account.personal_access_token_id))
        elif identity.deploy_token is not None:
            self._subjects.discard(("deploy_token", str(identity.deploy_token.id), None))

    def _verified(self, token: str) -> BearerClaims | None:
        claims = self._claims.get(token)
        # Never past its expiry, remembered or not: then the full check decides again.
        if claims is MISSING or claims.expires <= time.time():  # type: ignore[union-attr]
            claims = bearer_claims(self.settings, token)
            if claims is None:
                return None
            self._claims.put(token, claims, lifetime=claims.expires - time.time())
        return claims  # type: ignore[return-value]


def sign_in(request: Request, username: str, password: str) -> Identity | None:
    """`authenticate_basic` within the sign-in limits; a failure counts against them.

    A refusal is left on the request for the token view to answer with a 429: raised here, it
    would escape pyramid_tm's tween (which asks who this is before the view) as a bare 500.
    """
    guard = sign_in_guard(request)
    try:
        guard.check(request, username)
        identity = authenticate_basic(request, username, password)
    except SignInRefused as refusal:
        request.environ[SIGN_IN_REFUSAL] = refusal
        return None
    guard.settle(request, succeeded=identity is not None)
    return identity


def sign_in_refusal(request: Request) -> SignInRefused | None:
    """Why the sign-in of `request.identity` did not check the credentials, if it did not."""
    return request.environ.get(SIGN_IN_REFUSAL)


def check_metrics_access(request: Request, settings: Settings) -> None:
    """Raise the registry error for a metrics request that `depproxy.metrics.*` refuses."""
    if settings.metrics_allow and not in_networks(
        client_address(request, settings.trusted_proxies), networks(settings.metrics_allow)
    ):
        raise RegistryError(403, "DENIED", "metrics are not available to this address")
    if settings.metrics_token is None:
        return
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    presented = value.strip().encode("latin-1", "replace")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        presented, settings.metrics_token.encode()
    ):
        raise RegistryError(
            401,
            "UNAUTHORIZED",
            "metrics need the header Authorization: Bearer <depproxy.metrics.token>",
            headers={"WWW-Authenticate": 'Bearer realm="depproxy-metrics"'},
        )


class SecurityPolicy:
    """The add-on's URLs: Basic credentials on the token endpoint, Bearer JWTs on `/v2`,
    personal access tokens on the JSON API (`api.auth`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.helper = ACLHelper()
        self.caller_cache = RequestLocalCache(self._load_caller)
        self.bearer_tokens = BearerTokens(settings)

    def _load_caller(self, request: Request) -> Identity | None:
        # Decided by path, not by route: pyramid_tm may ask who this is before routing.
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        path = request.environ.get("PATH_INFO", "")
        if path == TOKEN_PATH:
            if not header.strip():
                # Docker Hub's anonymous token: it lets clients ask for the repository and
                # read why they may not pull it. Wrong credentials are never taken for none.
                return ANONYMOUS
            credentials = parse_basic(header) if scheme.lower() == "basic" else None
            identity = sign_in(request, *credentials) if credentials else None
            if identity is not None:
                self.bearer_tokens.signed_in(identity)
            return identity
        if is_api_path(request):
            # Personal access tokens only; a Bearer here is one too, never a registry JWT.
            account = api_account(request)
            return account_identity(request, account, via="api") if account is not None else None
        if path.startswith("/v2") and scheme.lower() == "bearer" and value.strip():
            return self.bearer_tokens.identity(request, value.strip())
        return None

    def caller(self, request: Request) -> Identity | None:
        """Who is asking, the anonymous caller included; None: no valid credentials."""
        return self.caller_cache.get_or_create(request)

    def identity(self, request: Request) -> Identity | None:
        # The anonymous caller is nobody to the host's code, which reads `request.identity`.
        caller = self.caller(request)
        return None if caller is None or caller.is_anonymous else caller

    def authenticated_userid(self, request: Request) -> str | None:
        identity = self.identity(request)
        return identity.subject if identity is not None else None

    def effective_principals(self, request: Request) -> list[str]:
        caller = self.caller(request)
        if caller is None:
            return [Everyone]
        if caller.is_anonymous:
            return [Everyone, *caller.principals]
        return [Everyone, Authenticated, *caller.principals]

    def permits(self, request: Request, context: object, permission: str):
        identity = self.caller(request)
        if is_api_path(request) and (identity is None or Scope.API.value not in identity.scopes):
            return Denied("the API needs a personal access token with the api scope")
        if identity is not None:
            if permission == Permission.PULL and not (
                {Scope.READ_REGISTRY.value, Scope.API.value} & identity.scopes
            ):
                return Denied("the credential lacks the read_registry scope")
            if permission == Permission.ADMINISTER and Scope.API.value not in identity.scopes:
                return Denied("the credential lacks the api scope")
            repository = getattr(context, "repository", None)
            if (
                permission == Permission.PULL
                and repository is not None
                and not identity.may_pull_repository(repository)
            ):
                return Denied("the token does not grant pull on this repository")
        return self.helper.permits(context, self.effective_principals(request), permission)

    def remember(self, request: Request, userid: str, **kw) -> list:
        return []

    def forget(self, request: Request, **kw) -> list:
        return []


class IPagePolicy(Interface):
    """The policy of the add-on's HTML pages (`depproxy_pyramid.pages`): a security policy that
    also says which requests are its own."""

    def judges(request):
        """Whether `request` is for one of the pages (decided by path, as before routing)."""


class HostAndAddonPolicy:
    """The add-on's policy on the add-on's URLs, the pages' policy on the add-on's pages, the
    host's policy (or none) everywhere else.

    Attributes the host's own code reads from its policy are passed through to it.
    """

    def __init__(
        self, addon: SecurityPolicy, host: object | None, pages: object | None = None
    ) -> None:
        self.addon = addon
        self.host = host
        self.pages = pages

    def _policy(self, request: Request):
        if is_addon_path(request):
            return self.addon
        if self.pages is not None and self.pages.judges(request):
            return self.pages
        return self.host

    def identity(self, request: Request):
        policy = self._policy(request)
        return policy.identity(request) if policy is not None else None

    def authenticated_userid(self, request: Request):
        policy = self._policy(request)
        return policy.authenticated_userid(request) if policy is not None else None

    def permits(self, request: Request, context: object, permission: str):
        policy = self._policy(request)
        if policy is None:
            # What Pyramid itself answers for a host without a policy.
            return Allowed("No security policy in use.")
        return policy.permits(request, context, permission)

    def remember(self, request: Request, userid, **kw) -> list:
        policy = self._policy(request)
        return policy.remember(request, userid, **kw) if policy is not None else []

    def forget(self, request: Request, **kw) -> list:
        policy = self._policy(request)
        return policy.forget(request, **kw) if policy is not None else []

    def __getattr__(self, name: str):
        host = self.__dict__.get("host")
        if host is None:
            raise AttributeError(name)
        return getattr(host, name)


def caller(request: Request) -> Identity | None:
    """Who is asking on the add-on's URLs, the anonymous caller included (see `Identity`)."""
    return request.registry.getUtility(ISecurityPolicy).addon.caller(request)


def _compose(registry, addon: SecurityPolicy) -> None:
    host = registry.queryUtility(ISecurityPolicy)
    if isinstance(host, HostAndAddonPolicy):
        host = host.host
    pages = registry.queryUtility(IPagePolicy)
    registry.registerUtility(HostAndAddonPolicy(addon, host, pages), ISecurityPolicy)


def includeme(config: Configurator) -> None:
    addon = SecurityPolicy(config.registry["depproxy.settings"])
    config.registry.registerUtility(SignInGuard.from_settings(addon.settings), ISignInGuard)
    # Views capture the registered policy when they are configured (PHASE3); a host sets its
    # own in PHASE2, whether before or after the include. Composing in between means every
    # view, the add-on's and the host's, sees both.
    config.action(
        ("depproxy", "security policy"),
        lambda: _compose(config.registry, addon),
        order=PHASE2_CONFIG + 1,
    )

    def recompose(event: ApplicationCreated) -> None:
        # A host that set its policy in a later commit replaced the composed one.
        policy = event.app.registry.queryUtility(ISecurityPolicy)
        if not isinstance(policy, HostAndAddonPolicy):
            _compose(event.app.registry, addon)

    config.add_subscriber(recompose, ApplicationCreated)
