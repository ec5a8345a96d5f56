"""Turn a raw download into the one data file to read: zip, gzip, nested archives.

Archives come from strangers, so extraction is defensive: a member may not land outside the
extraction folder (absolute paths, ``..``, symlinks), and the bytes actually written are
counted against ``max_unpacked_bytes`` (headers can lie about sizes). Every member is
extracted, in archive order, so a chosen ``.shp`` finds its siblings and a ``.gdb`` folder is
whole; nested ``.zip`` and ``.gz`` members are expanded in place, a few levels deep. Hitting a
limit (size, members, nesting) sets ``RunError.over_limit``: the run does not keep such data.
"""

from __future__ import annotations

import gzip
import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import structlog

from services.worker.errors import RunError

log = structlog.get_logger(__name__)

UNPACK_DIR = "unpacked"
BLOCK_BYTES = 1024 * 1024
MAX_NESTING = 3
MAX_MEMBERS = 100_000
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
GZIP_MAGIC = b"\x1f\x8b"
SHAPEFILE_SIBLINGS = (".dbf", ".shx", ".prj", ".cpg")
ARCHIVE_SUFFIXES = (".zip", ".gz")
#: Extensions that fit each conform format, in order of preference within one member list.
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "csv": (".csv",),
    "shapefile": (".shp",),
    "shapefile-polygon": (".shp",),
    "geojson": (".geojson", ".json"),
    "gdb": (".gdb",),
    "gpkg": (".gpkg",),
    "xml": (".gml", ".xml"),
    "gml": (".gml", ".xml"),
}
_DRIVE = re.compile(r"^[A-Za-z]:")


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass
class Budget:
    """Bytes that may still be written; shared by every level of nesting."""

    limit_bytes: int
    used_bytes: int = 0

    def spend(self, size_bytes: int, source: str) -> None:
        self.used_bytes += size_bytes
        if self.used_bytes > self.limit_bytes:
            raise RunError(
                f"refusing {source}: it expands past the limit of {self.limit_bytes} bytes "
                "(MAX_UNPACKED_BYTES)",
                "download_failed",
                over_limit=True,
            )


def detect_compression(path: Path) -> str | None:
    """``zip`` or ``gzip`` from the file's first bytes, else None."""
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return None


def unpack(
    download: Path,
    conform: Mapping[str, Any],
    workdir: Path,
    *,
    compression: str | None,
    max_unpacked_bytes: int,
) -> Path:
    """The data file to read from ``download``.

    For a shapefile the ``.shp`` (siblings beside it), for a geodatabase the ``.gdb`` folder,
    else the file. ``conform["file"]`` picks the member (case-insensitive, folders allowed; a
    path relative to a top folder or a nested archive also matches); without it the first
    member whose extension fits ``conform["format"]`` wins.

    Raises ``RunError``: ``download_failed`` for unsafe, oversized or corrupt archives and a
    missing ``file``; ``unknown_format`` when no member fits the format.
    """
    kind = _compression(download, compression)
    if kind is None:
        return download
    root = workdir / UNPACK_DIR
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    budget = Budget(max_unpacked_bytes)
    fmt = str(conform.get("format") or "").lower()
    if kind == "zip":
        files = _expand_zip(download, root, budget, depth=0)
    else:
        files = _expand_gzip(download, root / _gunzipped_name(download, fmt), budget, depth=0)
    return _choose(root, files, conform.get("file"), fmt)


def _compression(download: Path, compression: str | None) -> str | None:
    if compression is None:
        return detect_compression(download)
    kind = compression.lower()
    if kind not in ("zip", "gzip"):
        raise RunError(f"unknown compression {compression!r}", "invalid_source")
    if kind == "gzip" and detect_compression(download) is None:
        # The server sent Content-Encoding: gzip and the client already inflated it.
        log.info("archive.already_decompressed", file=download.name)
        return None
    return kind


# --- extraction --------------------------------------------------------------------------


def _safe_member_path(info: zipfile.ZipInfo, archive: Path) -> PurePosixPath | None:
    """The member's path relative to the extraction folder, or None to skip it."""
    name = info.filename.replace("\\", "/")
    where = f"member {info.filename!r} of {archive.name}"
    if name.startswith("/") or _DRIVE.match(name):
        raise RunError(f"refusing {where}: absolute path", "download_failed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RunError(f"refusing {where}: its path escapes the folder", "download_failed")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise RunError(f"refusing {where}: symbolic link", "download_failed")
    # macOS resource forks (__MACOSX/, ._name) look like data files but are not.
    if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("._"):
        return None
    return PurePosixPath(*parts)


def _copy_counted(src: Readable, dest: Path, budget: Budget, source: str) -> None:
    with dest.open("wb") as out:
        while block := src.read(BLOCK_BYTES):
            budget.spend(len(block), source)
            out.write(block)


def _corrupt(archive: Path, kind: str, exc: BaseException) -> RunError:
    return RunError(
        f"{archive.name} is not a readable {kind} file (truncated or corrupt): {exc}",
        "download_failed",
    )


def _extract_zip(archive: Path, dest: Path, budget: Budget) -> list[Path]:
    files: list[Path] = []
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise RunError(
                    f"refusing {archive.name}: more than {MAX_MEMBERS} members",
                    "download_failed",
                    over_limit=True,
                )
            for info in infos:
                relative = _safe_member_path(info, archive)
                if relative is None:
                    continue
                target = dest.joinpath(*relative.parts)
                # Belt and braces: a folder created earlier may be a link on odd systems.
                if not target.resolve().is_relative_to(root):
                    raise RunError(
                        f"refusing member {info.filename!r} of {archive.name}: "
                        "its path escapes the folder",
                        "download_failed",
                    )
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src:
                    _copy_counted(src, target, budget, archive.name)
                files.append(target)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _corrupt(archive, "zip", exc) from exc
    except NotImplementedError as exc:
        # Typically Deflate64 from Windows' own zip tool.
        raise RunError(
            f"{archive.name} uses an unsupported zip compression: {exc}", "download_failed"
        ) from exc
    except RuntimeError as exc:
        raise RunError(f"{archive.name} cannot be extracted: {exc}", "download_failed") from exc
    return files


def _expand_zip(archive: Path, dest: Path, budget: Budget, depth: int) -> list[Path]:
    return _expand_nested(_extract_zip(archive, dest, budget), budget, depth)


def _expand_gzip(archive: Path, dest: Path, budget: Budget, depth: int) -> list[Path]:
    try:
        with gzip.open(archive, "rb") as src:
            _copy_counted(src, dest, budget, archive.name)
    except (gzip.BadGzipFile, zlib.error, EOFError) as exc:
        raise _corrupt(archive, "gzip", exc) from exc
    return _expand_nested([dest], budget, depth)


def _expand_nested(files: Iterable[Path], budget: Budget, depth: int) -> list[Path]:
    """Replace nested archives in ``files`` by their contents, keeping the order."""
    expanded: list[Path] = []
    for path in files:
        kind = detect_compression(path) if path.suffix.lower() in ARCHIVE_SUFFIXES else None
        if kind is None:
            expanded.append(path)
            continue
        if depth >= MAX_NESTING:
            raise RunError(
                f"refusing {path.name}: archives nested more than {MAX_NESTING} deep",
                "download_failed",
                over_limit=True,
            )
        if kind == "zip":
            folder = _free_name(path.with_suffix(""))
            expanded += _expand_zip(path, folder, budget, depth + 1)
        else:
            expanded += _expand_gzip(path, _free_name(path.with_suffix("")), budget, depth + 1)
        path.unlink()
    return expanded


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def _gunzipped_name(download: Path, fmt: str) -> str:
    if download.suffix.lower() == ".gz" and Path(download.stem).suffix:
        return download.stem
    # No telling name: call it by the format so readers and member choice see a data file.
    return "data" + FORMAT_SUFFIXES.get(fmt, (".bin",))[0]


# --- choice ------------------------------------------------------------------------------


def _relative_names(root: Path, files: Iterable[Path]) -> list[tuple[str, Path]]:
    """Every extracted file and every folder above one, as (lower-case relative path, path),
    in archive order."""
    seen: dict[str, Path] = {}
    for path in files:
        relative = path.relative_to(root)
        for depth in range(1, len(relative.parts)):
            folder = PurePosixPath(*relative.parts[:depth]).as_posix().lower()
            seen.setdefault(folder, root.joinpath(*relative.parts[:depth]))
        seen.setdefault(relative.as_posix().lower(), path)
    return list(seen.items())


def _choose(root: Path, files: list[Path], wanted: Any, fmt: str) -> Path:
    names = _relative_names(root, files)
    if wanted:
        chosen = _by_name(names, str(wanted))
        if chosen is None:
            held = ", ".join(name for name, _ in names[:20])
            raise RunError(
                f"file {wanted!r} is not in the archive; it holds: {held}", "download_failed"
            )
    else:
        chosen = _by_format(names, files, fmt)
    if chosen.suffix.lower() == ".shp" and chosen.is_file():
        return _with_siblings(chosen)
    return chosen


def _by_name(names: list[tuple[str, Path]], wanted: str) -> Path | None:
    want = wanted.replace("\\", "/").strip().strip("/").lower()
    want = want.removeprefix("./")
    exact = next((path for name, path in names if name == want), None)
    if exact is not None:
        return exact
    # Sources often name the file inside a top folder or a nested archive without it.
    suffixed = [(name, path) for name, path in names if name.endswith("/" + want)]
    return min(suffixed, key=lambda item: item[0].count("/"))[1] if suffixed else None


def _by_format(names: list[tuple[str, Path]], files: list[Path], fmt: str) -> Path:
    suffixes = FORMAT_SUFFIXES.get(fmt)
    if suffixes is None:
        if len(files) == 1:
            return files[0]
        raise RunError(
            f"cannot pick a file for format {fmt!r} among {len(files)} members; "
            "the conform needs a 'file'",
            "unknown_format",
        )
    for suffix in suffixes:
        for name, path in names:
            if name.endswith(suffix) and (path.is_dir() == (suffix == ".gdb")):
                return path
    held = ", ".join(name for name, _ in names[:20])
    raise RunError(
        f"no {fmt} file ({', '.join(suffixes)}) in the archive; it holds: {held}", "unknown_format"
    )


def _with_siblings(shp: Path) -> Path:
    """Give the ``.dbf .shx .prj .cpg`` beside ``shp`` its exact stem, lower-case extensions.

    GDAL finds siblings by the ``.shp``'s stem, case-sensitively on Linux; archives made on
    Windows often mix ``Roads.SHP`` with ``roads.dbf``.
    """
    stem = shp.stem
    for sibling in shp.parent.iterdir():
        suffix = sibling.suffix.lower()
        if sibling.stem.lower() != stem.lower() or suffix not in SHAPEFILE_SIBLINGS:
            continue
        wanted = shp.with_name(stem + suffix)
        if sibling.name != wanted.name and not wanted.exists():
            sibling.rename(wanted)
    if shp.suffix != ".shp":
        shp = shp.rename(shp.with_name(stem + ".shp"))
    if not shp.with_suffix(".dbf").exists():
        log.warning("archive.shapefile_without_dbf", file=shp.name)
    return shp
