"""Output files that appear whole or not at all: folders built under a temporary sibling name and
renamed into place, single files written to a temporary name and renamed.

    tmp = prepare_output("runs/embed", overwrite=False)    # refuses a non-empty folder up front
    ... write into tmp ...
    finalize_output(tmp, "runs/embed")                   # or discard_output(tmp) on error

    with atomic_file("results.csv") as tmp:              # the old file stays until the new one is complete
        frame.to_csv(tmp)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


LOG_SUFFIX = ".log"  # a command's console log (geneformer_ray.console), in its output folder from the start


def output_contents(out: Path) -> list[Path]:
    """What an output folder holds, less the console logs of the commands writing it."""
    return [p for p in out.iterdir() if p.suffix != LOG_SUFFIX] if out.is_dir() else []


def clear_output(out: Path) -> None:
    """Remove what ``out`` holds (``--overwrite``), less the console log being written into it."""
    for path in output_contents(out):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def prepare_output(out: str | Path, *, overwrite: bool = False) -> Path:
    """Check ``out`` can be written and return a fresh temporary sibling folder to build it in."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is a file; pass a folder path")
    if output_contents(out) and not overwrite:
        raise ValueError(f"output folder {out} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def finalize_output(tmp: Path, out: str | Path) -> Path:
    """Move the finished ``tmp`` folder to ``out``; an old ``out`` is removed only after the swap, its
    console logs carried over (a log still being written keeps going: a rename moves an open file)."""
    out = Path(out).absolute()
    old = None
    if out.exists():
        for log in out.glob(f"*{LOG_SUFFIX}"):
            if not (tmp / log.name).exists():
                log.rename(tmp / log.name)
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def discard_output(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (same suffix, so writers that go by it still do) that replaces
    ``path`` when the block ends, or is removed when it raises: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, value: dict) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
