"""collect_inputs / items_from_upload: files, folders and zips, read safely and never extracted."""
from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import hostile
from anomaly.imageio import ImageLoadError, load_image
from anomaly.sources import (IMAGE_EXTENSIONS, Collection, InputItem, ZipLimits, collect_inputs,
                             items_from_upload, safe_join, sanitize_relpath)

PNG = hostile.rgb_png()


@functools.lru_cache(maxsize=None)
def big_zip_bomb() -> bytes:
    return hostile.zip_bomb()  # 300 MB of zeros, ~300 KB compressed


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_inside(relpath: str, root: Path) -> None:
    assert relpath and not relpath.startswith("/") and ".." not in relpath.split("/") and "\\" not in relpath
    assert safe_join(root, relpath).is_relative_to(root.resolve())


# --- files and folders ---------------------------------------------------------------------------

def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path) -> None:
    write_tree(tmp_path / "data", {
        "b.png": PNG, "a/z.JPG": PNG, "a/b/c.tif": PNG, "notes.txt": b"x", ".DS_Store": b"x",
        ".hidden/x.png": PNG, "__MACOSX/a/._z.JPG": b"x", "a/.x.png": PNG, "inner.zip": b"x",
    })
    collection = collect_inputs([tmp_path / "data"])
    assert collection.errors == []
    assert [item.relpath for item in collection.items] == ["a/b/c.tif", "a/z.JPG", "b.png"]
    first = collection.items[0]
    assert first.path == os.path.join(str(tmp_path / "data"), "a/b/c.tif")
    assert Path(first.source) == tmp_path / "data/a/b/c.tif" and first.data is None
    assert first.read_bytes() == PNG


def test_direct_files_missing_paths_and_empty_folders(tmp_path) -> None:
    write_tree(tmp_path, {"x/photo.png": PNG, "notes.txt": b"hello", "empty/.keep": b""})
    args = [str(tmp_path / "x/photo.png"), str(tmp_path / "notes.txt"), str(tmp_path / "nope"), tmp_path / "empty"]
    collection = collect_inputs(args)
    assert [(i.path, i.relpath) for i in collection.items] == [(args[0], "photo.png"), (args[1], "notes.txt")]
    # A non-image given directly is still attempted: the loader gives the reason.
    with pytest.raises(ImageLoadError, match=r"notes\.txt: not an image \(looks like text\)$"):
        load_image(collection.items[1].source, collection.items[1].path)
    assert collection.errors == [f"{args[2]}: no such file or folder",
                                 f"{args[3]}: no images found in folder (looked for "
                                 + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"]


def test_hostile_files_in_a_folder_each_give_their_own_outcome(tmp_path) -> None:
    write_tree(tmp_path, hostile.hostile_files())
    collection = collect_inputs([tmp_path])
    expected = {sanitize_relpath(name): reason for name, reason in hostile.expected_reasons().items()
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS}
    assert sorted(i.relpath for i in collection.items) == sorted(expected)
    for item in collection.items:
        try:
            load_image(item.read_bytes(), item.path)
        except ImageLoadError as error:
            assert expected[item.relpath] and expected[item.relpath] in str(error)
            assert str(error).startswith(item.path + ": ")
            assert_inside(item.relpath, tmp_path / "out")
        else:
            assert expected[item.relpath] is None


def test_read_bytes_reports_vanished_files(tmp_path) -> None:
    item = InputItem(path="gone.png", relpath="gone.png", source=tmp_path / "gone.png")
    with pytest.raises(ImageLoadError, match="^gone.png: file not found$"):
        item.read_bytes()
    broken = InputItem(path="a.zip/x.png", relpath="x.png", source=None, error="a.zip/x.png: corrupt data")
    with pytest.raises(ImageLoadError) as info:
        broken.read_bytes()
    assert str(info.value) == "a.zip/x.png: corrupt data"


# --- zips --------------------------------------------------------------------------------------------

def test_zip_members_nested_folders_and_directory_entries(tmp_path) -> None:
    archive = tmp_path / "batch.zip"
    archive.write_bytes(hostile.zip_bytes(
        {"top/b.png": PNG, "top/sub/a.jpeg": PNG, "readme.md": b"x", "__MACOSX/top/._b.png": b"x",
         "top/.DS_Store": b"x"}, directories=("top", "top/sub", "empty")))
    collection = collect_inputs([str(archive)])
    assert collection.errors == []
    assert [(i.path, i.relpath) for i in collection.items] == [
        (f"{archive}/top/b.png", "top/b.png"), (f"{archive}/top/sub/a.jpeg", "top/sub/a.jpeg")]
    assert all(i.source is None and i.read_bytes() == PNG for i in collection.items)


def test_member_named_by_a_nul_byte_is_skipped() -> None:
    # zipfile cuts a name at its first NUL, so this member's name is empty: ZipInfo.is_dir() used to
    # raise IndexError on it and lose the whole batch (found by test_arbitrary_zips_never_escape).
    collection = items_from_upload("in.zip", hostile.zip_bytes({"\x00": b"x", "a.png": PNG}))
    assert collection.errors == []
    assert [(i.path, i.relpath) for i in collection.items] == [("in.zip/a.png", "a.png")]


def test_hostile_member_names_are_sanitised_and_nothing_is_written(tmp_path, monkeypatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    archive = tmp_path / "evil.zip"
    archive.write_bytes(hostile.zip_bytes({name: PNG for name in hostile.HOSTILE_MEMBER_NAMES}))
    before = listing(tmp_path)
    collection = collect_inputs([archive])
    assert listing(tmp_path) == before
    assert sorted(i.relpath for i in collection.items) == [
        "a/up.png", "abs.png", "drive.png", "evil.png", "win/evil.png"]
    assert {i.path for i in collection.items} == {f"{archive}/{n}" for n in hostile.HOSTILE_MEMBER_NAMES}
    for item in collection.items:
        assert_inside(item.relpath, tmp_path / "out")


def test_colliding_sanitised_names_keep_the_first() -> None:
    collection = items_from_upload("up.zip", hostile.zip_bytes({"../a.png": b"1", "a.png": b"2"}))
    assert [(i.relpath, i.data) for i in collection.items] == [("a.png", b"1")]
    assert collection.errors == ["up.zip: duplicate member a.png (kept the first)"]


@pytest.mark.parametrize("data, reason", [
    (hostile.corrupt_zip(), "not a valid zip archive (corrupt or truncated)"),
    (b"", "not a valid zip archive (corrupt or truncated)"),
    (hostile.zip_bytes({"a.txt": b"x", "b/c.csv": b"y"}, directories=("d",)), "no images found in the zip archive"),
])
def test_bad_zips_give_one_error_line(tmp_path, data: bytes, reason: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(data)
    collection = collect_inputs([archive])
    assert collection.items == [] and len(collection.errors) == 1
    assert collection.errors[0].startswith(f"{archive}: {reason}") and "\n" not in collection.errors[0]


def test_caps_on_files_per_file_and_total_bytes() -> None:
    members = {f"{i}.png": bytes(1000) for i in range(5)}
    data = hostile.zip_bytes(members)
    assert len(items_from_upload("ok.zip", data, ZipLimits(5, 5000, 1000)).items) == 5
    cases = {
        ZipLimits(max_files=4): "too many files: 5 exceeds the 4-file limit",
        ZipLimits(max_file_bytes=999): "possible zip bomb: 0.png expands past the 999 bytes per-file limit",
        ZipLimits(max_total_bytes=4999): "possible zip bomb: contents expand past the 4,999 bytes total limit",
    }
    for limits, message in cases.items():
        assert items_from_upload("z.zip", data, limits) == Collection([], [f"z.zip: {message}"])


def test_zip_bomb_is_refused_under_the_default_caps() -> None:
    collection = items_from_upload("bomb.zip", big_zip_bomb())
    assert collection == Collection(
        [], ["bomb.zip: possible zip bomb: zeros.png expands past the 256 MiB per-file limit"])


def test_zip_bomb_with_small_limits_and_stored_members() -> None:
    bomb = hostile.zip_bytes({"a.png": bytes(50_000)}, compression=zipfile.ZIP_STORED)
    assert items_from_upload("s.zip", bomb, ZipLimits(max_file_bytes=10_000)).errors == [
        "s.zip: possible zip bomb: a.png expands past the 10,000 bytes per-file limit"]


def test_lying_size_header_never_yields_more_than_declared() -> None:
    # Headers claim 100 bytes, the member really inflates to 5 MB: zipfile stops at the claimed
    # size and the CRC no longer matches, so the member is reported corrupt instead of read.
    data = hostile.zip_with_lying_size(bytes(5 * 1024**2), claimed=100)
    collection = items_from_upload("liar.zip", data)
    assert collection.errors == []
    [item] = collection.items
    assert item.data is None and item.error == "liar.zip/liar.png: corrupt data in the zip archive"
    with pytest.raises(ImageLoadError, match="^liar.zip/liar.png: corrupt data in the zip archive$"):
        item.read_bytes()


def test_encrypted_member_is_an_item_error() -> None:
    [item] = items_from_upload("e.zip", hostile.zip_marked_encrypted()).items
    assert item.error == "e.zip/secret.png: encrypted zip member (password required)"


def test_upload_of_a_single_file() -> None:
    collection = items_from_upload("../../etc/x\n.png", PNG)
    [item] = collection.items
    assert item.path == "../../etc/x\n.png" and item.relpath == "x_.png" and item.data == PNG
    assert item.source is None and collection.errors == []


# --- safe paths -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("a/b.png", "a/b.png"), ("../../x.png", "x.png"), ("/etc/passwd", "etc/passwd"), ("a\\..\\b.png", "a/b.png"),
    ("C:\\w\\x.png", "w/x.png"), ("./a//b/./c.png", "a/b/c.png"), ("..", ""), ("tab\there.png", "tab_here.png"),
])
def test_sanitize_relpath(name: str, expected: str) -> None:
    assert sanitize_relpath(name) == expected


def test_safe_join(tmp_path) -> None:
    root = tmp_path / "out"
    assert safe_join(root, "a/b.png") == root.resolve() / "a/b.png"
    for bad in ("../x.png", "/etc/passwd", "a/../../x.png", "", "."):
        with pytest.raises(ValueError):
            safe_join(root, bad)
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError):
        safe_join(root, "link/x.png")


# --- property-based --------------------------------------------------------------------------------

MEMBER_NAME = st.lists(st.sampled_from(["..", ".", "", "a", "b.png", "/", "\\", "C:", ".h", "__MACOSX", "x.JPG",
                                        "é", "\n", "c.zip"]), min_size=1, max_size=5).map("/".join)
ANY_NAME = st.one_of(MEMBER_NAME, st.text(st.characters(exclude_categories=("Cs",)), max_size=12))


@settings(max_examples=80, deadline=None)
@pytest.mark.filterwarnings("ignore:Duplicate name")  # duplicate members are part of the test
@given(members=st.dictionaries(ANY_NAME, st.binary(max_size=64), max_size=6),
       directories=st.lists(MEMBER_NAME, max_size=2), cut=st.one_of(st.none(), st.integers(0, 400)))
def test_arbitrary_zips_never_escape(tmp_path_factory, members, directories, cut) -> None:
    data = hostile.zip_bytes({name: content for name, content in members.items() if name.strip("/")},
                             directories=tuple(d for d in directories if d.strip("/")))
    data = data if cut is None else data[:cut]
    root = tmp_path_factory.getbasetemp() / "never-written"
    collection = items_from_upload("in.zip", data, ZipLimits(max_files=4, max_total_bytes=200, max_file_bytes=50))
    assert all("\n" not in line and line.startswith("in.zip: ") for line in collection.errors)
    assert len(collection.items) + len(collection.errors) >= 1
    for item in collection.items:
        assert_inside(item.relpath, root)
        assert item.path.startswith("in.zip/") and (item.data is None) != (item.error is None)
    assert not root.exists()
