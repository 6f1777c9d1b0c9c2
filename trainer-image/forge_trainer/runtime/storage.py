"""Where the trainer's files live: a local folder (a mounted volume) or an S3-compatible prefix.

A location in the configuration is a path or an ``s3://bucket/prefix`` URL; the one ``s3`` setting
of the configuration (endpoint, region, path-style addressing) says how to reach the store, and the
credentials come from boto3's usual places (``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY``, which
the operator sets from the location's Secret, or a shared credentials file). Files are always read
and written locally: inputs are mirrored to local scratch before they are read, outputs and
checkpoints are written locally and then uploaded, with a marker object written last.

Every failure of the store is a :class:`StorageError` naming the configuration field it came from and
what to check (the credentials, the endpoint, the bucket), never a botocore traceback.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from ..contract import StorageError

SCHEME = "s3://"
# botocore's codes for credentials the store does not accept
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                    "InvalidClientTokenId", "AuthorizationHeaderMalformed"}


def is_s3(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str  # the prefix, without a leading or trailing slash ("" = the whole bucket)

    @classmethod
    def parse(cls, url: str) -> S3Url:
        u = urlsplit(url)
        return cls(u.netloc, u.path.strip("/"))

    def child(self, rel: str) -> S3Url:
        return S3Url(self.bucket, "/".join(p for p in (self.key, rel.strip("/")) if p))

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}" if self.key else f"{SCHEME}{self.bucket}"


class S3Store:
    """One S3-compatible store as the configuration reaches it, for the s3:// ``location`` of the configuration
    field ``field`` (``checkpoint.dir``, ``data.sources[0].path``), which its errors name."""

    def __init__(self, settings, field: str, location: str):
        import boto3
        from botocore.config import Config

        self.settings, self.field, self.location = settings, field, location
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=settings.endpoint, region_name=settings.region or "us-east-1",
            config=Config(s3={"addressing_style": "path" if settings.path_style else "auto"},
                          connect_timeout=settings.connect_timeout_seconds, read_timeout=60,
                          retries={"max_attempts": settings.max_attempts, "mode": "standard"}))

    # -- errors in the configuration's terms

    def _error(self, url: S3Url, e: Exception) -> StorageError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"{self.field} {self.location}"
        endpoint = self.settings.endpoint or "the AWS endpoint"
        if isinstance(e, NoCredentialsError):
            return StorageError(f"{where}: no S3 credentials: set {self.field}.s3.secretRef to a Secret with "
                                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(e, EndpointConnectionError) or _is_connection_error(e):
            return StorageError(f"{where}: cannot reach the S3 endpoint {endpoint} ({self.field}.s3.endpoint): "
                                f"{_cause(e)}")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            text = e.response.get("Error", {}).get("Message") or code
            if code in _BAD_CREDENTIALS:
                return StorageError(f"{where}: the S3 credentials were refused by {endpoint}: check the Secret of "
                                    f"{self.field}.s3.secretRef ({code}: {text})")
            if code in ("AccessDenied", "403"):
                return StorageError(f"{where}: access denied by {endpoint}: the credentials of "
                                    f"{self.field}.s3.secretRef may not use this bucket ({text})")
            if code == "NoSuchBucket":
                return StorageError(f"{where}: no bucket {url.bucket} at {endpoint}")
            return StorageError(f"{where}: S3 error from {endpoint} on {url}: {code}: {text}")
        return StorageError(f"{where}: {type(e).__name__}: {e}")

    def _call(self, url: S3Url, what, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return what(*args, **kwargs)
        except (BotoCoreError, ClientError, OSError) as e:
            raise self._error(url, e) from e

    # -- objects

    def check(self, url: S3Url) -> None:
        """One cheap request (list one key of the prefix): the endpoint answers, the credentials are accepted,
        the bucket exists and may be read."""
        self._call(url, self.client.list_objects_v2, Bucket=url.bucket, Prefix=url.key, MaxKeys=1)

    def list(self, url: S3Url) -> Iterator[dict]:
        """Every object under the prefix (as folder: ``key/``), or the object ``key`` itself."""
        prefix = url.key + "/" if url.key else ""
        paginator = self.client.get_paginator("list_objects_v2")
        found = False
        for page in self._call(url, lambda: list(paginator.paginate(Bucket=url.bucket, Prefix=prefix))):
            for obj in page.get("Contents", []):
                found = True
                yield obj
        if not found and url.key:
            head = self.head(url)
            if head is not None:
                yield {"Key": url.key, "Size": head["ContentLength"], "LastModified": head["LastModified"]}

    def head(self, url: S3Url) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=url.bucket, Key=url.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(url, e) from e
        except Exception as e:
            raise self._error(url, e) from e

    def read_text(self, url: S3Url) -> str | None:
        """An object's text; None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return self.client.get_object(Bucket=url.bucket, Key=url.key)["Body"].read().decode()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise self._error(url, e) from e
        except Exception as e:
            raise self._error(url, e) from e

    def write_text(self, url: S3Url, text: str) -> None:
        self._call(url, self.client.put_object, Bucket=url.bucket, Key=url.key, Body=text.encode())

    def upload(self, local: Path, url: S3Url) -> None:
        self._call(url, self.client.upload_file, str(local), url.bucket, url.key)

    def upload_tree(self, local: Path, url: S3Url, skip: set[str] = frozenset()) -> list[str]:
        """Upload every file under ``local`` (but the relative paths in ``skip``); returns what it uploaded."""
        done = []
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            if rel not in skip:
                self.upload(path, url.child(rel))
                done.append(rel)
        return done

    def delete(self, url: S3Url, keys: list[str]) -> None:
        """Delete the objects ``keys`` (full keys) of the bucket, in batches of a thousand."""
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]
            self._call(url, self.client.delete_objects, Bucket=url.bucket, Delete={"Objects": batch, "Quiet": True})

    def delete_tree(self, url: S3Url) -> None:
        self.delete(url, [o["Key"] for o in self.list(url) if o["Key"] != url.key])

    def mirror(self, url: S3Url, local: Path) -> Path:
        """Make ``local`` a copy of the prefix (or of the one object) ``url``: files whose size and time
        match are kept, missing or changed ones downloaded (each under a temporary name, then renamed),
        local files the store no longer has removed. Returns the local path of the prefix or object."""
        objects = list(self.list(url))
        if not objects:
            raise StorageError(f"{self.field} {url}: no objects under this prefix")
        if len(objects) == 1 and objects[0]["Key"] == url.key:  # one object, not a folder
            self._fetch(url, objects[0], local)
            return local
        wanted = set()
        for obj in objects:
            rel = obj["Key"][len(url.key) + 1 if url.key else 0:]
            if not rel or rel.endswith("/"):  # a "folder" placeholder object
                continue
            wanted.add(rel)
            self._fetch(S3Url(url.bucket, obj["Key"]), obj, local / rel)
        for path in [p for p in local.rglob("*") if p.is_file()] if local.is_dir() else []:
            # another node's download in progress into a shared folder is not a stale file
            if path.relative_to(local).as_posix() not in wanted and not path.name.endswith(".part"):
                path.unlink(missing_ok=True)
        return local

    def _fetch(self, url: S3Url, obj: dict, dest: Path) -> None:
        mtime = obj["LastModified"].astimezone(timezone.utc).timestamp()
        try:
            st = dest.stat()
            if st.st_size == obj["Size"] and st.st_mtime == mtime:
                return
        except OSError:
            pass
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            self._call(url, self.client.download_file, url.bucket, url.key, str(tmp))
            os.utime(tmp, (mtime, mtime))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def _is_connection_error(e: Exception) -> bool:
    from botocore.exceptions import ConnectionError as BotoConnectionError, ConnectTimeoutError

    return isinstance(e, (BotoConnectionError, ConnectTimeoutError, ConnectionError))


def _cause(e: Exception) -> str:
    """The innermost reason of a connection failure (refused, timed out, egress refused)."""
    inner = e
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    text = str(inner) or type(inner).__name__
    return text if len(text) < 300 else text[:300] + "..."


def local_mirror(location: str, settings, scratch: str | Path, field: str) -> str:
    """The local path of a location: itself when it is a folder, else a mirror of the S3 prefix under
    ``scratch`` (downloaded now)."""
    if not is_s3(location):
        return location
    url = S3Url.parse(location)
    return str(S3Store(settings, field, location).mirror(url, mirror_path(scratch, url)))


def mirror_path(scratch: str | Path, url: S3Url) -> Path:
    """Where the mirror of an S3 prefix is under the scratch folder (one place per bucket and key)."""
    return Path(scratch) / "s3" / url.bucket / (url.key or "_bucket")


def publish(local: Path, location: str, settings, field: str, marker: str) -> None:
    """Upload the folder ``local`` to the prefix ``location`` so that its ``marker`` file is the last
    object written (a reader that sees it sees everything), and objects of an earlier upload that the
    new folder lacks are removed. The marker is removed first: during the upload the prefix is
    visibly incomplete."""
    url = S3Url.parse(location)
    store = S3Store(settings, field, location)
    store.delete(url, [url.child(marker).key])
    uploaded = set(store.upload_tree(local, url, skip={marker}))
    stale = [o["Key"] for o in store.list(url) if o["Key"][len(url.key) + 1 if url.key else 0:] not in uploaded
             and o["Key"] != url.child(marker).key]
    store.delete(url, stale)
    store.upload(local / marker, url.child(marker))


def remove_local(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def scratch_of(config) -> Path:
    """The local folder for S3 copies and uploads: under the (always local) cache folder."""
    return Path(config.cache_dir) / "s3"


def input_fields(config) -> dict[str, str]:
    """The configuration's input locations by field: data sources, the base model, the tokenizer."""
    fields = {f"data.sources[{i}].path": s.path for i, s in enumerate(config.data.sources)}
    if config.model.base_path is not None:
        fields["model.base_path"] = config.model.base_path
    if config.tokenizer.path is not None:
        fields["tokenizer.path"] = config.tokenizer.path
    return fields


def localized(config, download: bool = True):
    """The configuration with every s3:// input replaced by its local mirror under the scratch folder,
    downloaded now when ``download`` (else only the paths: another process of the node downloads)."""
    local = {}
    for field, location in input_fields(config).items():
        if not is_s3(location):
            continue
        url = S3Url.parse(location)
        local[field] = (local_mirror(location, config.s3, scratch_of(config), field) if download
                        else str(mirror_path(scratch_of(config), url)))
    if not local:
        return config
    sources = [s.model_copy(update={"path": local.get(f"data.sources[{i}].path", s.path)})
               for i, s in enumerate(config.data.sources)]
    return config.model_copy(update={
        "data": config.data.model_copy(update={"sources": sources}),
        "model": config.model.model_copy(update={"base_path": local.get("model.base_path", config.model.base_path)}),
        "tokenizer": config.tokenizer.model_copy(update={"path": local.get("tokenizer.path", config.tokenizer.path)}),
    })


def check_locations(config) -> None:
    """Fail now, before any work, when a store of the configuration cannot be reached or refuses its
    credentials: not hours later at the first checkpoint or the export."""
    fields = {**input_fields(config), "checkpoint.dir": config.checkpoint.dir, "output.dir": config.output.dir}
    for field, location in fields.items():
        if is_s3(location):
            S3Store(config.s3, field, location).check(S3Url.parse(location))


def s3_endpoints(config) -> list[str]:
    """``host:port`` of the S3 endpoint when any location of the configuration is on S3 (for the egress lock)."""
    locations = [*input_fields(config).values(), config.checkpoint.dir, config.output.dir]
    return [endpoint_address(config.s3)] if any(is_s3(x) for x in locations) else []


def endpoint_address(settings) -> str:
    """``host:port`` of the store that ``settings`` (an S3Config) reach."""
    endpoint = settings.endpoint or f"https://s3.{settings.region or 'us-east-1'}.amazonaws.com"
    u = urlsplit(endpoint)
    return f"{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}"
