"""Blobs as objects in an S3-compatible bucket (AWS, MinIO, ...), through one boto3 client.

Settings, all under `depproxy.storage.s3.`: `bucket` (required), `prefix`, `endpoint_url`,
`region`, `access_key_id` with `secret_access_key` (else boto3's default credential chain), and
`redirect` (default false: whether `url_for` hands out presigned GET URLs).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, cast
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError

from depproxy_pyramid.storage import (
    BlobNotFound,
    ConfigurationError,
    StoredObject,
    validate_key,
    validate_range,
)

_SETTING = "depproxy.storage.s3."
_MIB = 1024 * 1024
# Larger files go up in parts, which S3 shows only once the upload completes (s3transfer aborts
# it on failure). Parts and threads are capped so one big blob cannot take a worker's memory or
# connections. "classic" keeps transfers on our client: the CRT manager would build its own.
_TRANSFER = TransferConfig(
    multipart_threshold=8 * _MIB,
    multipart_chunksize=8 * _MIB,
    max_concurrency=4,
    preferred_transfer_client="classic",
)
# An upload holds at most one part in memory. S3 takes parts of 5 MiB and more (the last one
# excepted) and at most 10,000 of them: 8 MiB parts carry blobs up to 78 GiB.
UPLOAD_PART_SIZE = 8 * _MIB
# Each open blob holds a pooled connection until the reader closes it, so allow well beyond the
# default 10 for a threaded server streaming several blobs while uploading others.
_MAX_CONNECTIONS = 50
_MAX_URL_SECONDS = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live
_BUCKET_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")  # what botocore itself accepts
_ABSENT_CODES = {"404", "NoSuchKey", "NotFound"}


class S3Storage:
    """Blobs under `<prefix>/<key>` in one bucket."""

    def __init__(
        self, client: BaseClient, bucket: str, *, prefix: str = "", redirect: bool = False
    ) -> None:
        # boto3 clients are thread-safe, unlike sessions and resources: this one is shared by
        # every request thread.
        self._client = client
        self._bucket = bucket
        self._prefix = prefix
        self._redirect = redirect
        self.spool_dir = _private_spool_dir()
        self.location = f"s3://{bucket}/{prefix} at {_endpoint(client)}"

    @classmethod
    def from_settings(cls, settings: Mapping[str, str]) -> S3Storage:
        bucket = _text(settings, "bucket")
        if not bucket:
            raise ConfigurationError(_SETTING + "bucket", "is required")
        if not _BUCKET_RE.fullmatch(bucket):
            raise ConfigurationError(_SETTING + "bucket", f"{bucket!r} is not a bucket name")
        prefix = _text(settings, "prefix").strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except ValueError:
                raise ConfigurationError(
                    _SETTING + "prefix", f"{prefix!r} is not a valid key prefix"
                ) from None
        endpoint_url = _text(settings, "endpoint_url") or None
        if endpoint_url:
            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigurationError(
                    _SETTING + "endpoint_url", f"expected an http(s) URL, got {endpoint_url!r}"
                )
        access_key_id = _text(settings, "access_key_id") or None
        secret_access_key = _text(settings, "secret_access_key") or None
        if bool(access_key_id) != bool(secret_access_key):
            missing = "secret_access_key" if access_key_id else "access_key_id"
            raise ConfigurationError(
                _SETTING + missing, "access_key_id and secret_access_key must be set together"
            )
        redirect = _flag(settings, "redirect")
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=_text(settings, "region") or None,
        )
        config = Config(
            signature_version="s3v4",
            # Self-hosted endpoints (MinIO, moto) seldom have a DNS name per bucket.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            max_pool_connections=_MAX_CONNECTIONS,
        )
        client = session.client("s3", endpoint_url=endpoint_url, config=config)
        return cls(client, bucket, prefix=prefix, redirect=redirect)

    def open(self, key: str) -> BinaryIO:
        return self._get(key)

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        validate_range(start, end)
        return self._get(key, Range=f"bytes={start}-{end}")

    def size(self, key: str) -> int | None:
        try:
            response = self._client.head_object(Bucket=self._bucket, Key=self._object_key(key))
        except ClientError as exc:
            if _error_code(exc) in _ABSENT_CODES:
                return None
            raise
        return int(response["ContentLength"])

    def begin_upload(self, key: str) -> MultipartUpload:
        return MultipartUpload(self._client, self._bucket, self._object_key(key))

    def put_file(self, key: str, path: str) -> None:
        try:
            self._client.upload_file(path, self._bucket, self._object_key(key), Config=_TRANSFER)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self._bucket, Key=self._object_key(key))

    def objects(self) -> Iterator[StoredObject]:
        start = f"{self._prefix}/" if self._prefix else ""
        pages = self._client.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=start
        )
        for page in pages:
            for item in page.get("Contents", []):
                key = item["Key"][len(start) :]
                try:
                    validate_key(key)
                except ValueError:
                    continue
                yield StoredObject(key, item["LastModified"])

    def url_for(self, key: str, *, expires_in: int = 300) -> str | None:
        object_key = self._object_key(key)
        if not 0 < expires_in <= _MAX_URL_SECONDS:
            raise ValueError(f"expires_in must be 1..{_MAX_URL_SECONDS} seconds, got {expires_in}")
        if not self._redirect:
            return None
        return self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self._bucket, "Key": object_key},
            ExpiresIn=expires_in,
        )

    def local_path(self, key: str) -> str | None:
        validate_key(key)
        return None

    def _object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _get(self, key: str, **extra: Any) -> BinaryIO:
        try:
            response = self._client.get_object(
                Bucket=self._bucket, Key=self._object_key(key), **extra
            )
        except ClientError as exc:
            code = _error_code(exc)
            if code == "NoSuchKey":
                raise BlobNotFound(key) from None
            if code == "InvalidRange":
                raise ValueError(f"range {extra.get('Range')} is outside {key!r}") from None
            raise
        # botocore's StreamingBody: read(n) pulls at most n bytes off the socket, and close()
        # releases the connection.
        return cast(BinaryIO, response["Body"])


class MultipartUpload:
    """A blob sent in parts of `UPLOAD_PART_SIZE` as it is written, with no local file.

    The multipart upload is created when the first part is full; a blob smaller than a part
    goes up in one PUT at commit. S3 shows nothing under the key until the upload completes.
    """

    local_path = None

    def __init__(self, client: BaseClient, bucket: str, object_key: str) -> None:
        self._client = client
        self._bucket = bucket
        self._object_key = object_key
        self._part = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._open = True

    def write(self, data: bytes) -> None:
        if not self._open:
            raise ValueError("the upload is already committed or aborted")
        try:
            view = memoryview(data)
            while view:
                room = UPLOAD_PART_SIZE - len(self._part)
                self._part += view[:room]
                view = view[room:]
                if len(self._part) == UPLOAD_PART_SIZE:
                    self._send_part()
        except BaseException:
            self._abort_after_failure()
            raise

    def commit(self) -> None:
        if not self._open:
            raise ValueError("the upload is already committed or aborted")
        try:
            if self._upload_id is None:
                self._client.put_object(Bucket=self._bucket, Key=self._object_key, Body=self._part)
            else:
                if self._part:
                    self._send_part()
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._object_key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        except BaseException:
            self._abort_after_failure()
            raise
        self._open = False
        self._upload_id = None
        self._part = bytearray()

    def abort(self) -> None:
        self._open = False
        self._part = bytearray()
        if self._upload_id is not None:
            # Until aborted, S3 keeps (and bills) the parts sent so far. Cleared only once
            # aborted, so that a failed abort can be tried again.
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._object_key, UploadId=self._upload_id
            )
            self._upload_id = None

    def _abort_after_failure(self) -> None:
        # The caller is told of the first failure; should the abort fail too, the upload id is
        # kept and the caller's own abort() tries again.
        with contextlib.suppress(Exception):
            self.abort()

    def _abort_abandoned(self) -> None:
        """Abort the key's other pending uploads: a fill uploads only while it holds the blob's
        lease (`services.leases`), so any other was left by a fill whose process died or lost
        the lease, and would otherwise keep its parts until the bucket's lifecycle rule."""
        pending = self._client.list_multipart_uploads(Bucket=self._bucket, Prefix=self._object_key)
        for upload in pending.get("Uploads", []):
            if upload["Key"] == self._object_key:
                with contextlib.suppress(ClientError):
                    self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=self._object_key, UploadId=upload["UploadId"]
                    )

    def _send_part(self) -> None:
        if self._upload_id is None:
            self._abort_abandoned()
            created = self._client.create_multipart_upload(
                Bucket=self._bucket, Key=self._object_key
            )
            self._upload_id = created["UploadId"]
        number = len(self._parts) + 1
        sent = self._client.upload_part(
            Bucket=self._bucket,
            Key=self._object_key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=self._part,
        )
        self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})
        # A new buffer rather than cleared: botocore may still hold the sent one for a retry.
        self._part = bytearray()


def _text(settings: Mapping[str, str], name: str) -> str:
    return str(settings.get(_SETTING + name) or "").strip()


def _flag(settings: Mapping[str, str], name: str) -> bool:
    value = _text(settings, name)
    if value.lower() in ("", "false", "no", "off", "0"):
        return False
    if value.lower() in ("true", "yes", "on", "1"):
        return True
    raise ConfigurationError(_SETTING + name, f"expected a boolean, got {value!r}")


def _endpoint(client: BaseClient) -> str:
    """The client's endpoint without any credentials written into its URL."""
    parts = urlsplit(client.meta.endpoint_url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _private_spool_dir() -> str:
    path = os.path.join(tempfile.gettempdir(), "depproxy-spool")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    # The temporary directory is shared with other users, and blobs from authenticated upstreams
    # pass through the spool: refuse one that another user planted or could swap for a symlink.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory owned by uid {os.getuid()}")
    os.chmod(path, 0o700)
    return path
