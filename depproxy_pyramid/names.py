"""The grammar of what clients name: group paths, image names, references and repositories."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import name_invalid

PROXY_MARKER = "dependency_proxy/containers"
MAX_GROUP_DEPTH = 20
MAX_GROUP_PATH = 255
MAX_IMAGE_SEGMENTS = 5
MAX_REPOSITORY_NAME = 255

# Lower case only: Docker refuses upper-case repository names before it sends anything.
GROUP_SEGMENT_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,253}[a-z0-9_])?$")
RESERVED_GROUP_SEGMENTS = frozenset({"dependency_proxy", "v2", "jwt", "api"})
# The OCI distribution spec's path component grammar.
IMAGE_SEGMENT_RE = re.compile(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


def group_path_problem(path: str) -> str | None:
    """Why `path` is not a valid group path, or None when it is."""
    if not path or len(path) > MAX_GROUP_PATH:
        return f"a group path has 1 to {MAX_GROUP_PATH} characters"
    segments = path.split("/")
    if len(segments) > MAX_GROUP_DEPTH:
        return f"groups nest at most {MAX_GROUP_DEPTH} deep"
    for segment in segments:
        if not GROUP_SEGMENT_RE.match(segment):
            return (
                f"{segment!r} is not a group name: lower-case letters, digits, '_', '-', '.', "
                "starting with a letter or digit"
            )
        if segment in RESERVED_GROUP_SEGMENTS:
            return f"{segment!r} is reserved"
    return None


def image_problem(image: str) -> str | None:
    segments = image.split("/")
    if not image or len(segments) > MAX_IMAGE_SEGMENTS:
        return f"an image name has 1 to {MAX_IMAGE_SEGMENTS} path segments"
    for segment in segments:
        if not IMAGE_SEGMENT_RE.match(segment):
            return f"{segment!r} is not a valid image name segment"
    return None


def is_digest(reference: str) -> bool:
    return DIGEST_RE.fullmatch(reference) is not None


def is_tag(reference: str) -> bool:
    return TAG_RE.fullmatch(reference) is not None


@dataclass(frozen=True)
class Repository:
    """A proxied image: the group it is pulled through and the image's name upstream.

    Clients name it `<group>/dependency_proxy/containers/<image>`, or, in the mirror group,
    by the image name alone (`mirror_name`).
    """

    group_path: str
    image: str
    mirror_name: str | None = None

    @property
    def name(self) -> str:
        """The repository name as clients use it, in token scopes and URLs."""
        if self.mirror_name is not None:
            return self.mirror_name
        return f"{self.group_path}/{PROXY_MARKER}/{self.image}"


def parse_repository(name: str, mirror_group: str | None = None) -> Repository:
    """Split a repository name; raise NAME_INVALID with the reason when it is not one of ours.

    A name without the marker is an image of `mirror_group`, when there is one.
    """
    if len(name) > MAX_REPOSITORY_NAME + len(PROXY_MARKER):
        raise name_invalid("repository name is too long")
    group_path, marker, image = name.partition(f"/{PROXY_MARKER}/")
    if not marker and mirror_group is not None:
        problem = image_problem(name)
        if problem:
            raise name_invalid(problem, {"name": name[:300]})
        return Repository(mirror_group, name, mirror_name=name)
    if not marker:
        raise name_invalid(
            f"repository names have the form <group>/{PROXY_MARKER}/<image>",
            {"name": name[:300]},
        )
    problem = group_path_problem(group_path) or image_problem(image)
    if problem:
        raise name_invalid(problem, {"name": name[:300]})
    return Repository(group_path, image)
