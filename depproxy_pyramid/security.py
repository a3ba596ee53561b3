"""Who is asking: HTTP Basic on the token endpoint, Bearer JWTs on the registry API."""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import jwt
from pyramid.authorization import ACLHelper, Authenticated, Everyone
from pyramid.request import Request, RequestLocalCache
from pyramid.security import Denied
from sqlalchemy import select
from sqlalchemy.orm import Session

from .credentials import RecentlyVerified, burn_password_check, token_digest
from .models import DeployToken, Membership, PersonalAccessToken, Role, Scope, User
from .permissions import INSTANCE_ADMIN, Permission, deploy_token_principal, member_principal
from .settings import Settings

JWT_ISSUER = "depproxy-pyramid"
JWT_AUDIENCE = "dependency_proxy"
MAX_BASIC_HEADER = 4096
TOKEN_ROUTE = "depproxy.jwt_auth"

_recently_verified = RecentlyVerified()


@dataclass(frozen=True)
class Identity:
    """An authenticated user or deploy token, and what its credential may be used for."""

    user: User | None
    deploy_token: DeployToken | None
    scopes: frozenset[str]
    principals: tuple[str, ...]
    # The repositories a bearer token grants; None when the caller did not present one.
    access: frozenset[tuple[str, str]] | None = None
    via: str = field(default="password")

    @property
    def name(self) -> str:
        if self.user is not None:
            return self.user.username
        assert self.deploy_token is not None
        return self.deploy_token.username

    @property
    def subject(self) -> str:
        if self.user is not None:
            return f"user:{self.user.id}"
        assert self.deploy_token is not None
        return f"deploy_token:{self.deploy_token.id}"

    def may_pull_repository(self, repository_name: str) -> bool:
        return self.access is None or (repository_name, "pull") in self.access


def _is_live(expires_at: datetime | None, revoked: bool) -> bool:
    return not revoked and (expires_at is None or expires_at > datetime.now(UTC))


def _user_principals(dbsession: Session, user: User) -> list[str]:
    principals = [f"user:{user.id}"]
    if user.is_admin:
        principals.append(INSTANCE_ADMIN)
    for group_id, role in dbsession.execute(
        select(Membership.group_id, Membership.role).where(Membership.user_id == user.id)
    ):
        principals.extend(member_principal(group_id, r) for r in Role if r <= role)
    return principals


def user_identity(dbsession: Session, user: User, scopes: frozenset[str], via: str) -> Identity:
    return Identity(
        user=user,
        deploy_token=None,
        scopes=scopes,
        principals=tuple(_user_principals(dbsession, user)),
        via=via,
    )


def deploy_token_identity(token: DeployToken) -> Identity:
    scopes = token.scope_set
    principals = (
        (f"deploy_token:{token.id}", deploy_token_principal(token.group_id))
        if Scope.READ_REGISTRY in scopes
        else (f"deploy_token:{token.id}",)
    )
    return Identity(
        user=None, deploy_token=token, scopes=scopes, principals=principals, via="deploy_token"
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


def authenticate_basic(dbsession: Session, username: str, password: str) -> Identity | None:
    """A password, a personal access token or a deploy token; None when none of them match."""
    deploy_token = dbsession.scalar(select(DeployToken).where(DeployToken.username == username))
    if deploy_token is not None:
        if secrets.compare_digest(deploy_token.token_digest, token_digest(password)) and _is_live(
            deploy_token.expires_at, deploy_token.revoked
        ):
            return deploy_token_identity(deploy_token)
        return None

    user = dbsession.scalar(select(User).where(User.username == username))
    if user is None:
        burn_password_check(password)
        return None
    if not user.is_active:
        return None
    pat = dbsession.scalar(
        select(PersonalAccessToken).where(
            PersonalAccessToken.token_digest == token_digest(password),
            PersonalAccessToken.user_id == user.id,
        )
    )
    if pat is not None:
        if not _is_live(pat.expires_at, pat.revoked):
            return None
        pat.last_used_at = datetime.now(UTC)
        return user_identity(dbsession, user, pat.scope_set, via="personal_access_token")
    if _recently_verified.verify(password, user.password_hash):
        return user_identity(dbsession, user, frozenset(Scope), via="password")
    return None


def issue_jwt(
    settings: Settings, identity: Identity, access: list[dict]
) -> tuple[str, int, datetime]:
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


def bearer_identity(dbsession: Session, settings: Settings, token: str) -> Identity | None:
    claims = decode_jwt(settings, token)
    if claims is None:
        return None
    access = _granted(claims)
    kind, _, raw_id = str(claims["sub"]).partition(":")
    if access is None or not raw_id.isdigit():
        return None
    # Bearer tokens only ever carry pull grants; they never administer anything.
    scopes = frozenset({Scope.READ_REGISTRY.value})
    if kind == "user":
        user = dbsession.get(User, int(raw_id))
        if user is None or not user.is_active:
            return None
        identity = user_identity(dbsession, user, scopes, via="bearer")
    elif kind == "deploy_token":
        deploy_token = dbsession.get(DeployToken, int(raw_id))
        if deploy_token is None or not _is_live(deploy_token.expires_at, deploy_token.revoked):
            return None
        identity = deploy_token_identity(deploy_token)
    else:
        return None
    return Identity(
        user=identity.user,
        deploy_token=identity.deploy_token,
        scopes=identity.scopes & scopes,
        principals=identity.principals,
        access=access,
        via="bearer",
    )


class SecurityPolicy:
    """Basic credentials on the token endpoint, Bearer JWTs everywhere else."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.helper = ACLHelper()
        self.identity_cache = RequestLocalCache(self._load_identity)

    def _load_identity(self, request: Request) -> Identity | None:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        route = request.matched_route
        on_token_endpoint = route is not None and route.name == TOKEN_ROUTE
        if on_token_endpoint and scheme.lower() == "basic":
            credentials = parse_basic(header)
            if credentials is not None:
                return authenticate_basic(request.dbsession, *credentials)
        elif not on_token_endpoint and scheme.lower() == "bearer" and value.strip():
            return bearer_identity(request.dbsession, self.settings, value.strip())
        return None

    def identity(self, request: Request) -> Identity | None:
        return self.identity_cache.get_or_create(request)

    def authenticated_userid(self, request: Request) -> str | None:
        identity = self.identity(request)
        return identity.subject if identity is not None else None

    def effective_principals(self, request: Request) -> list[str]:
        identity = self.identity(request)
        if identity is None:
            return [Everyone]
        return [Everyone, Authenticated, *identity.principals]

    def permits(self, request: Request, context: object, permission: str):
        identity = self.identity(request)
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
                and not identity.may_pull_repository(repository.name)
            ):
                return Denied("the token does not grant pull on this repository")
        return self.helper.permits(context, self.effective_principals(request), permission)

    def remember(self, request: Request, userid: str, **kw) -> list:
        return []

    def forget(self, request: Request, **kw) -> list:
        return []
