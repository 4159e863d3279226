"""ModelStore: paths confined to the store (even through symlinks), files landing atomically and checked."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import pytest

from laas.core.errors import InvalidArgument, ModelLoadError, NotFound
from laas.daemon.store import ModelStore, sha256_of


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    s = ModelStore(tmp_path / "models")
    s.ensure()
    return s


def leftovers(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith(".partial-"))


class Failing(io.BytesIO):
    """A source that breaks after the first block."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.calls = 0

    def read(self, n: int | None = -1) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise OSError("connection reset")
        return super().read(n)


# --- resolve -----------------------------------------------------------------------------------------


def test_resolve_plain_name(store: ModelStore) -> None:
    assert store.resolve("m.gguf") == store.root.resolve() / "m.gguf"


@pytest.mark.parametrize("relative", [".", "./", "sub/..", "sub/../."])
def test_resolve_the_store_itself(store: ModelStore, relative: str) -> None:
    (store.root / "sub").mkdir()
    assert store.resolve(relative) == store.root.resolve()


def test_resolve_subdirectory_and_inner_dots(store: ModelStore) -> None:
    assert store.resolve("a/b/../c.gguf") == store.root.resolve() / "a" / "c.gguf"
    assert store.resolve("./x.gguf") == store.root.resolve() / "x.gguf"


def test_resolve_absolute_path_inside_store(store: ModelStore) -> None:
    inside = store.root / "m.gguf"
    assert store.resolve(str(inside)) == inside.resolve()


@pytest.mark.parametrize("relative", ["..", "../x.gguf", "a/../../x.gguf", "../models-other/x.gguf",
                                      "/etc/passwd", "/", "//etc/passwd"])
def test_resolve_refuses_escapes(store: ModelStore, relative: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        store.resolve(relative, field="models[0].path")
    assert info.value.field == "models[0].path"
    assert "outside the model store" in str(info.value)


def test_resolve_refuses_sibling_with_common_prefix(store: ModelStore, tmp_path: Path) -> None:
    # "/tmp/x/models-evil" starts with "/tmp/x/models" as a string but is not inside it
    (tmp_path / "models-evil").mkdir()
    with pytest.raises(InvalidArgument):
        store.resolve(str(tmp_path / "models-evil" / "m.gguf"))


@pytest.mark.parametrize("relative", ["", "a\x00b", "\x00", "m.gguf\x00/../../etc/passwd"])
def test_resolve_refuses_empty_and_nul(store: ModelStore, relative: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        store.resolve(relative)
    assert info.value.field == "path"


def test_resolve_refuses_symlink_pointing_outside(store: ModelStore, tmp_path: Path) -> None:
    outside = tmp_path / "secret.gguf"
    outside.write_bytes(b"secret")
    (store.root / "link.gguf").symlink_to(outside)
    with pytest.raises(InvalidArgument):
        store.resolve("link.gguf")
    with pytest.raises(InvalidArgument):
        store.file_for("link.gguf")


def test_resolve_refuses_symlinked_directory_pointing_outside(store: ModelStore, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "m.gguf").write_bytes(b"x")
    (store.root / "dir").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidArgument):
        store.resolve("dir/m.gguf")


def test_resolve_follows_symlink_inside_store(store: ModelStore) -> None:
    (store.root / "real.gguf").write_bytes(b"x")
    (store.root / "alias.gguf").symlink_to("real.gguf")
    assert store.resolve("alias.gguf") == (store.root / "real.gguf").resolve()


def test_resolve_works_when_store_root_is_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real-store").mkdir()
    (tmp_path / "store-link").symlink_to(tmp_path / "real-store")
    s = ModelStore(tmp_path / "store-link")
    assert s.resolve("m.gguf") == (tmp_path / "real-store" / "m.gguf").resolve()


def test_file_for(store: ModelStore) -> None:
    (store.root / "m.gguf").write_bytes(b"x")
    assert store.file_for("m.gguf") == (store.root / "m.gguf").resolve()
    with pytest.raises(NotFound) as info:
        store.file_for("missing.gguf", field="model")
    assert info.value.field == "model"
    (store.root / "sub").mkdir()
    with pytest.raises(NotFound):
        store.file_for("sub")


# --- add_stream --------------------------------------------------------------------------------------


def test_add_stream_with_right_sha256(store: ModelStore) -> None:
    data = os.urandom(3 * (1 << 20) + 5)  # more than one copy block
    seen: list[int] = []
    target = store.add_stream("m.gguf", io.BytesIO(data), sha256=hashlib.sha256(data).hexdigest().upper(),
                              progress=seen.append)
    assert target == (store.root / "m.gguf").resolve()
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert seen == sorted(seen) and seen[-1] == len(data) and len(seen) == 4
    assert leftovers(store) == []
    assert sha256_of(target) == hashlib.sha256(data).hexdigest()


def test_add_stream_mode_ignores_umask(store: ModelStore) -> None:
    old = os.umask(0o077)
    try:
        target = store.add_stream("m.gguf", io.BytesIO(b"abc"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_add_stream_without_sha256(store: ModelStore) -> None:
    assert store.add_stream("m.gguf", io.BytesIO(b"abc")).read_bytes() == b"abc"


def test_add_stream_empty_source(store: ModelStore) -> None:
    empty_sha = hashlib.sha256(b"").hexdigest()
    assert store.add_stream("e.gguf", io.BytesIO(b""), sha256=empty_sha).read_bytes() == b""


def test_add_stream_wrong_sha256_leaves_nothing(store: ModelStore) -> None:
    with pytest.raises(ModelLoadError) as info:
        store.add_stream("m.gguf", io.BytesIO(b"abc"), sha256="0" * 64)
    assert "does not match" in str(info.value)
    assert hashlib.sha256(b"abc").hexdigest() in str(info.value)
    assert not (store.root / "m.gguf").exists()
    assert list(store.root.iterdir()) == []


def test_add_stream_wrong_sha256_keeps_existing_file(store: ModelStore) -> None:
    (store.root / "m.gguf").write_bytes(b"old")
    with pytest.raises(ModelLoadError):
        store.add_stream("m.gguf", io.BytesIO(b"new"), sha256="f" * 64)
    assert (store.root / "m.gguf").read_bytes() == b"old"
    assert leftovers(store) == []


def test_add_stream_replaces_existing_file(store: ModelStore) -> None:
    (store.root / "m.gguf").write_bytes(b"old")
    store.add_stream("m.gguf", io.BytesIO(b"new"), sha256=hashlib.sha256(b"new").hexdigest())
    assert (store.root / "m.gguf").read_bytes() == b"new"


def test_add_stream_source_failure_leaves_no_temp_file(store: ModelStore) -> None:
    source = Failing(os.urandom(2 << 20))
    with pytest.raises(OSError, match="connection reset"):
        store.add_stream("m.gguf", source)
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize("filename", ["sub/m.gguf", "../m.gguf", "a/../../m.gguf", ".", "sub/.."])
def test_add_stream_refuses_a_directory_part(store: ModelStore, filename: str) -> None:
    (store.root / "sub").mkdir()
    with pytest.raises(InvalidArgument) as info:
        store.add_stream(filename, io.BytesIO(b"x"))
    assert info.value.field == "filename"
    assert not (store.root / "sub" / "m.gguf").exists()
    assert not (store.root.parent / "m.gguf").exists()
    assert leftovers(store) == []


@pytest.mark.parametrize("filename", ["", "m\x00.gguf"])
def test_add_stream_refuses_empty_or_nul_name(store: ModelStore, filename: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        store.add_stream(filename, io.BytesIO(b"x"))
    assert info.value.field == "filename"


def test_add_stream_creates_the_store(tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "new" / "models")
    s.add_stream("m.gguf", io.BytesIO(b"x"))
    assert (tmp_path / "new" / "models" / "m.gguf").read_bytes() == b"x"
    assert stat.S_IMODE(s.root.stat().st_mode) & 0o007 == 0  # not world-accessible


def test_add_file(store: ModelStore, tmp_path: Path) -> None:
    src = tmp_path / "src.gguf"
    src.write_bytes(b"hello")
    assert store.add_file(src).read_bytes() == b"hello"
    assert store.add_file(src, "renamed.gguf", sha256=hashlib.sha256(b"hello").hexdigest()).name == "renamed.gguf"
    with pytest.raises(ModelLoadError):
        store.add_file(src, "bad.gguf", sha256="1" * 64)
    assert not (store.root / "bad.gguf").exists()


def test_sha256_of(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) + 1)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_resolve_refuses_a_symlink_loop(store: ModelStore) -> None:
    os.symlink("loop", store.root / "loop")
    with pytest.raises(InvalidArgument) as info:
        store.file_for("loop")
    assert info.value.field == "path"


@pytest.mark.parametrize("name", ["x" * 300, "a/" * 3000])
def test_overlong_names_are_invalid_arguments(store: ModelStore, name: str) -> None:
    with pytest.raises(InvalidArgument, match="too long"):
        store.file_for(name)
    with pytest.raises(InvalidArgument):
        store.add_stream(name, io.BytesIO(b"data"))
    assert leftovers(store) == []
