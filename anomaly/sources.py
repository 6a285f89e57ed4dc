"""Turn command-line arguments and uploads into a flat list of image inputs.

Files, folders and zip archives all end up as `InputItem`s so the rest of the code never
cares where an image came from. Zips are read in memory only (nothing is extracted), under
caps measured on the bytes actually decompressed, and member names are sanitised so a
later writer that joins `relpath` under an output folder cannot escape it.
"""
from __future__ import annotations

import io
import lzma
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Sequence

from .imageio import ImageLoadError, printable

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
_HIDDEN_NAMES = {"__MACOSX"}
_CHUNK_BYTES = 1024 * 1024
# What zipfile raises for one unreadable member: bad CRC or header, corrupt deflate/bzip2/lzma
# streams (bz2 raises OSError), or an unsupported compression method.
_MEMBER_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError,
                  NotImplementedError)


@dataclass(frozen=True)
class ZipLimits:
    max_files: int = 10_000
    max_total_bytes: int = 2 * 1024**3
    max_file_bytes: int = 256 * 1024**2


@dataclass(frozen=True)
class InputItem:
    path: str        # as found: the argument joined with the path inside it ("data/test/a.png", "batch.zip/x/a.png")
    relpath: str     # relative to its argument, POSIX, sanitised (no "..", no leading "/"); a direct file: its name
    source: str | Path | None    # file on disk, or None when data is in memory
    data: bytes | None = None    # in-memory content (zip members, uploads)
    error: str | None = None     # set when this input could not even be read ("<path>: <reason>")

    def read_bytes(self) -> bytes:
        """The raw file content; ImageLoadError (one line) when it cannot be read."""
        if self.error is not None:
            prefix = f"{printable(self.path)}: "
            raise ImageLoadError(self.path, self.error.removeprefix(prefix))
        if self.data is not None:
            return self.data
        try:
            return Path(self.source).read_bytes()
        except OSError as exc:
            reason = "file not found" if isinstance(exc, FileNotFoundError) else "could not be read"
            raise ImageLoadError(self.path, reason) from None


@dataclass
class Collection:
    items: list[InputItem] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # problems not tied to one image (empty folder, bad zip...)

    def extend(self, other: Collection) -> None:
        self.items.extend(other.items)
        self.errors.extend(other.errors)


class _ArchiveRejected(Exception):
    """A cap was exceeded: the whole archive is refused (one error line)."""


def collect_inputs(args: Sequence[str | Path], limits: ZipLimits = ZipLimits()) -> Collection:
    """Expand files, folders (recursively) and .zip archives into image items, in argument order."""
    collection = Collection()
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            collection.extend(_folder_items(str(arg), path))
        elif path.is_file() and path.suffix.lower() == ".zip":
            collection.extend(_zip_items(str(arg), path, limits))
        elif path.is_file():
            collection.items.append(InputItem(path=str(arg), relpath=sanitize_relpath(path.name) or "file",
                                              source=path))
        elif path.exists():
            collection.errors.append(f"{printable(arg)}: not a regular file or folder")
        else:
            collection.errors.append(f"{printable(arg)}: no such file or folder")
    return collection


def items_from_upload(name: str, data: bytes, limits: ZipLimits = ZipLimits()) -> Collection:
    """A dashboard upload: a .zip becomes its image members, anything else one in-memory item."""
    if name.lower().endswith(".zip"):
        return _zip_items(name, io.BytesIO(data), limits)
    relpath = PurePosixPath(sanitize_relpath(name) or "upload").name
    return Collection(items=[InputItem(path=name, relpath=relpath, source=None, data=data)])


def sanitize_relpath(name: str) -> str:
    """A relative POSIX path that stays inside any folder it is joined to ("" if nothing is left).

    Backslashes count as separators (Windows-made zips), "", "." and ".." parts and drive
    letters are dropped, control characters become "_".
    """
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    if parts and len(parts[0]) == 2 and parts[0][1] == ":":
        parts = parts[1:]
    return "/".join("".join(c if c.isprintable() else "_" for c in part) for part in parts)


def safe_join(root: str | Path, relpath: str) -> Path:
    """root/relpath, resolved; ValueError if it would land outside root (or on root itself)."""
    base = Path(root).resolve()
    target = (base / relpath).resolve()
    if target == base or not target.is_relative_to(base):
        raise ValueError(f"{printable(relpath)}: path would leave the output folder")
    return target


def _is_image_name(relpath: str) -> bool:
    parts = PurePosixPath(relpath).parts
    visible = all(not part.startswith(".") and part not in _HIDDEN_NAMES for part in parts)
    return bool(parts) and visible and PurePosixPath(relpath).suffix.lower() in IMAGE_EXTENSIONS


def _folder_items(arg: str, folder: Path) -> Collection:
    collection = Collection()
    found: list[str] = []

    def on_error(exc: OSError) -> None:
        collection.errors.append(f"{printable(exc.filename or arg)}: could not be read")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _HIDDEN_NAMES]
        rel_dir = Path(dirpath).relative_to(folder)
        found.extend(rel for f in filenames if _is_image_name(rel := (rel_dir / f).as_posix()))
    for rel in sorted(found, key=lambda r: (sanitize_relpath(r), r)):
        collection.items.append(InputItem(path=os.path.join(arg, rel), relpath=sanitize_relpath(rel),
                                          source=folder / rel))
    if not found and not collection.errors:
        collection.errors.append(f"{printable(arg)}: no images found in folder ({_extensions_text()})")
    return collection


def _zip_items(arg: str, archive: str | Path | BinaryIO, limits: ZipLimits) -> Collection:
    try:
        with zipfile.ZipFile(archive) as zf:
            return _read_zip(arg, zf, limits)
    except _ArchiveRejected as exc:
        return Collection(errors=[f"{printable(arg)}: {exc}"])
    except PermissionError:
        return Collection(errors=[f"{printable(arg)}: permission denied"])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError):
        return Collection(errors=[f"{printable(arg)}: not a valid zip archive (corrupt or truncated)"])


def _read_zip(arg: str, zf: zipfile.ZipFile, limits: ZipLimits) -> Collection:
    # Not ZipInfo.is_dir(): it fails on an empty name (zipfile cuts a name at its first NUL byte).
    members = [info for info in zf.infolist() if not info.filename.endswith("/")]
    if len(members) > limits.max_files:
        raise _ArchiveRejected(f"too many files: {len(members):,} exceeds the {limits.max_files:,}-file limit")
    collection = Collection()
    total = 0
    for rel, info in _image_members(arg, members, collection.errors).items():
        path = f"{arg}/{info.filename}"
        if info.flag_bits & 0x1:
            collection.items.append(_failed_item(path, rel, "encrypted zip member (password required)"))
            continue
        try:
            data = _read_member(zf, info, limits, limits.max_total_bytes - total)
        except _MEMBER_ERRORS:
            collection.items.append(_failed_item(path, rel, "corrupt data in the zip archive"))
            continue
        total += len(data)
        collection.items.append(InputItem(path=path, relpath=rel, source=None, data=data))
    if not collection.items:
        collection.errors.append(f"{printable(arg)}: no images found in the zip archive ({_extensions_text()})")
    return collection


def _image_members(arg: str, members: list[zipfile.ZipInfo], errors: list[str]) -> dict[str, zipfile.ZipInfo]:
    """Image members by sanitised relpath, sorted; relpaths stay unique so no output overwrites another."""
    chosen: dict[str, zipfile.ZipInfo] = {}
    for info in sorted(members, key=lambda i: (sanitize_relpath(i.filename), i.filename)):
        rel = sanitize_relpath(info.filename)
        if not _is_image_name(rel):
            continue
        if rel in chosen:
            errors.append(f"{printable(arg)}: duplicate member {printable(rel)} (kept the first)")
            continue
        chosen[rel] = info
    return chosen


def _failed_item(path: str, relpath: str, reason: str) -> InputItem:
    return InputItem(path=path, relpath=relpath, source=None, error=f"{printable(path)}: {reason}")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ZipLimits, budget: int) -> bytes:
    """Decompress in chunks, counting real bytes: header sizes may lie, so they are never trusted."""
    chunks: list[bytes] = []
    size = 0
    with zf.open(info) as member:
        while chunk := member.read(_CHUNK_BYTES):
            size += len(chunk)
            if size > limits.max_file_bytes:
                raise _ArchiveRejected(f"possible zip bomb: {printable(info.filename)} expands past the "
                                       f"{_human_bytes(limits.max_file_bytes)} per-file limit")
            if size > budget:
                raise _ArchiveRejected(f"possible zip bomb: contents expand past the "
                                       f"{_human_bytes(limits.max_total_bytes)} total limit")
            chunks.append(chunk)
    return b"".join(chunks)


def _human_bytes(count: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale and count % scale == 0:
            return f"{count // scale:,} {unit}"
    return f"{count:,} bytes"


def _extensions_text() -> str:
    return "looked for " + ", ".join(sorted(IMAGE_EXTENSIONS))
