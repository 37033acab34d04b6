"""Run records (run.json) and the artifact store under <output_root>/artifacts.

A product is written into a temporary directory next to its final place and renamed
into place with its manifest once complete, under a per-artifact lock, so a killed job
never leaves half an artifact and two jobs never build the same one at once. A disk that
fills while a product is written ends the build with one line naming the product and what
it needed (DiskFullError), and its temporary directory is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

from polyft.errors import PolyftError


class DiskFullError(PolyftError):
    """The disk filled while something was written; what was half-written is removed."""

PACKAGES = ("polyft", "torch", "transformers", "tokenizers", "safetensors", "peft", "trl",
            "datasets", "accelerate", "bitsandbytes", "hydra-core", "omegaconf", "lm-eval", "wandb")
_SECRET = re.compile(r"(token|secret|password|passwd|api[_-]?key|auth)", re.IGNORECASE)


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable hash of a JSON-able object (dict key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def redact(obj: Any) -> Any:
    """Replace the value of every key that looks like a credential."""
    if isinstance(obj, dict):
        return {k: ("***" if _SECRET.search(str(k)) and v not in (None, "") else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock held on `path` (blocking): waits for the other holder, never gives up."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def _versions() -> tuple:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions.items())


def package_versions() -> dict[str, str]:
    """The versions of Python and the stack (read once per process: a run and its products
    record the same)."""
    return dict(_versions())


def git_revision(path: str | os.PathLike | None = None) -> str | None:
    cwd = str(path or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not rev:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------ writing, and a full disk

_FULL = ("No space left on device", "StorageFull", "Disk quota exceeded")


def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def no_space(exc: BaseException, path: str | os.PathLike) -> bool:
    """Whether `exc`, raised while writing under `path`, is a full disk: ENOSPC or EDQUOT in
    its chain, or a failed write with no space left on that file system (torch and
    safetensors raise their own errors for it, without the errno)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _FULL):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(_existing(Path(path))).free < (1 << 20)
    except OSError:
        return False


def size_of(path: str | os.PathLike) -> int:
    """Bytes of the files under `path` (a file: its size)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def disk_full(what: str, path: str | os.PathLike, written: int) -> DiskFullError:
    """One line: what was being written where, and the space it needs (more than `written`)."""
    try:
        free = f"{human(shutil.disk_usage(_existing(Path(path))).free)} free there"
    except OSError:
        free = "free space unknown"
    return DiskFullError(f"no space left on device writing {what} {os.path.abspath(path)}: it needs more than {human(written)} "
                         f"(written when the disk filled; {free}); nothing was kept: free space and run "
                         "the same command again")


def write_text(path: Path, text: str) -> None:
    """`path` holds the old content or the new, never half of it: written aside, renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and no_space(exc, path):
            raise disk_full("the file", path, len(text.encode())) from None
        raise


def _write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def read_manifest(path: str | os.PathLike) -> dict | None:
    f = Path(path) / "manifest.json"
    return json.loads(f.read_text()) if f.exists() else None


# ---------------------------------------------------------------- base references
# An adapter names its base in base_model_name_or_path (adapter_config.json, flix_config.json).
# When both sit under one output root, the reference is relative to the adapter's directory:
# a store moved or copied as a whole (rsync to a cluster, another checkout) keeps working,
# and every polyft reader resolves it with `resolve_base`, from any working directory.
BASE_REF_FILES = ("adapter_config.json", "flix_config.json")


def base_reference(product_dir: str | os.PathLike, base: str, root: str | os.PathLike) -> str:
    """What an adapter in `product_dir` records as its base: the path relative to the adapter
    when both lie under `root` (the output root), else `base` as given (an absolute path or a
    hub id). `product_dir` may be the build's temporary directory: a sibling of the final one,
    so the relative path is the same."""
    b = Path(base)
    if not b.is_absolute() and not b.exists():
        return base  # a hub id
    b, d, r = b.resolve(), Path(product_dir).resolve(), Path(root).resolve()
    if not (b.is_relative_to(r) and d.is_relative_to(r)):
        return base
    return os.path.relpath(b, d)


def resolve_base(adapter_dir: str | os.PathLike, ref: str | None) -> str | None:
    """An adapter's base reference as a usable path: a relative one is taken from the adapter's
    directory, whatever the working directory; anything else as it is (absolute paths, hub
    ids, a reference another tool wrote relative to its working directory)."""
    if not ref or Path(ref).is_absolute():
        return ref
    here = Path(adapter_dir) / ref
    return str(here.resolve()) if here.exists() else ref


def rebase(product_dir: Path, source: Path, final: Path, root: str | os.PathLike) -> None:
    """The base references of `product_dir` (written for `source`'s place; renamed to `final`
    next) made right for `final`: relative under `root`, else absolute."""
    for name in BASE_REF_FILES:
        f = product_dir / name
        if not f.is_file():
            continue
        conf = json.loads(f.read_text())
        ref = conf.get("base_model_name_or_path")
        base = resolve_base(source, ref)
        if not base or not Path(base).exists():
            continue  # a hub id, or a base that is gone: left as written
        new = base_reference(final, base, root)
        if new != ref:
            conf["base_model_name_or_path"] = new
            f.write_text(json.dumps(conf, indent=2, sort_keys=name == "flix_config.json"))


@dataclass
class ArtifactStore:
    """Products keyed by (kind, name, hash of the config part that determines them)."""

    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    def path_for(self, kind: str, name: str, key: dict) -> Path:
        return self.root / kind / f"{name}-{config_hash(key)}"

    def find(self, kind: str, name: str, key: dict, target: str | os.PathLike | None = None) -> Path | None:
        """The product if it is built: at `target` (an output_dir, holding this key's hash)
        or in the store, under its name or, made under another name (the name is no part of
        the key: a `name=` or a naming scheme of an earlier polyft), under that one."""
        if target is not None:
            manifest = read_manifest(target)
            return Path(target) if manifest and manifest.get("hash") == config_hash(key) else None
        path = self.path_for(kind, name, key)
        if read_manifest(path):
            return path
        digest = config_hash(key)
        for other in sorted((self.root / kind).glob(f"*-{digest}")):
            if (read_manifest(other) or {}).get("hash") == digest:
                return other
        return None

    def copy_to(self, found: Path, target: Path) -> Path:
        """A stored product copied to `target` (an output_dir), atomically: a whole copy or
        none. A copy, not a link: what the user does to their directory never reaches the store."""
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and any(target.iterdir()):
            raise PolyftError(f"output_dir {target} already exists and is not empty; "
                              "remove it or choose another path")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            shutil.copytree(found, tmp, dirs_exist_ok=True)
            rebase(tmp, found, target, self.root.parent)
            if target.exists():
                target.rmdir()
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def obtain(self, kind: str, name: str, key: dict, make: Callable[["Build"], Any],
               target: str | os.PathLike | None = None) -> "Obtained":
        """The one find-or-build: under the product's lock, reuse it if built, else make(build)
        writes it into build.dir (and adds to build.manifest), which is renamed into place
        only once make returns."""
        try:
            lock = self.lock(kind, name, key)
            lock.__enter__()
        except OSError as exc:  # the lock file itself: a disk too full for an empty file
            if not no_space(exc, self.root):
                raise
            raise disk_full(f"the {kind}", target or self.path_for(kind, name, key), 0) from None
        try:
            found = self.find(kind, name, key, target)
            if found is not None:
                return Obtained(found, True)
            stored = self.find(kind, name, key) if target is not None else None
            if stored is not None:  # made before into the store: output_dir gets a copy
                return Obtained(self.copy_to(stored, Path(target)), True, copied_from=stored)
            with self.build(kind, name, key, target=target) as build:
                result = make(build)
            return Obtained(build.dir, False, result)
        finally:
            lock.__exit__(None, None, None)

    def work_dir(self, kind: str, name: str, key: dict) -> Path:
        """A persistent scratch directory (checkpoints) that survives a killed job."""
        path = self.root / kind / ".work" / f"{name}-{config_hash(key)}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def lock(self, kind: str, name: str, key: dict):
        return file_lock(self.root / kind / ".locks" / f"{name}-{config_hash(key)}.lock")

    @contextlib.contextmanager
    def build(self, kind: str, name: str, key: dict, target: str | os.PathLike | None = None,
              ) -> Iterator["Build"]:
        """Yield a Build whose `.dir` is a fresh temporary directory; on success its
        manifest is written and it is renamed to `target` (default: the store path).
        The caller holds `lock()` around find() + build(): stale temporary directories of
        the same product (a killed build) are removed here."""
        final = Path(target) if target else self.path_for(kind, name, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists() and any(final.iterdir()):
            raise PolyftError(f"output_dir {final} already exists and is not empty; "
                              "remove it or choose another path")
        for stale in final.parent.glob(f".tmp-{final.name}-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        build = Build(dir=tmp, manifest={"kind": kind, "name": name, "hash": config_hash(key),
                                         "key": key, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "versions": package_versions()})
        try:
            yield build
            (tmp / "manifest.json").write_text(json.dumps(build.manifest, indent=2, default=str, ensure_ascii=False))
            if final.exists():
                final.rmdir()  # empty, checked above
            os.rename(tmp, final)
            build.dir = final
        except Exception as exc:
            if isinstance(exc, PolyftError) or not no_space(exc, tmp):
                raise
            raise disk_full(f"the {kind}", final, size_of(tmp)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Build:
    dir: Path
    manifest: dict = field(default_factory=dict)


@dataclass
class Obtained:
    path: Path
    reused: bool
    result: Any = None  # what `make` returned (None when reused)
    copied_from: Path | None = None  # the stored product an output_dir was copied from


@dataclass
class RunRecord:
    """run.json in a run directory: what ran, with what, and what came out."""

    run_dir: Path
    command: str
    config: dict
    seed: int | None = None
    status: str = "running"
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    artifacts: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self):
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._start = time.time()
        self._meta = {"versions": package_versions(), "git_revision": git_revision(),
                      "cwd_git_revision": git_revision(Path.cwd()), "host": platform.node(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.save()

    def add_artifact(self, role: str, path: str | os.PathLike, reused: bool, **info) -> None:
        self.artifacts.append({"role": role, "path": str(Path(path).resolve()),
                               "reused": reused, **info})
        self.save()

    def finish(self, status: str = "ok", error: str | None = None) -> None:
        self.status, self.error = status, error
        try:
            self.save()
        except DiskFullError:
            if status == "ok":
                raise  # a failed run's own error is the one to show; its record is best effort

    def save(self) -> None:
        _write_json(self.run_dir / "run.json", self.as_dict())

    def as_dict(self) -> dict:
        return {
            "command": self.command, "status": self.status, "seed": self.seed,
            "config": redact(self.config), "wall_time_s": round(time.time() - self._start, 3),
            "metrics": self.metrics, "history": self.history, "artifacts": self.artifacts,
            "error": self.error, **self._meta, **self.extra,
        }


def load_runs(root: str | os.PathLike) -> list[dict]:
    """Every run.json below `root`, each with its directory under key `run_dir`."""
    runs = []
    for f in sorted(Path(root).rglob("run.json")):
        rec = json.loads(f.read_text())
        rec["run_dir"] = str(f.parent)
        runs.append(rec)
    return runs


def fingerprint(path: Path) -> dict:
    """What identifies a model or adapter directory: its manifest hash if it is a polyft
    product, else the sizes and modification times of its files."""
    manifest = read_manifest(path)
    if manifest:
        return {"manifest": manifest.get("hash"), "kind": manifest.get("kind")}
    files = sorted(f for f in Path(path).iterdir() if f.is_file())
    return {"files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
