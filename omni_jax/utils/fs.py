"""One file-system layer for every path the library touches (data_root, manifests, media,
tokenizer, workdir, init checkpoints, exports): local paths and URLs such as `gs://bucket/x`
go through `etils.epath` (orbax and TFDS use it too; gs:// needs `gcsfs` or TensorFlow, see
`omni_jax[gcs]`). Libraries that insist on a local file name get one from `local_file`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike


def is_url(p: PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...), which never touch os.path."""
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    return epath.Path(os.fspath(p))


def abspath(p: PathLike) -> str:
    """Absolute local path; URLs unchanged."""
    p = os.fspath(p)
    return p if is_url(p) else os.path.abspath(os.path.expanduser(p))


def dirname(p: PathLike) -> str:
    p = os.fspath(p)
    return os.path.dirname(p) if not is_url(p) else p.rstrip("/").rsplit("/", 1)[0]


def resolve(base_dir: PathLike, ref: PathLike) -> str:
    """ref as is when absolute or a URL, else relative to base_dir (normalised)."""
    ref = os.fspath(ref)
    if is_url(ref) or os.path.isabs(ref):
        return ref
    if not is_url(base_dir):
        return os.path.normpath(os.path.join(base_dir, ref))
    base, parts = os.fspath(base_dir).rstrip("/"), []
    for piece in ref.split("/"):
        if piece == ".." and parts:
            parts.pop()
        elif piece == "..":
            base = dirname(base)
        elif piece not in ("", "."):
            parts.append(piece)
    return "/".join([base, *parts])


def join(base: PathLike, *parts: PathLike) -> str:
    base = os.fspath(base)
    if not is_url(base):
        return os.path.join(base, *map(os.fspath, parts))
    return os.fspath(epath.Path(base).joinpath(*map(os.fspath, parts)))


def exists(p: PathLike) -> bool:
    return os.path.exists(p) if not is_url(p) else path(p).exists()


def isfile(p: PathLike) -> bool:
    return os.path.isfile(p) if not is_url(p) else path(p).is_file()


def isdir(p: PathLike) -> bool:
    return os.path.isdir(p) if not is_url(p) else path(p).is_dir()


def listdir(p: PathLike) -> list[str]:
    return sorted(os.listdir(p)) if not is_url(p) else sorted(c.name for c in path(p).iterdir())


def makedirs(p: PathLike) -> None:
    if is_url(p):
        path(p).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(p, exist_ok=True)


def open(p: PathLike, mode: str = "r", **kwargs: Any) -> IO:  # noqa: A001 - the builtin's name
    """builtins.open for local paths, epath's open for URLs."""
    import builtins

    if not is_url(p):
        return builtins.open(p, mode, **kwargs)
    return path(p).open(mode, **kwargs)


def read_bytes(p: PathLike) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def read_text(p: PathLike) -> str:
    with open(p) as f:
        return f.read()


def write_text(p: PathLike, text: str) -> None:
    with open(p, "w") as f:
        f.write(text)


def rmtree(p: PathLike) -> None:
    if is_url(p):
        path(p).rmtree()
    else:
        shutil.rmtree(p)


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
    """A local file name with p's content: p itself when local, else a temporary copy (for
    libraries that read only local files: safetensors' safe_open, soundfile, PyAV, ...)."""
    if not is_url(p):
        yield os.fspath(p)
        return
    suffix = os.path.splitext(os.fspath(p))[1]
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        with open(p, "rb") as src:
            shutil.copyfileobj(src, tmp)
        tmp.flush()
        yield tmp.name


@contextlib.contextmanager
def local_dir_for_write(p: PathLike) -> Iterator[str]:
    """A local directory to write into; for a URL its files are uploaded to p on success."""
    if not is_url(p):
        os.makedirs(p, exist_ok=True)
        yield os.fspath(p)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield tmp
        makedirs(p)
        for root, _, files in os.walk(tmp):
            rel = os.path.relpath(root, tmp)
            dest = p if rel == "." else join(p, rel)
            makedirs(dest)
            for name in files:
                with builtins_open(os.path.join(root, name), "rb") as src, \
                        open(join(dest, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)


def builtins_open(p: str, mode: str = "r") -> IO:
    import builtins

    return builtins.open(p, mode)
