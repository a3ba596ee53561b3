"""Generate OCI image layouts on disk, in pure Python, for seeding a test registry.

A layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``) is what
``skopeo copy oci:DIR:TAG docker://...`` reads, so tests get real images without
network access or a container engine. Every builder takes a ``marker`` (or ``seed``)
so that two calls produce different digests, which is how tests simulate a tag
being moved upstream.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MIB = 1 << 20
# Fixed timestamp so that identical inputs give identical digests.
EPOCH = "2024-01-01T00:00:00Z"
EPOCH_SECONDS = 1704067200


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a manifest or index says about a blob."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        """Return the descriptor as it appears in manifests and index.json."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """A single-platform image written into a layout (``tag`` is "" inside an index)."""

    layout: Path
    tag: str
    manifest: Descriptor
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def oci_ref(self) -> str:
        """The ``oci:DIR:TAG`` reference that skopeo reads this image from."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def blob_digests(self) -> frozenset[str]:
        """Config and layer digests: the blobs a full pull has to fetch."""
        return frozenset([self.config.digest, *(layer.digest for layer in self.layers)])


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform image (OCI image index) written into a layout."""

    layout: Path
    tag: str
    index: Descriptor
    images: tuple[Image, ...]

    @property
    def oci_ref(self) -> str:
        """The ``oci:DIR:TAG`` reference that skopeo reads this index from."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def blob_digests(self) -> frozenset[str]:
        """Config and layer digests of every platform."""
        return frozenset().union(*(image.blob_digests for image in self.images))


class Layout:
    """Writer for one OCI layout directory; several tags may share one layout."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._blobs = self.path / "blobs" / "sha256"
        self._blobs.mkdir(parents=True, exist_ok=True)
        (self.path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        if not (self.path / "index.json").exists():
            self._write_index([])

    def add_blob(self, data: bytes, media_type: str) -> Descriptor:
        """Store a small blob that fits in memory."""
        return self.add_blob_stream([data], media_type)

    def add_json(self, document: Mapping[str, Any], media_type: str) -> Descriptor:
        """Store a JSON document (manifest, index or config) as a blob."""
        return self.add_blob(json.dumps(document, sort_keys=True).encode(), media_type)

    def add_blob_stream(self, chunks: Iterable[bytes], media_type: str) -> Descriptor:
        """Store a blob from chunks, hashing while writing so memory stays bounded."""
        hasher = hashlib.sha256()
        size = 0
        fd, tmp = tempfile.mkstemp(prefix=".partial-", dir=self._blobs)
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
        os.replace(tmp, self._blobs / hasher.hexdigest())
        return Descriptor(media_type, f"sha256:{hasher.hexdigest()}", size)

    def tag(self, descriptor: Descriptor, tag: str) -> None:
        """Point ``tag`` at a manifest or index in index.json (replacing an older one)."""
        entries = [
            entry
            for entry in json.loads((self.path / "index.json").read_text())["manifests"]
            if entry.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
        ]
        entries.append({**descriptor.to_json(), "annotations": {REF_NAME_ANNOTATION: tag}})
        self._write_index(entries)

    def _write_index(self, entries: list[dict[str, Any]]) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        (self.path / "index.json").write_text(json.dumps(index, indent=2))


def _tar_bytes(files: Mapping[str, bytes]) -> bytes:
    """Build a small, reproducible tar archive from path -> content."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size = len(content)
            info.mtime = EPOCH_SECONDS
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _config(layers_diff_ids: list[str], marker: str, arch: str, os_name: str) -> dict[str, Any]:
    return {
        "created": EPOCH,
        "architecture": arch,
        "os": os_name,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"depproxy.test.marker": marker},
        },
        "rootfs": {"type": "layers", "diff_ids": layers_diff_ids},
        "history": [
            {"created": EPOCH, "created_by": f"depproxy test layer {i}"}
            for i in range(len(layers_diff_ids))
        ],
    }


def _write_manifest(
    layout: Layout,
    tag: str | None,
    layers: list[Descriptor],
    diff_ids: list[str],
    marker: str,
    arch: str,
    os_name: str,
) -> Image:
    config = layout.add_json(_config(diff_ids, marker, arch, os_name), OCI_CONFIG)
    manifest = layout.add_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.to_json() for layer in layers],
        },
        OCI_MANIFEST,
    )
    if tag is not None:
        layout.tag(manifest, tag)
    return Image(layout.path, tag or "", manifest, config, tuple(layers))


def _layer_tar(marker: str, index: int, os_name: str, arch: str) -> bytes:
    """A few small files whose content (hence digest) depends on every argument."""
    blob = hashlib.sha512(f"{marker}/{os_name}/{arch}/{index}".encode()).digest() * 64
    return _tar_bytes(
        {
            f"etc/depproxy/layer{index}.txt": f"{marker} {os_name}/{arch} #{index}\n".encode(),
            "etc/depproxy/marker": marker.encode(),
            f"usr/share/depproxy/data{index}.bin": blob,
        }
    )


def _platform_image(
    layout: Layout,
    tag: str | None,
    marker: str,
    layer_count: int,
    arch: str,
    os_name: str,
    base: str | None = None,
) -> Image:
    layers: list[Descriptor] = []
    diff_ids: list[str] = []
    for i in range(layer_count):
        tar = _layer_tar(base if i == 0 and base is not None else marker, i, os_name, arch)
        diff_ids.append(f"sha256:{hashlib.sha256(tar).hexdigest()}")
        layers.append(layout.add_blob(gzip.compress(tar, mtime=0), OCI_LAYER_GZIP))
    return _write_manifest(layout, tag, layers, diff_ids, marker, arch, os_name)


def write_image(
    path: Path,
    tag: str = "latest",
    marker: str = "default",
    layer_count: int = 2,
    base: str | None = None,
    arch: str = "amd64",
    os_name: str = "linux",
) -> Image:
    """Write a single-platform image with gzip'd layers; ``marker`` changes every digest.

    With ``base``, the first layer depends on ``base`` instead of ``marker``, so images
    written with the same base share that blob, like images built on one base image.
    """
    return _platform_image(Layout(path), tag, marker, layer_count, arch, os_name, base)


def write_index(
    path: Path,
    tag: str = "latest",
    marker: str = "default",
    platforms: Iterable[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
) -> ImageIndex:
    """Write an OCI image index with one manifest+config+layer per ``(os, arch)``."""
    layout = Layout(path)
    platforms = tuple(platforms)
    images = tuple(
        _platform_image(layout, None, marker, 1, arch, os_name) for os_name, arch in platforms
    )
    entries = [
        {**image.manifest.to_json(), "platform": {"os": os_name, "architecture": arch}}
        for image, (os_name, arch) in zip(images, platforms, strict=True)
    ]
    index = layout.add_json(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX
    )
    layout.tag(index, tag)
    return ImageIndex(layout.path, tag, index, images)


def _big_tar_chunks(size: int, seed: int) -> Iterator[bytes]:
    """Yield a tar holding one file of ``size`` pseudo-random bytes, 1 MiB at a time."""
    info = tarfile.TarInfo("data/big.bin")
    info.size = size
    info.mtime = EPOCH_SECONDS
    info.mode = 0o644
    yield info.tobuf(format=tarfile.PAX_FORMAT)
    rng = random.Random(seed)  # not crypto: only needs to be fast and incompressible
    remaining = size
    while remaining:
        n = min(MIB, remaining)
        yield rng.randbytes(n)
        remaining -= n
    yield b"\0" * ((-size) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)


def write_big_image(path: Path, tag: str = "latest", size_mb: int = 200, seed: int = 0) -> Image:
    """Write an image whose single uncompressed layer is ``size_mb`` MiB, streamed to disk.

    The layer uses the uncompressed OCI media type so no time goes into gzip, and
    it is hashed while written so memory use does not grow with its size.
    """
    layout = Layout(path)
    layer = layout.add_blob_stream(_big_tar_chunks(size_mb * MIB, seed), OCI_LAYER_TAR)
    return _write_manifest(layout, tag, [layer], [layer.digest], f"big-{seed}", "amd64", "linux")


def write_layered_image(
    path: Path, tag: str, layer_sizes_mb: Iterable[int], seed: int = 0
) -> Image:
    """Write an image with one uncompressed layer of pseudo-random bytes per size given.

    For tests where several MiB-sized blobs are fetched at once; ``seed`` changes every digest.
    """
    layout = Layout(path)
    layers = [
        layout.add_blob_stream(_big_tar_chunks(size_mb * MIB, seed * 1000 + i), OCI_LAYER_TAR)
        for i, size_mb in enumerate(layer_sizes_mb)
    ]
    diff_ids = [layer.digest for layer in layers]
    return _write_manifest(layout, tag, layers, diff_ids, f"layered-{seed}", "amd64", "linux")


OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"


def artifact_manifest(subject: Descriptor, artifact_type: str, layer: Descriptor) -> bytes:
    """An OCI 1.1 artifact about ``subject``: an image manifest with an ``artifactType``, the
    empty config and one layer."""
    empty = Descriptor(OCI_EMPTY, f"sha256:{hashlib.sha256(EMPTY_JSON).hexdigest()}", 2)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": empty.to_json(),
        "layers": [layer.to_json()],
        "subject": subject.to_json(),
    }
    return json.dumps(manifest, sort_keys=True).encode()


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject: ``sha256-<hex>``."""
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}-{hex_digest[:64]}"


def with_referrer(index: bytes | None, referrer: Mapping[str, Any]) -> bytes:
    """The referrers tag's index with ``referrer`` added, as an OCI 1.1 client updates it on
    a registry without the referrers API (a fresh index when there is none yet)."""
    manifests = json.loads(index)["manifests"] if index is not None else []
    manifests = [m for m in manifests if m["digest"] != referrer["digest"]] + [dict(referrer)]
    document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    return json.dumps(document, sort_keys=True).encode()
