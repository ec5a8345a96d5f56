"""Object storage behind one interface: a local directory (``file://``) or S3 (``s3://``).

Keys are ``/``-separated relative paths (``runs/42/out.csv``). Both backends validate them the
same way (no leading ``/``, no ``\\``, no empty, ``.`` or ``..`` segment) so that code tested on
:class:`LocalStorage` behaves the same on :class:`S3Storage`, and so that a key built from a
source path can never escape the storage directory.

Both backends write atomically as seen by readers: :class:`LocalStorage` writes a temporary
file next to the target and renames it; S3 makes an object visible only once fully uploaded.
:meth:`Storage.delete` of a missing key is not an error (S3 semantics).

Big objects made on the fly (the regional collections) go through :meth:`Storage.open_upload`:
written front to back, uploaded in parts as they fill (S3 multipart upload; a temporary file
renamed at the end on a local directory), visible only once complete. Ranged reads
(:meth:`Storage.stream_range`) take one member out of a stored zip without fetching the rest.

Library errors are translated at the boundary: a missing key raises
:class:`shared.errors.NotFound`, anything else :class:`shared.errors.StorageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from shared.errors import NotFound, StorageError, StorageUnavailable

if TYPE_CHECKING:
    from shared.config import Settings

CHUNK_BYTES = 1024 * 1024
#: Above this size :meth:`S3Storage.put_file` uses a multipart upload.
MULTIPART_THRESHOLD_BYTES = 100 * 1024 * 1024
#: 64 MiB parts allow files of up to 640 GB within S3's 10 000-part limit.
MULTIPART_PART_BYTES = 64 * 1024 * 1024
#: First parts of an upload written as it goes (:meth:`Storage.open_upload`): two are in memory
#: at once (one being sent, one filling). The part size doubles every 1,000 parts, so S3's
#: 10,000 parts hold any size (8 GB within the first 1,000).
UPLOAD_PART_BYTES = 8 * 1024 * 1024
_PARTS_PER_SIZE = 1000
#: S3 refuses smaller parts, but for the last.
S3_MIN_PART_BYTES = 5 * 1024 * 1024
_TMP_PREFIX = ".oa-tmp-"
#: S3 error codes that mean "try again later" whatever the HTTP status.
_TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError", "Throttling",
    "RequestTimeTooSkewed",
})


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`StorageError`."""
    if not isinstance(key, str) or not key:
        raise StorageError(f"invalid storage key {key!r}: empty")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise StorageError(f"invalid storage key {key!r}: absolute or has \\ or NUL")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise StorageError(f"invalid storage key {key!r}: empty, '.' or '..' segment")
        if segment.startswith(_TMP_PREFIX):
            raise StorageError(f"invalid storage key {key!r}: reserved name")
    return key


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")


class Storage(ABC):
    """Object storage: bytes and files under string keys."""

    @abstractmethod
    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``, replacing any previous object."""

    @abstractmethod
    async def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        """Store the file at ``path`` under ``key`` without reading it into memory."""

    @abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """The object's content; :class:`NotFound` if missing."""

    @abstractmethod
    async def download(self, key: str, path: Path) -> None:
        """Write the object to ``path`` (streamed, atomic); :class:`NotFound` if missing."""

    @abstractmethod
    def stream(self, key: str) -> AsyncIterator[bytes]:
        """The object's content in chunks, e.g. to serve it over HTTP.

        :class:`NotFound` is raised on the first iteration if the key is missing.
        """

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    @abstractmethod
    async def list_keys(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (a string prefix, as in S3), sorted."""

    @abstractmethod
    async def size_of(self, key: str) -> int:
        """The object's size in bytes; :class:`NotFound` if missing."""

    @abstractmethod
    def stream_range(self, key: str, offset: int, length: int) -> AsyncGenerator[bytes, None]:
        """``length`` bytes from ``offset`` in chunks (fewer if the object ends first), e.g.
        one member of a zip; :class:`NotFound` on the first iteration if the key is missing."""

    async def read_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer if the object ends first), in memory: for
        small reads such as a zip's central directory."""
        return b"".join([chunk async for chunk in self.stream_range(key, offset, length)])

    async def read_tail(self, key: str, length: int) -> tuple[bytes, int]:
        """The last ``length`` bytes of the object (all of it if shorter) and its size: a zip's
        end records and directory, in one request where the backend allows."""
        size = await self.size_of(key)
        start = max(0, size - length)
        return await self.read_range(key, start, size - start), size

    @abstractmethod
    def open_upload(self, key: str, *, content_type: str | None = None) -> Upload:
        """A writer that stores what is written to it under ``key`` as it is written, never
        holding more than a part in memory (S3: a multipart upload). Use it as an async
        context manager: leaving it normally makes the object visible, an exception leaves
        nothing behind."""

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release connections."""


class Upload(ABC):
    """An object being written front to back (see :meth:`Storage.open_upload`)."""

    size_bytes: int = 0

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Append ``data``."""

    @abstractmethod
    async def _finish(self) -> None:
        """Make the object visible."""

    @abstractmethod
    async def _abort(self) -> None:
        """Leave nothing behind."""

    async def __aenter__(self) -> Upload:
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            await self._finish()
        else:
            await self._abort()


class LocalStorage(Storage):
    """Objects as files under a root directory (``file:///some/dir``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path_of(self, key: str) -> Path:
        """The file that holds ``key``; refuses any key that would leave the root."""
        path = (self.root / check_key(key)).resolve()
        # Belt and braces: a symlink inside the root could still point outside it.
        if not path.is_relative_to(self.root):
            raise StorageError(f"invalid storage key {key!r}: outside the storage directory")
        return path

    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Store ``data`` under ``key`` (temporary file, then rename)."""
        path = self.path_of(key)
        await self._run(self._write_atomic, path, lambda tmp: tmp.write_bytes(data))

    async def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        """Copy the file at ``path`` to ``key`` (temporary file, then rename)."""
        target = self.path_of(key)
        source = Path(path)

        def copy(tmp: Path) -> None:
            with source.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(CHUNK_BYTES):
                    dst.write(chunk)

        await self._run(self._write_atomic, target, copy)

    async def get_bytes(self, key: str) -> bytes:
        """The content of ``key``; :class:`NotFound` if missing."""
        path = self.path_of(key)
        return await self._run(path.read_bytes, key=key)

    async def download(self, key: str, path: Path) -> None:
        """Copy ``key`` to ``path`` (temporary file, then rename)."""
        source = self.path_of(key)

        def copy(tmp: Path) -> None:
            with source.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(CHUNK_BYTES):
                    dst.write(chunk)

        await self._run(self._write_atomic, Path(path), copy, key=key)

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        """The content of ``key`` in chunks of 1 MiB."""
        path = self.path_of(key)
        handle = await self._run(path.open, "rb", key=key)
        try:
            while chunk := await self._run(handle.read, CHUNK_BYTES, key=key):
                yield chunk
        finally:
            handle.close()

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        path = self.path_of(key)
        return await self._run(path.is_file)

    async def size_of(self, key: str) -> int:
        """The size of the file that holds ``key``."""
        path = self.path_of(key)
        stat = await self._run(path.stat, key=key)
        return int(stat.st_size)

    async def stream_range(self, key: str, offset: int, length: int
                           ) -> AsyncGenerator[bytes, None]:
        """``length`` bytes from ``offset`` in chunks of at most 1 MiB."""
        path = self.path_of(key)
        handle = await self._run(path.open, "rb", key=key)
        try:
            handle.seek(offset)
            left = length
            while left > 0:
                chunk = await self._run(handle.read, min(CHUNK_BYTES, left), key=key)
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            handle.close()

    def open_upload(self, key: str, *, content_type: str | None = None) -> Upload:
        """A temporary file next to the target, renamed over it when complete."""
        return _LocalUpload(self, self.path_of(key))

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""
        path = self.path_of(key)
        await self._run(path.unlink, missing_ok=True)

    async def list_keys(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix``, sorted."""

        def walk() -> list[str]:
            # Walk only below the deepest directory the prefix names, not the whole root.
            directory = self.root
            head, _, _ = prefix.rpartition("/")
            if head:
                directory = self.path_of(head)
            if not directory.is_dir():
                return []
            keys = []
            for dirpath, _dirnames, filenames in os.walk(directory):
                for filename in filenames:
                    if filename.startswith(_TMP_PREFIX):
                        continue
                    key = (Path(dirpath) / filename).relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        keys.append(key)
            return sorted(keys)

        return await self._run(walk)

    @staticmethod
    def _write_atomic(path: Path, write: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(path)
        try:
            write(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    async def _run(func: Any, *args: Any, key: str | None = None, **kwargs: Any) -> Any:
        # File I/O in a thread so a big copy never stalls the event loop.
        try:
            return await asyncio.to_thread(func, *args, **kwargs)
        except FileNotFoundError as exc:
            if key is not None:
                raise NotFound(f"no such key: {key}") from exc
            raise StorageError(f"local storage: {exc}") from exc
        except IsADirectoryError as exc:
            raise NotFound(f"no such key: {key}") from exc
        except OSError as exc:
            raise StorageError(f"local storage: {exc}") from exc


class S3Storage(Storage):
    """Objects in an S3 bucket under an optional prefix (``s3://bucket/prefix``).

    Credentials and region come from the usual AWS variables (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``...). ``endpoint_url`` points at an
    S3-compatible server (MinIO, moto); path-style addressing is then used, since such servers
    rarely have wildcard DNS for virtual-hosted buckets.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        multipart_threshold_bytes: int = MULTIPART_THRESHOLD_BYTES,
        multipart_part_bytes: int = MULTIPART_PART_BYTES,
        upload_part_bytes: int = UPLOAD_PART_BYTES,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.multipart_threshold_bytes = multipart_threshold_bytes
        self.multipart_part_bytes = multipart_part_bytes
        self.upload_part_bytes = max(upload_part_bytes, S3_MIN_PART_BYTES)
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    async def _s3(self) -> Any:
        # Created on first use so that the constructor stays synchronous.
        async with self._client_lock:
            if self._client is None:
                config = AioConfig(
                    s3={"addressing_style": "path"} if self.endpoint_url else None,
                    retries={"max_attempts": 5, "mode": "standard"},
                )
                self._client = await self._stack.enter_async_context(
                    get_session().create_client("s3", endpoint_url=self.endpoint_url, config=config)
                )
            return self._client

    def _full(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextlib.contextmanager
    def _errors(self, key: str | None = None) -> Any:
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if key is not None and code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no such key: {key}") from exc
            message = f"s3 {self.bucket}: {code} {error.get('Message', '')}"
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status >= 500 or code in _TRANSIENT_S3_CODES:
                raise StorageUnavailable(message) from exc
            raise StorageError(message) from exc
        except (TimeoutError, BotoCoreError, aiohttp.ClientError, OSError) as exc:
            # No answer at all (refused, reset, timed out, DNS): the store may be back later.
            raise StorageUnavailable(f"s3 {self.bucket}: {exc!r}") from exc

    async def create_bucket(self) -> None:
        """Create the bucket if it does not exist (development servers and tests)."""
        s3 = await self._s3()
        with self._errors():
            try:
                await s3.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket"):
                    raise
            await s3.create_bucket(Bucket=self.bucket)

    async def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``."""
        s3 = await self._s3()
        extra = {"ContentType": content_type} if content_type else {}
        with self._errors():
            await s3.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, **extra)

    async def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> None:
        """Upload the file at ``path``: one request, or a multipart upload when it is large."""
        s3 = await self._s3()
        full = self._full(key)
        extra = {"ContentType": content_type} if content_type else {}
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise StorageError(f"cannot upload {path}: {exc}") from exc
        if size <= self.multipart_threshold_bytes:
            # botocore reads the file for its checksum, then aiohttp streams it from a
            # thread: below the threshold that short blocking read is acceptable.
            body = await asyncio.to_thread(path.open, "rb")
            with self._errors(), body:
                await s3.put_object(Bucket=self.bucket, Key=full, Body=body, **extra)
            return
        with self._errors():
            upload = await s3.create_multipart_upload(Bucket=self.bucket, Key=full, **extra)
            upload_id = upload["UploadId"]
            try:
                parts = await self._upload_parts(s3, full, upload_id, path)
                await s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except BaseException:
                # An abandoned multipart upload keeps costing storage until aborted.
                with contextlib.suppress(Exception):
                    await s3.abort_multipart_upload(
                        Bucket=self.bucket, Key=full, UploadId=upload_id
                    )
                raise

    async def _upload_parts(
        self, s3: Any, full: str, upload_id: str, path: Path
    ) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        with path.open("rb") as handle:
            number = 1
            while True:
                # One part in memory at a time; reading in a thread keeps the loop free.
                chunk = await asyncio.to_thread(handle.read, self.multipart_part_bytes)
                if not chunk:
                    break
                answer = await s3.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
                number += 1
        return parts

    async def get_bytes(self, key: str) -> bytes:
        """The content of ``key``; :class:`NotFound` if missing."""
        s3 = await self._s3()
        with self._errors(key):
            answer = await s3.get_object(Bucket=self.bucket, Key=self._full(key))
            async with answer["Body"] as body:
                data: bytes = await body.read()
                return data

    async def download(self, key: str, path: Path) -> None:
        """Stream ``key`` to ``path`` through a temporary file, renamed once complete."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(path)
        try:
            with tmp.open("wb") as handle:
                async for chunk in self.stream(key):
                    await asyncio.to_thread(handle.write, chunk)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    async def stream(self, key: str) -> AsyncIterator[bytes]:
        """The content of ``key`` in chunks of about 1 MiB."""
        s3 = await self._s3()
        with self._errors(key):
            answer = await s3.get_object(Bucket=self.bucket, Key=self._full(key))
        async for chunk in self._chunks(answer, key):
            yield chunk

    async def size_of(self, key: str) -> int:
        """The object's ContentLength (a HEAD request)."""
        s3 = await self._s3()
        with self._errors(key):
            answer = await s3.head_object(Bucket=self.bucket, Key=self._full(key))
        return int(answer["ContentLength"])

    async def stream_range(self, key: str, offset: int, length: int
                           ) -> AsyncGenerator[bytes, None]:
        """A ranged GET of ``length`` bytes from ``offset``, in chunks of about 1 MiB."""
        if length <= 0:
            return
        s3 = await self._s3()
        with self._errors(key):
            answer = await s3.get_object(Bucket=self.bucket, Key=self._full(key),
                                         Range=f"bytes={offset}-{offset + length - 1}")
        async for chunk in self._chunks(answer, key):
            yield chunk

    async def _chunks(self, answer: dict[str, Any], key: str) -> AsyncGenerator[bytes, None]:
        """A GET's body in chunks of about 1 MiB, read errors mapped like the request's."""
        async with answer["Body"] as body:
            while True:
                with self._errors(key):
                    chunk = await body.read(CHUNK_BYTES)
                if not chunk:
                    break
                yield chunk

    async def read_tail(self, key: str, length: int) -> tuple[bytes, int]:
        """One suffix-range GET; the size comes from its Content-Range."""
        s3 = await self._s3()
        with self._errors(key):
            answer = await s3.get_object(Bucket=self.bucket, Key=self._full(key),
                                         Range=f"bytes=-{length}")
            async with answer["Body"] as body:
                data: bytes = await body.read()
        content_range = str(answer.get("ContentRange") or "")
        size = int(content_range.rpartition("/")[2]) if "/" in content_range else len(data)
        return data, size

    def open_upload(self, key: str, *, content_type: str | None = None) -> Upload:
        """A multipart upload of ``upload_part_bytes`` parts, one sent while the next fills;
        an object smaller than one part is sent with one PUT instead."""
        return _S3Upload(self, key, content_type)

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored (a HEAD request)."""
        s3 = await self._s3()
        try:
            with self._errors(key):
                await s3.head_object(Bucket=self.bucket, Key=self._full(key))
        except NotFound:
            return False
        return True

    async def delete(self, key: str) -> None:
        """Remove ``key``; S3 does not mind if it is missing."""
        s3 = await self._s3()
        with self._errors():
            await s3.delete_object(Bucket=self.bucket, Key=self._full(key))

    async def list_keys(self, prefix: str) -> list[str]:
        """Keys starting with ``prefix``, sorted, without the storage's own prefix."""
        s3 = await self._s3()
        keys: list[str] = []
        with self._errors():
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                keys.extend(item["Key"][len(self.prefix) :] for item in page.get("Contents", []))
        return sorted(keys)

    async def close(self) -> None:
        """Close the HTTP connections of the client."""
        await self._stack.aclose()
        self._client = None


class _LocalUpload(Upload):
    def __init__(self, storage: LocalStorage, path: Path) -> None:
        self._storage = storage
        self._path = path
        self._tmp = _tmp_sibling(path)
        self._handle: Any = None

    async def write(self, data: bytes) -> None:
        if self._handle is None:
            await self._storage._run(self._path.parent.mkdir, parents=True, exist_ok=True)
            self._handle = await self._storage._run(self._tmp.open, "wb")
        await self._storage._run(self._handle.write, data)
        self.size_bytes += len(data)

    async def _finish(self) -> None:
        if self._handle is None:
            await self.write(b"")
        await self._storage._run(self._handle.close)
        await self._storage._run(os.replace, self._tmp, self._path)

    async def _abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._tmp.unlink(missing_ok=True)


class _S3Upload(Upload):
    def __init__(self, storage: S3Storage, key: str, content_type: str | None) -> None:
        self._storage = storage
        self._key = storage._full(key)
        self._extra = {"ContentType": content_type} if content_type else {}
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._sending: asyncio.Task[None] | None = None

    async def write(self, data: bytes) -> None:
        self._buffer += data
        self.size_bytes += len(data)
        growth = 2 ** (len(self._parts) // _PARTS_PER_SIZE)
        if len(self._buffer) >= self._storage.upload_part_bytes * growth:
            await self._send_part()

    async def _send_part(self) -> None:
        s3 = await self._storage._s3()
        if self._upload_id is None:
            with self._storage._errors():
                answer = await s3.create_multipart_upload(
                    Bucket=self._storage.bucket, Key=self._key, **self._extra)
            self._upload_id = answer["UploadId"]
        # One part in flight while the next one fills: wait for the previous first.
        await self._wait_sent()
        # The buffer itself is sent (no copy); writing goes on into a new one.
        body, self._buffer = self._buffer, bytearray()
        number = len(self._parts) + 1
        self._parts.append({"PartNumber": number})
        self._sending = asyncio.create_task(self._put_part(s3, number, body))

    async def _put_part(self, s3: Any, number: int, body: bytearray) -> None:
        with self._storage._errors():
            answer = await s3.upload_part(Bucket=self._storage.bucket, Key=self._key,
                                          UploadId=self._upload_id, PartNumber=number,
                                          Body=body)
        self._parts[number - 1]["ETag"] = answer["ETag"]

    async def _wait_sent(self) -> None:
        if self._sending is not None:
            sending, self._sending = self._sending, None
            await sending

    async def _finish(self) -> None:
        s3 = await self._storage._s3()
        if self._upload_id is None:
            with self._storage._errors():
                await s3.put_object(Bucket=self._storage.bucket, Key=self._key,
                                    Body=bytes(self._buffer), **self._extra)
            return
        try:
            if self._buffer:
                await self._send_part()
            await self._wait_sent()
            with self._storage._errors():
                await s3.complete_multipart_upload(
                    Bucket=self._storage.bucket, Key=self._key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts})
        except BaseException:
            await self._abort()
            raise

    async def _abort(self) -> None:
        if self._sending is not None:
            self._sending.cancel()
            with contextlib.suppress(BaseException):
                await self._sending
            self._sending = None
        if self._upload_id is not None:
            # An abandoned multipart upload keeps costing storage until aborted.
            s3 = await self._storage._s3()
            with contextlib.suppress(Exception):
                await s3.abort_multipart_upload(Bucket=self._storage.bucket, Key=self._key,
                                                UploadId=self._upload_id)
            self._upload_id = None


def storage_from_url(url: str, *, s3_endpoint_url: str | None = None) -> Storage:
    """A :class:`Storage` for ``file:///dir`` or ``s3://bucket/prefix``."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        root = Path(unquote(parts.path))
        root.mkdir(parents=True, exist_ok=True)
        return LocalStorage(root)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise StorageError(f"no bucket in storage URL {url!r}")
        return S3Storage(parts.netloc, unquote(parts.path), endpoint_url=s3_endpoint_url)
    raise StorageError(f"unsupported storage URL {url!r}: use file:///dir or s3://bucket/prefix")


@asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[Storage]:
    """The storage named by ``settings.storage_url``, closed on exit."""
    storage = storage_from_url(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    try:
        yield storage
    finally:
        await storage.close()
