"""The S3 backend: AWS S3, MinIO, Ceph, or SeaweedFS here, behind the same interface as the local store.

boto3 is the client (the reference SDK, and what the NCCID data-access guide's examples use): credentials and
endpoint come the standard AWS way (environment, shared profiles, `AWS_ENDPOINT_URL`), requests are retried
with backoff, listings are paginated and streamed, a header is read with ranged GETs of only the bytes pydicom
asks for, no-overwrite writes use `If-None-Match: *`, and copies stay on the server.

The loader's hot requests (a ranged GET per header, a create-only PUT of its metadata, a create-only server-side
COPY per image) go out as SigV4-signed requests through urllib3, which costs about half the client CPU of a
botocore call (endpoint rules, event hooks and response parsing are most of a call's cost, and on a 2-core
machine the client's CPU is taken from the server's). Any answer but the expected ones is asked again through
botocore, for its retries and its error codes; the requests and their meaning are the same either way.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import threading
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import BinaryIO
from urllib.parse import quote, urlparse

import boto3
import urllib3
from boto3.s3.transfer import TransferConfig
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from nccid.store.base import (
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StoreError,
    StoreMissing,
    check_key,
    check_prefix,
)

ATTEMPTS = 8  # botocore's tries of a request that fails (standard retry mode, backing off up to 20 s)
BLOCK = 16 * 1024  # ranged-read granularity: one GET covers most DICOM headers
MULTIPART = 64 * 1024 * 1024
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_EXISTS = {"412", "PreconditionFailed", "ConditionalRequestConflict"}
_COPY_ETAG = re.compile(rb"<CopyObjectResult\b.*?<ETag>\s*(?:&quot;|\")?([0-9A-Za-z-]+)", re.S)
#: one store (so one boto3 client and one connection pool) per process for each settings, however many tasks
#: a worker process unpickles it for: a client costs ~0.1 s of CPU and new connections to build
_SHARED: dict[tuple, S3Store] = {}
_SHARED_LOCK = threading.Lock()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _info(key: str, size: int, etag: str, when) -> ObjectInfo:
    return ObjectInfo(key=key, size=int(size), checksum=etag.strip('"'), mtime=when.timestamp())


class RangedReader(io.RawIOBase):
    """A seekable reader over one object that fetches only the byte ranges that are read."""

    def __init__(self, store: S3Store, key: str, size: int) -> None:
        self.store, self.key, self.size = store, key, size
        self.name = f"{store.url}{key}"  # pydicom names the file in its messages
        self.pos = 0
        self.bytes_fetched = 0
        self.requests = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        """Fill `buffer` from the current position with one ranged GET; returns the bytes read (0 at the end)."""
        if self.pos >= self.size:
            return 0
        want = min(len(buffer), self.size - self.pos)
        data = self.store.read_range(self.key, self.pos, want)
        self.requests += 1
        self.bytes_fetched += len(data)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


class S3Store(ObjectStore):
    """Objects in one bucket, optionally below a key prefix (`s3://bucket/prefix`)."""

    def __init__(
        self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, profile: str | None = None
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.profile = profile
        self.url = f"s3://{bucket}/{self.prefix}"
        self.remote = True
        self._lock = threading.Lock()
        self._client = self._closing = None
        self._pid = 0
        self._pool: urllib3.PoolManager | None = None
        self._base_url: str | None = None
        self._pool_pid = 0

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        parsed = urlparse(url)
        if not parsed.netloc:
            raise StoreError(f"{url}: an S3 URL names a bucket, e.g. s3://nccid-data-warehouse-prod")
        return cls(parsed.netloc, parsed.path)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint_url!r})"

    def __reduce__(self) -> tuple:
        """Worker processes rebuild their own client: boto3 clients do not cross a fork."""
        return (_rebuild, (self.bucket, self.prefix, self.endpoint_url, self.profile))

    # -- the client ------------------------------------------------------------------------------------
    @property
    def client(self):
        """One client per process (boto3 clients are thread-safe; they do not survive a fork)."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    session = boto3.session.Session(profile_name=self.profile)
                    config = Config(
                        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                        max_pool_connections=64,
                        s3={"addressing_style": "path"} if self.endpoint_url else {},
                        tcp_keepalive=True,
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required",
                    )
                    self._closing = None
                    self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
                    self._pid = os.getpid()
        return self._client

    def _credentials(self):
        """The client's current credentials (refreshed by botocore where they expire), for signing by hand."""
        return self.client._request_signer._credentials.get_frozen_credentials()

    def _closing_client(self):
        """A client whose requests close their connection: SeaweedFS leaves a kept-alive connection stalled
        after a zero-length PUT (the next request on it waits for the read timeout), so empty objects go
        through connections that are not reused."""
        main = self.client
        if self._closing is None:
            client = boto3.session.Session(profile_name=self.profile).client(
                "s3", endpoint_url=self.endpoint_url, config=main.meta.config
            )

            def close_after(request, **_: object) -> None:
                request.headers["Connection"] = "close"

            client.meta.events.register("before-send.s3", close_after)
            self._closing = client
        return self._closing

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _strip(self, key: str) -> str:
        return key[len(self.prefix) :]

    def _fail(self, exc: ClientError, key: str) -> StoreError:
        code = _code(exc)
        if code in _NOT_FOUND:
            return ObjectNotFound(f"no object {key!r} in {self.url}")
        if code in _EXISTS:
            return ObjectExists(f"object {key!r} already exists in {self.url}")
        return StoreError(f"{self.url}{key}: {code or 'error'}: {exc}")

    # -- listing ---------------------------------------------------------------------------------------
    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[dict]:
        check_prefix(prefix)
        params = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if delimiter:
            params["Delimiter"] = delimiter
        try:
            yield from self.client.get_paginator("list_objects_v2").paginate(**params)
        except ClientError as exc:
            raise self._fail(exc, prefix) from exc
        except BotoCoreError as exc:  # connection trouble after botocore's retries: an error, never an empty listing
            raise StoreError(f"{self.url}{prefix}: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for page in self._pages(prefix, None):
            for obj in page.get("Contents", []):
                yield _info(self._strip(obj["Key"]), obj["Size"], obj["ETag"], obj["LastModified"])

    def list_level(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for page in self._pages(prefix, "/"):
            for obj in page.get("Contents", []):
                yield _info(self._strip(obj["Key"]), obj["Size"], obj["ETag"], obj["LastModified"])

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Sorted here because not every server returns common prefixes in byte order (SeaweedFS does not)."""
        return sorted(
            self._strip(p["Prefix"]) for page in self._pages(prefix, "/") for p in page.get("CommonPrefixes", [])
        )

    # -- reading ---------------------------------------------------------------------------------------
    def stat(self, key: str) -> ObjectInfo | None:
        """HeadObject (through urllib3; through botocore for any answer but 200 or 404)."""
        reply = self._lean("HEAD", self._key(key), {})
        if reply is not None:
            status, headers, _ = reply
            if status == 404:
                return None
            if status == 200 and "ETag" in headers and "Content-Length" in headers:
                when = headers.get("Last-Modified")
                mtime = parsedate_to_datetime(when).timestamp() if when else time.time()
                return ObjectInfo(key, int(headers["Content-Length"]), headers["ETag"].strip('"'), mtime)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise self._fail(exc, key) from exc
        return _info(key, head["ContentLength"], head["ETag"], head["LastModified"])

    def read(self, key: str) -> bytes:
        """The whole object in one GET (through urllib3; through botocore for any answer but 200)."""
        reply = self._lean("GET", self._key(key), {})
        if reply is not None and reply[0] == 200:
            return reply[2]
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            raise self._fail(exc, key) from exc

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """One ranged GET (through urllib3; through botocore when that does not answer 206 or 200)."""
        if length <= 0:
            return b""
        full = self._key(key)
        reply = self._lean("GET", full, {"Range": f"bytes={start}-{start + length - 1}"})
        if reply is not None:
            status, _, body = reply
            if status == 206 or (status == 200 and start == 0):
                return body[:length]
            if status == 416:
                return b""
        try:
            body = self.client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )["Body"]
            return body.read()
        except ClientError as exc:
            if _code(exc) in ("InvalidRange", "416"):
                return b""
            raise self._fail(exc, key) from exc
        except BotoCoreError as exc:  # connection trouble after retries: an error, never a bad file
            raise StoreError(f"{self.url}{key}: {exc}") from exc

    def open(self, key: str, size: int | None = None) -> BinaryIO:
        if size is None:
            info = self.stat(key)
            if info is None:
                raise ObjectNotFound(f"no object {key!r} in {self.url}")
            size = info.size
        return io.BufferedReader(RangedReader(self, key, size), buffer_size=BLOCK)  # type: ignore[return-value]

    def download(self, key: str, dest: BinaryIO, size: int | None = None) -> None:
        """Large objects: boto3's parallel ranged download. Others: one presigned GET through urllib3, which
        spends a third less client CPU per object than a full botocore call (it is the limit for many small
        files). A refused or failed GET is repeated through botocore, for its retries and its error codes."""
        try:
            if size is None:
                info = self.stat(key)
                size = info.size if info else 0
            if size >= MULTIPART:
                self.client.download_fileobj(
                    self.bucket, self._key(key), dest, Config=TransferConfig(multipart_threshold=MULTIPART)
                )
                return
            url = self._presigned_get(self._key(key))
            response = self._http().request("GET", url, preload_content=False, retries=False)
            try:
                if response.status == 200:
                    for chunk in response.stream(1 << 20):
                        dest.write(chunk)
                    return
            finally:
                response.release_conn()
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            if hasattr(dest, "seek") and hasattr(dest, "truncate"):
                dest.seek(0)
                dest.truncate()
            for chunk in body.iter_chunks(1 << 20):
                dest.write(chunk)
        except ClientError as exc:
            raise self._fail(exc, key) from exc
        except (BotoCoreError, urllib3.exceptions.HTTPError) as exc:
            raise StoreError(f"{self.url}{key}: {exc}") from exc

    def _bucket_url(self) -> str:
        """The URL objects of this bucket hang from (path or virtual-host style, as botocore resolves it): resolved
        once, because botocore re-runs its endpoint rules for every call and that is most of a call's cost."""
        if self._base_url is None:
            probe = "nccid-probe"
            url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": probe})
            self._base_url = url.split("?", 1)[0][: -len(probe)]
        return self._base_url

    def _presigned_get(self, full_key: str) -> str:
        """A SigV4 query-signed GET URL for one object."""
        request = AWSRequest(method="GET", url=self._bucket_url() + quote(full_key, safe="/~"))
        S3SigV4QueryAuth(self._credentials(), "s3", self.client.meta.region_name, expires=900).add_auth(request)
        return request.url

    def _lean(
        self, method: str, full_key: str, headers: dict[str, str], body: bytes | None = None
    ) -> tuple[int, dict, bytes] | None:
        """One SigV4-signed request (`headers` signed too: conditions, ranges, the copy source) straight through
        the bucket's urllib3 connection pool: (status, headers, body), or None when no answer came (the caller
        then asks botocore, which retries). Never raises for an HTTP status: the caller decides what it means."""
        try:
            base = self._bucket_url()
            pool = self._http().connection_from_url(base)
            quoted = quote(full_key, safe="/~")
            request = AWSRequest(method=method, url=base + quoted, headers=headers, data=body or b"")
            S3SigV4Auth(self._credentials(), "s3", self.client.meta.region_name).add_auth(request)
            path = urllib3.util.parse_url(base).path or "/"
            response = pool.urlopen(
                method,
                path + quoted,
                body=body,
                headers=dict(request.headers),
                retries=False,
                redirect=False,
                decode_content=False,  # the stored bytes, as botocore gives them, even for a gzip Content-Encoding
            )
        except (urllib3.exceptions.HTTPError, OSError, BotoCoreError, AttributeError):
            return None  # AttributeError: no credentials to sign with; botocore then says so properly
        return response.status, response.headers, response.data

    def _http(self) -> urllib3.PoolManager:
        if self._pool is None or self._pool_pid != os.getpid():
            with self._lock:
                if self._pool is None or self._pool_pid != os.getpid():
                    from botocore.httpsession import get_cert_path

                    self._pool = urllib3.PoolManager(
                        maxsize=64, ca_certs=get_cert_path(True), timeout=urllib3.Timeout(connect=10, read=60)
                    )
                    self._pool_pid = os.getpid()
        return self._pool

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, key: str, data: bytes | BinaryIO, *, overwrite: bool = True) -> ObjectInfo:
        """PutObject for bytes (create-only by `If-None-Match: *` with `overwrite=False`), a managed upload
        (multipart above MULTIPART bytes) for a file object; S3 makes either visible whole or not at all. Bytes
        go with their Content-MD5, so that a server never keeps a body cut short (SeaweedFS stores an empty
        object when the connection drops right after the headers, as when a loader is killed mid-write).
        Returns the stored object's info; raises ObjectExists on an existing key with `overwrite=False`, and
        StoreError naming the key and the server's error code for any other refusal."""
        full = self._key(key)
        extra = {} if overwrite else {"IfNoneMatch": "*"}
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                body = bytes(data)
                digest = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
                if body:
                    info = self._lean_put(key, full, body, overwrite, digest)
                    if info is not None:
                        return info
                client = self.client if body else self._closing_client()
                reply = client.put_object(Bucket=self.bucket, Key=full, Body=body, ContentMD5=digest, **extra)
                return ObjectInfo(key=key, size=len(body), checksum=reply["ETag"].strip('"'), mtime=time.time())
            if not overwrite and self.stat(key) is not None:
                raise ObjectExists(f"object {key!r} already exists in {self.url}")
            self.client.upload_fileobj(data, self.bucket, full, Config=TransferConfig(multipart_threshold=MULTIPART))
        except ClientError as exc:
            raise self._fail(exc, key) from exc
        except BotoCoreError as exc:  # the connection failed after botocore's retries: nothing was stored
            raise StoreError(f"{self.url}{key}: {exc}") from exc
        info = self.stat(key)
        assert info is not None
        return info

    def _lean_put(self, key: str, full: str, body: bytes, overwrite: bool, digest: str) -> ObjectInfo | None:
        """PutObject through urllib3 (`digest`: the body's Content-MD5): the stored object's info, ObjectExists
        (412 on a create-only write), or None for any other answer (the caller asks again through botocore for
        its retries and error codes)."""
        headers = {"Content-MD5": digest, **({} if overwrite else {"If-None-Match": "*"})}
        reply = self._lean("PUT", full, headers, body)
        if reply is None:
            return None
        status, headers, _ = reply
        if status == 412 and not overwrite:
            raise ObjectExists(f"object {key!r} already exists in {self.url}")
        if status != 200 or not headers.get("ETag"):
            return None
        return ObjectInfo(key=key, size=len(body), checksum=headers["ETag"].strip('"'), mtime=time.time())

    def copy(self, src: str, dst: str, *, overwrite: bool = True) -> str:
        """CopyObject on the server; with overwrite=False, `If-None-Match: *` makes it create-only atomically.

        Returns the checksum of the new object as the server gave it in its answer (its ETag: the MD5 of a
        single-part object), so that a caller can check what was filed without asking again ('' where a server
        gives none). Raises ObjectExists (create-only and `dst` exists), ObjectNotFound (no `src`), StoreError.
        """
        full_src, full_dst = self._key(src), self._key(dst)
        headers = {"x-amz-copy-source": quote(f"{self.bucket}/{full_src}", safe="/~")}
        if not overwrite:
            headers["If-None-Match"] = "*"
        reply = self._lean("PUT", full_dst, headers)
        if reply is not None:
            status, _, body = reply
            if status == 412 and not overwrite:
                raise ObjectExists(f"object {dst!r} already exists in {self.url}")
            found = _COPY_ETAG.search(body) if status == 200 else None
            if found:  # a 200 can carry an <Error> instead of a result: only a result counts
                return found.group(1).decode()
        return self._copy_boto(src, dst, overwrite=overwrite)

    def _copy_boto(self, src: str, dst: str, *, overwrite: bool) -> str:
        source = {"Bucket": self.bucket, "Key": self._key(src)}
        extra = {} if overwrite else {"IfNoneMatch": "*"}
        try:
            reply = self.client.copy_object(CopySource=source, Bucket=self.bucket, Key=self._key(dst), **extra)
            return str(reply.get("CopyObjectResult", {}).get("ETag", "")).strip('"')
        except ClientError as exc:
            if _code(exc) in ("NotImplemented", "InvalidArgument") and extra:
                # a server without conditional copies: check, then copy (the loader is the only writer here)
                if self.stat(dst) is not None:
                    raise ObjectExists(f"object {dst!r} already exists in {self.url}") from exc
                return self._copy_boto(src, dst, overwrite=True)
            if _code(exc) == "InvalidRequest" and "size" in str(exc).lower():  # over 5 GB: multipart copy
                self.client.copy(source, self.bucket, self._key(dst))
                info = self.stat(dst)
                return info.checksum if info else ""
            raise self._fail(exc, dst if _code(exc) in _EXISTS else src) from exc
        except BotoCoreError as exc:  # connection trouble after retries: an error naming the key
            raise StoreError(f"{self.url}{dst}: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            raise self._fail(exc, key) from exc

    def check_bucket(self) -> None:
        """Raise StoreMissing if the bucket does not exist. A key that may not look (an uploader's write-only
        key is refused HEAD) counts as there: the write itself will say if it is not."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise StoreMissing(f"bucket {self.bucket} does not exist at {self.endpoint_url or 'AWS S3'}") from exc
            if _code(exc) not in ("403", "AccessDenied", "Forbidden"):
                raise self._fail(exc, "") from exc
        except NoCredentialsError as exc:
            raise StoreError(
                f"{self.url}: no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE (`nccid s3 env` prints them for nccid's own server)"
            ) from exc
        except BotoCoreError as exc:  # no endpoint, connection refused, ...: the store cannot be reached
            raise StoreError(f"{self.url}: {exc}") from exc

    def create_bucket(self) -> None:
        """For tests and a fresh local server; production buckets are made by their owners."""
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._fail(exc, "") from exc


def _rebuild(bucket: str, prefix: str, endpoint_url: str | None, profile: str | None) -> S3Store:
    """The store a worker process unpickles: one per process for the same settings and credentials, so that
    its client and connections serve every task sent to that process instead of being built for each."""
    env = tuple(os.environ.get(name) for name in _CREDENTIAL_VARS)
    shared_key = (os.getpid(), bucket, prefix, endpoint_url, profile, env)
    with _SHARED_LOCK:
        store = _SHARED.get(shared_key)
        if store is None:
            store = _SHARED[shared_key] = S3Store(bucket, prefix, endpoint_url=endpoint_url, profile=profile)
        return store


_CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)
