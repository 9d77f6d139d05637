"""Shard folders and checkpoint storage beyond the local disk: ``https://``, ``s3://``, ``gs://``.

A *location* is a local path (a shared NFS folder included) or a URL. Everything here works
on both, so the rest of the project never asks which one it holds; a local path is read
exactly as before (plain ``open``, ``pathlib``).

* Shards and manifests (``run.py shard`` output read by train, tune, evaluate, predict and
  ``shard verify``) are read through fsspec: :func:`open_binary` streams an object front to
  back (a tar shard never needs random access; no HTTP range requests, so any static web
  server will do), :func:`read_bytes` reads a small one (a Parquet manifest) whole,
  :func:`size` checks one exists with its size, and :func:`shard_samples` is the WebDataset
  stage that turns shard locations into samples (WebDataset's own ``gopen`` shells out to
  ``curl`` for http and needs a ``pipe:`` command for s3). A manifest names its shards
  relative to itself, so a shard folder copied or uploaded whole works from its new place.
* Ray Train's checkpoint storage (``train.storage``) is handed to Ray as the URI itself;
  :func:`storage_filesystem` opens it the way Ray does (``pyarrow.fs.FileSystem.from_uri``)
  for the driver's own checks (does a run exist, what did it train).

Nothing resolves a URL to a path on this machine: a Ray worker on another node opens the
same URL itself, with its own credentials.

Credentials and endpoints are the libraries' standard ones: for S3 and S3-compatible stores
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` (``AWS_PROFILE``,
instance roles), or an ``?endpoint_override=HOST:PORT&scheme=http`` query on the location (the
form Ray's ``storage_path`` takes, accepted for shards too); for Google Cloud Storage
``GOOGLE_APPLICATION_CREDENTIALS`` or the node's default account (needs ``gcsfs``).
"""
from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from sharding.tarstream import group_samples, tar_members

# The URL schemes this project reads, with the package fsspec needs for each.
PACKAGES = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
S3_QUERY = ("endpoint_override", "scheme", "region")  # what an s3:// location's query may set
STREAM_BLOCK = 16 << 20  # read-ahead of an object-store stream (bytes)
READ_BUFFER = 1 << 20  # what one read() of a remote stream asks fsspec for (bytes)


class StorageError(OSError):
    """A remote location could not be read: the message names the URL, the cause and what was expected."""


def scheme(location: str | Path) -> str:
    """``"s3"``, ``"https"``, ... for a URL; ``""`` for a local path (``file://`` included)."""
    text = str(location)
    if "://" not in text:
        return ""
    found = text.split("://", 1)[0].lower()
    return "" if found == "file" else found


def is_remote(location: str | Path) -> bool:
    """True for a URL other than ``file://`` (the local disk and NFS mounts are not remote)."""
    return bool(scheme(location))


def _local(location: str | Path) -> Path:
    text = str(location)
    return Path(text[len("file://"):] if text.lower().startswith("file://") else text)


def join(location: str | Path, *names: str) -> str:
    """``location/name/...``: a path for a local folder, a URL (its query kept) for a remote one."""
    if not is_remote(location):
        return str(_local(location).joinpath(*names))
    parts = urlsplit(str(location))
    path = parts.path.rstrip("/")
    for name in names:
        path = f"{path}/{name.strip('/')}"
    return urlunsplit(parts._replace(path=path))


def name(location: str | Path) -> str:
    """The last component of a location (a shard's file name)."""
    if not is_remote(location):
        return _local(location).name
    return PurePosixPath(urlsplit(str(location)).path).name


def absolute(location: str | Path) -> str:
    """A local path made absolute (Ray workers run in folders of their own); a URL as it is."""
    return str(location) if is_remote(location) else str(_local(location).resolve())


def display(location: str | Path) -> str:
    """A location for messages: the URL without its query, the path as given."""
    if not is_remote(location):
        return str(location)
    return urlunsplit(urlsplit(str(location))._replace(query="", fragment=""))


# ----------------------------------------------------------------------------- fsspec (shards)


def _s3_options(location: str, query: str) -> dict[str, Any]:
    """s3fs options from an ``s3://`` location's query (Ray's ``storage_path`` form)."""
    given = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(given) - set(S3_QUERY))
    if unknown:
        raise StorageError(f"{display(location)}: unknown query parameter(s) {', '.join(unknown)}; an s3:// "
                           f"location takes {', '.join(S3_QUERY)} (credentials come from AWS_ACCESS_KEY_ID / "
                           "AWS_SECRET_ACCESS_KEY, never from the URL)")
    options: dict[str, Any] = {}
    if "endpoint_override" in given:
        endpoint = given["endpoint_override"]
        options["endpoint_url"] = endpoint if "://" in endpoint else f"{given.get('scheme', 'https')}://{endpoint}"
    if "region" in given:
        options["client_kwargs"] = {"region_name": given["region"]}
    return options


def _filesystem(location: str) -> tuple[Any, str]:
    """(the fsspec filesystem, the path it takes) for a remote location."""
    import fsspec

    proto = scheme(location)
    parts = urlsplit(location)
    try:
        if proto in ("http", "https"):
            return fsspec.filesystem(proto), location
        options = _s3_options(location, parts.query) if proto == "s3" else {}
        if parts.query and proto != "s3":
            raise StorageError(f"{display(location)}: a {proto}:// location takes no query (?{parts.query})")
        return fsspec.filesystem(proto, **options), f"{parts.netloc}{parts.path}"
    except ImportError as exc:
        package = PACKAGES.get(proto, "the fsspec implementation for it")
        raise StorageError(f"{display(location)}: reading {proto}:// locations needs the package {package} "
                           f"(pip install {package}): {exc}") from None
    except ValueError as exc:  # fsspec: "Protocol not known"
        raise StorageError(f"{display(location)}: unsupported location ({exc}); expected a local path or an "
                           f"{', '.join(f'{p}://' for p in PACKAGES)} URL") from None


def _explain(location: str, exc: BaseException, expected: str) -> OSError:
    """The error to raise for a failed read of ``location``: what failed, why, what was expected."""
    where = display(location)
    if isinstance(exc, StorageError):
        return exc
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None and getattr(cause, "status", None) != 404:
        exc = cause  # fsspec's http reports every failed HEAD/GET as FileNotFoundError: the cause says why
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"{where}: not found (no such file or object, HTTP 404); expected {expected}")
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(exc, PermissionError) or status in (401, 403):
        return StorageError(f"{where}: access denied ({_cause(exc)}); expected {expected} readable with this "
                            "node's credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                            "GOOGLE_APPLICATION_CREDENTIALS, or a public URL)")
    if isinstance(status, int):
        return StorageError(f"{where}: the server answered HTTP {status} ({_cause(exc)}); expected {expected}")
    if _is_connection_error(exc):
        host = urlsplit(location).netloc or "its host"
        return StorageError(f"{where}: cannot reach {host} ({_cause(exc)}); expected a server answering there "
                            f"with {expected}")
    return StorageError(f"{where}: unreadable ({_cause(exc)}); expected {expected}")


def _cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    with contextlib.suppress(ImportError):
        import aiohttp

        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError)):
            return True
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError, EndpointConnectionError

        if isinstance(exc, (BotoConnectionError, EndpointConnectionError)):
            return True
    return False


@contextlib.contextmanager
def open_binary(location: str | Path, *, expected: str = "a file") -> Iterator[IO[bytes]]:
    """``location`` opened for one front-to-back read (a local file, or an fsspec stream).

    Raises :class:`FileNotFoundError` (missing: HTTP 404, no such object) or
    :class:`StorageError` (unreachable, access denied, other HTTP errors), each naming the
    location and ``expected``.
    """
    if not is_remote(location):
        with open(_local(location), "rb") as handle:
            yield handle
        return
    location = str(location)
    fs, path = _filesystem(location)
    # http: a plain streamed GET (no range requests); object stores: read-ahead blocks.
    options = {"block_size": 0} if scheme(location) in ("http", "https") else {"block_size": STREAM_BLOCK,
                                                                             "cache_type": "readahead"}
    try:
        handle = fs.open(path, "rb", **options)
    except Exception as exc:  # noqa: BLE001 - each library raises its own; all named below
        raise _explain(location, exc, expected) from exc
    # fsspec answers every read() through its event loop thread; tarfile reads a few KiB at a
    # time: a large buffer in front made the loopback HTTP reader 20x faster (27 -> 531 samples/s).
    with io.BufferedReader(handle, buffer_size=READ_BUFFER) as buffered:
        yield buffered


def read_bytes(location: str | Path, *, expected: str = "a file") -> bytes:
    """The whole of a (small) file or object: errors as :func:`open_binary`'s."""
    with open_binary(location, expected=expected) as handle:
        try:
            return handle.read()
        except Exception as exc:  # noqa: BLE001
            raise _explain(str(location), exc, expected) from exc


def size(location: str | Path, *, expected: str = "a file") -> int:
    """The size in bytes of a file or object; :class:`FileNotFoundError` when it does not exist."""
    if not is_remote(location):
        path = _local(location)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; expected {expected}")
        return path.stat().st_size
    location = str(location)
    fs, path = _filesystem(location)
    try:
        info = fs.info(path)
    except Exception as exc:  # noqa: BLE001
        raise _explain(location, exc, expected) from exc
    if info.get("type") == "directory" or info.get("size") is None:
        raise FileNotFoundError(f"{display(location)}: a folder or an object of unknown size; expected {expected}")
    return int(info["size"])


def exists(location: str | Path) -> bool:
    """Whether a file or object is there (False when missing; other failures raise as :func:`size`)."""
    try:
        size(location)
    except FileNotFoundError:
        return False
    return True


def is_folder(location: str | Path) -> bool:
    """A local folder, or any URL (an object store has no folders to check: its files are checked instead)."""
    return is_remote(location) or _local(location).is_dir()


def list_names(location: str | Path, suffix: str) -> list[str]:
    """Names in a folder ending in ``suffix``, sorted; ``[]`` where a remote one cannot be listed
    (a plain web server need not list its folders)."""
    if not is_remote(location):
        folder = _local(location)
        return sorted(p.name for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []
    try:
        fs, path = _filesystem(str(location))
        found = fs.ls(path.rstrip("/") + "/", detail=False)
    except Exception:  # noqa: BLE001 - only used to say what is there in an error message
        return []
    return sorted({name(str(f).rstrip("/")) for f in found if str(f).endswith(suffix)})


def _open_shards(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """``{"url": location}`` -> the same dict with ``stream``, open while its samples are read."""
    for source in sources:
        with open_binary(source["url"], expected="a WebDataset tar shard written by `run.py shard`") as stream:
            yield {**source, "stream": stream}


def _shard_samples(sources: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for source in sources:
        url = source["url"]
        with open_binary(url, expected="a WebDataset tar shard written by `run.py shard`") as stream:
            for key, members in group_samples(tar_members(stream, display(url)), display(url)):
                yield {"__key__": key, "__url__": url, **members}


def shard_samples():
    """The WebDataset stage ``{"url": location}`` -> samples (``__key__``, ``__url__``, one entry
    per tar member), for local paths and URLs alike: ``wds.tarfile_to_samples()`` with fsspec
    streams instead of ``gopen``, and each member read whole in one go
    (:mod:`sharding.tarstream`). Errors raise (:func:`open_binary`'s and
    :class:`~sharding.tarstream.TarError`, naming the shard)."""
    return _shard_samples


# ----------------------------------------------------------------------------- pyarrow (Ray storage)


def storage_filesystem(location: str | Path) -> tuple[Any, str]:
    """(``pyarrow.fs.FileSystem``, path) of a Ray storage location, opened as Ray Train opens
    ``RunConfig(storage_path=...)`` (``pyarrow.fs.FileSystem.from_uri``: the same query
    parameters, credentials and ``AWS_ENDPOINT_URL``)."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        return pafs.LocalFileSystem(), str(_local(location).resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        raise StorageError(f"{display(location)}: not a storage location Ray can use ({_cause(exc)}); "
                           "expected a local folder, s3://BUCKET/PATH or gs://BUCKET/PATH") from None


def storage_exists(location: str | Path) -> bool:
    """Whether a file or folder exists under Ray storage (an object store: any object below it)."""
    import pyarrow.fs as pafs

    fs, path = storage_filesystem(location)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as exc:  # noqa: BLE001
        raise _explain(str(location), exc, "Ray Train's storage") from exc


def storage_read_text(location: str | Path) -> str:
    """A small text file from Ray storage."""
    fs, path = storage_filesystem(location)
    try:
        with fs.open_input_stream(path) as handle:
            return handle.read().decode()
    except Exception as exc:  # noqa: BLE001
        raise _explain(str(location), exc, "a file in Ray Train's storage") from exc


def storage_write_text(location: str | Path, text: str) -> None:
    """Write a small text file to Ray storage whole: a local file through a temporary name and a
    rename (``sharding/atomic.py``), an object in one upload (object stores never show half an object)."""
    if not is_remote(location):
        from sharding.atomic import atomic_write_bytes

        path = _local(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, text.encode())
        return
    fs, path = storage_filesystem(location)
    try:
        with fs.open_output_stream(path) as handle:
            handle.write(text.encode())
    except Exception as exc:  # noqa: BLE001
        raise _explain(str(location), exc, "a writable Ray Train storage location") from exc


def storage_folders(location: str | Path) -> list[str]:
    """The locations of the folders directly below a Ray storage folder (``[]`` if it has none)."""
    import pyarrow.fs as pafs

    fs, path = storage_filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except Exception as exc:  # noqa: BLE001
        raise _explain(str(location), exc, "Ray Train's storage") from exc
    return sorted(join(location, PurePosixPath(i.path).name) for i in infos if i.type == pafs.FileType.Directory)
