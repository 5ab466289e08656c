"""One calm console: what a command says to a person reaches the terminal; everything else a run prints
(Ray's start-up lines, the output Ray forwards from workers and actors, Ray Data's notices, library
warnings, C++ log lines) goes to a log file in the run folder.

    with QuietConsole(out / "quickstart.log") as console:
        console.say("corpus: ...")                                    # the terminal
        with progress_from_metrics(run_dir / "metrics.jsonl", total=200, desc="pretrain"):
            fit(...)                                                   # a bar fed by the run's metrics file

The capture is at the file-descriptor level (1 and 2 point at the log file while the console is open),
so output written by C++ code and by handlers created before the console opened is caught too; the
terminal is reached through duplicates of the original descriptors. ``terminal()`` is the stream
progress bars write to: the terminal while a console is open, ``sys.stderr`` otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

_active: list[QuietConsole] = []


class QuietConsole:
    """Descriptors 1 and 2 redirected to ``log_path`` (appended, after a line with ``title`` and the time)
    while open; ``verbose`` leaves them alone."""

    def __init__(self, log_path: str | Path, *, verbose: bool = False, title: str = "geneformer-ray"):
        self.log_path = Path(log_path)
        self.verbose, self.title = verbose, title
        self.out = sys.stdout
        self.err = sys.stderr
        self._saved: list[int] = []
        self._streams: tuple = ()

    def __enter__(self) -> QuietConsole:
        if self.verbose:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(log, f"==== {self.title}, {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())  # runs appended apart
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        # Python-level writers (print, Ray's forwarding of worker output) go by sys.stdout / sys.stderr at
        # call time: point them at the log too, whatever they were (a notebook's or a test runner's objects)
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self.verbose:
            return
        for stream in (sys.stdout, sys.stderr):
            stream.close()
        sys.stdout, sys.stderr = self._streams
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        _active.remove(self)
        self.out.close()
        self.err.close()

    def say(self, text: str) -> None:
        """A line (or block) for the person at the terminal."""
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        print(text, file=self.err, flush=True)


def terminal():
    """Where progress bars go: the open console's terminal, else ``sys.stderr``."""
    return _active[-1].err if _active else sys.stderr


def console_open() -> bool:
    return bool(_active)


def notice(text: str) -> None:
    """A warning a person must see: on the terminal while a quiet console is open (warnings otherwise go
    to the log), a ``UserWarning`` elsewhere."""
    if _active:
        _active[-1].error(f"warning: {text}")
    else:
        warnings.warn(text, UserWarning, stacklevel=3)


def say(text: str) -> None:
    """One line to stdout from inside a Ray Train worker, seen once. Ray Train replaces ``print`` in its
    workers with one that logs each call through the root logger and, when the worker's stdout is wrapped
    (as Ray's output capture wraps it), also calls the original: every ``print`` reached the job's log twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def progress_bar(*, total: int | None, desc: str, unit: str, disable: bool = False) -> tqdm:
    """The one kind of progress bar every stage shows (on ``terminal()``): redrawn twice a second on a
    terminal, every 30 s where the output is a file (a ``ray job submit`` log), so the log stays readable."""
    stream = terminal()
    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, disable=disable,
                mininterval=0.5 if tty else 30.0)


@contextmanager
def _following(update, *, poll_s: float, name: str):
    """``update()`` called every ``poll_s`` seconds in a thread while the block runs, and once after it."""
    stop = threading.Event()

    def follow() -> None:
        while True:
            finished = stop.wait(poll_s)
            try:
                update()
            except Exception:  # noqa: BLE001 - a progress display never fails the work it shows
                pass
            if finished:
                return

    thread = threading.Thread(target=follow, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def progress_from_metrics(path: str | Path, *, total: int, desc: str, enabled: bool | None = None,
                          poll_s: float = 0.5):
    """A progress bar (steps, rate, ETA, the latest loss / validation figures) fed by a run's
    ``metrics.jsonl`` as its rank 0 appends to it: the driver shows progress while the workers' own
    lines go to the log. Steps already in the file (a resumed run) count as done. ``enabled`` (default:
    while a quiet console is open; elsewhere, in a notebook or with --verbose, rank 0's step lines are
    the progress display)."""
    if not (console_open() if enabled is None else enabled):
        yield
        return
    path = Path(path)
    shown = progress_bar(total=total, desc=desc, unit="step")
    position = [0]

    def update() -> None:
        if not path.exists():
            return
        with open(path) as fh:
            fh.seek(position[0])
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # a line being written is read next time
        position[0] += len(complete.encode())
        _advance(shown, complete.splitlines())

    try:
        with _following(update, poll_s=poll_s, name=f"{desc}-progress"):
            yield
    finally:
        shown.close()


@contextmanager
def progress_from_count(count, *, total: int | None, desc: str, unit: str, enabled: bool | None = None,
                        poll_s: float = 0.5):
    """A progress bar fed by ``count()`` (how many units are done so far, e.g. cells a pool of model
    actors has finished, asked of a counting actor): for work that runs out of the driver's sight.
    ``enabled`` as for ``progress_from_metrics``."""
    if not (console_open() if enabled is None else enabled):
        yield
        return
    shown = progress_bar(total=total, desc=desc, unit=unit)

    def update() -> None:
        done = int(count())
        if done > shown.n:
            shown.update(done - shown.n)

    try:
        with _following(update, poll_s=poll_s, name=f"{desc}-progress"):
            yield
    finally:
        shown.close()


def _advance(bar, lines: list[str]) -> None:
    """The bar moved to the latest step of ``lines`` with their latest figures, drawn once."""
    step, shown = bar.n, {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record.get("step"), (int, float)):
            step = max(step, min(int(record["step"]), bar.total or int(record["step"])))
        for key in ("loss", "val_loss", "val_macro_f1"):
            if isinstance(record.get(key), (int, float)):
                shown[key.replace("_", " ")] = f"{record[key]:.4g}"
    if step == bar.n and not shown:
        return
    if shown:
        bar.set_postfix(shown, refresh=False)
    bar.update(step - bar.n)  # draws (tqdm redraws on update), with the figures already set
