"""The quiet console: what a command says reaches the terminal, everything else the log file; progress
bars fed by a run's metrics file."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time

from geneformer_ray.console import QuietConsole, progress_from_metrics, terminal


def test_console_sends_everything_but_its_own_lines_to_the_log(tmp_path, capfd):
    handler = logging.StreamHandler(sys.__stderr__)  # made before the console opens, as Ray's and libraries' are
    logger = logging.getLogger("test_console.early")
    logger.addHandler(handler)
    try:
        with QuietConsole(tmp_path / "run" / "cmd.log") as console:
            console.say("the summary a person reads")
            print("a library's print")
            logger.warning("an early handler's warning")
            print("a library's complaint", file=sys.stderr)
            os.write(2, b"C++ code writing to fd 2\n")
            subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
            assert terminal() is console.err
            console.error("an error sentence")
    finally:
        logger.removeHandler(handler)
    assert terminal() is sys.stderr
    shown = capfd.readouterr()
    assert shown.out == "the summary a person reads\n" and shown.err == "an error sentence\n"
    log = (tmp_path / "run" / "cmd.log").read_text()
    for line in ("a library's print", "an early handler's warning", "a library's complaint", "C++ code writing to fd 2",
                 "a child process"):
        assert line in log
    assert "the summary a person reads" not in log
    print("after the console")  # descriptors restored
    assert capfd.readouterr().out == "after the console\n"


def test_verbose_console_leaves_the_terminal_alone(tmp_path, capfd):
    with QuietConsole(tmp_path / "cmd.log", verbose=True) as console:
        console.say("summary")
        print("a library's print")
    assert capfd.readouterr().out == "summary\na library's print\n"
    assert not (tmp_path / "cmd.log").exists()


def test_progress_bar_follows_the_metrics_file_as_it_grows(tmp_path, capfd):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 10, "loss": 9.0}) + "\n")  # a resumed run: steps done before count

    def writer():
        for step in (20, 30, 40):
            time.sleep(0.15)
            with open(metrics, "a") as fh:
                fh.write(json.dumps({"step": step, "loss": 9.0 - step / 100}) + "\n")
        with open(metrics, "a") as fh:
            fh.write('{"step": 40, "val_loss": 8.')  # a line being written: not read until complete
            fh.flush()
            time.sleep(0.15)
            fh.write('25}\n')

    with QuietConsole(tmp_path / "cmd.log"):
        with progress_from_metrics(metrics, total=40, desc="pretrain", poll_s=0.05):
            thread = threading.Thread(target=writer)
            thread.start()
            thread.join()
    bar = capfd.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert bar.startswith("pretrain: 100%") and "40/40" in bar and "val loss=8.25" in bar
    with progress_from_metrics(metrics, total=40, desc="pretrain"):  # no console open: no bar (step lines show)
        pass
    assert capfd.readouterr().err == ""


def test_a_notice_reaches_the_terminal_through_a_quiet_console(tmp_path, capfd):
    import warnings

    from geneformer_ray.console import notice

    with QuietConsole(tmp_path / "cmd.log"):
        notice("bf16 runs emulated here")
    assert capfd.readouterr().err == "warning: bf16 runs emulated here\n"
    with warnings.catch_warnings(record=True) as caught:  # no console (a notebook): a UserWarning
        warnings.simplefilter("always")
        notice("bf16 runs emulated here")
    assert [str(w.message) for w in caught] == ["bf16 runs emulated here"]
