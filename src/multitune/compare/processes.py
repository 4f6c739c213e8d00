"""Each training of a comparison in its own process (its wall time and peak memory are its own), with its
progress on stderr: which model trains (k of n) and an estimate of the time left."""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from multitune.config import Config, dump_config
from multitune.core.files import write_text
from multitune.errors import MultitunError


def _train_subprocess(config: Config, folder: Path, live: bool = False) -> tuple[Path, float]:
    """Train `config` in a fresh process; (its run dir, wall seconds). `live`: the training's stderr (its bars)
    goes to ours through a pseudo-terminal, so it draws as on a terminal; else it is kept for an error."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.run.name}.yaml"
    write_text(path, dump_config(config))
    command = [sys.executable, "-m", "multitune", "train", str(path), f"training.progress={str(live).lower()}"]
    started = time.perf_counter()
    returncode, stdout, stderr = _run_live(command) if live else _run_captured(command)
    seconds = time.perf_counter() - started
    if returncode != 0:
        lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
        raise MultitunError(f"training '{config.run.name}' failed: {(lines or ['no message'])[-1]}")
    run_dir = next(Path(line[len("saved to ") :]) for line in stdout.splitlines() if line.startswith("saved to "))
    return run_dir, seconds


def _run_captured(command: list[str]) -> tuple[int, str, str]:
    result = subprocess.run(command, capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


def _run_live(command: list[str]) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal whose output is copied to our stderr as it comes (and kept);
    stdout is captured. Where there are no pseudo-terminals, stderr is captured instead."""
    try:
        import fcntl
        import pty
        import shutil
        import struct
        import termios

        reader, writer = pty.openpty()
        size = shutil.get_terminal_size()  # a new pseudo-terminal is 0 columns wide: bars would draw empty
        fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", size.lines, size.columns, 0, 0))
    except (ImportError, OSError):
        return _run_captured(command)
    kept: list[str] = []

    def copy() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        while True:
            try:
                data = os.read(reader, 4096)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            text = decoder.decode(data)
            kept.append(text)
            sys.stderr.write(text)
            sys.stderr.flush()

    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=writer, text=True) as child:
        os.close(writer)
        copier = threading.Thread(target=copy, daemon=True)
        copier.start()
        stdout, _ = child.communicate()
        copier.join()
    os.close(reader)
    return child.returncode, stdout, "".join(kept)


class Progress:
    """`compare: [k/n] what` lines on stderr, each with an estimate of the time left: the seconds per step
    of the trainings so far, times the steps still to train."""

    def __init__(self, total: int, steps_left: int) -> None:
        self.total, self.done, self.steps_left = total, 0, steps_left
        self.seconds, self.steps = 0.0, 0

    def start(self, what: str, steps: int) -> None:
        self.done += 1
        left = ""
        if self.steps:
            estimate = self.seconds / self.steps * self.steps_left
            left = f"; about {_duration(estimate)} left in all"
        print(f"compare: [{self.done}/{self.total}] {what}, {steps} steps{left}", file=sys.stderr, flush=True)

    def finished(self, steps: int, seconds: float) -> None:
        self.seconds, self.steps, self.steps_left = self.seconds + seconds, self.steps + steps, self.steps_left - steps
        print(f"compare: [{self.done}/{self.total}] trained in {_duration(seconds)}", file=sys.stderr, flush=True)

    def cached(self, what: str) -> None:
        self.done += 1
        print(f"compare: [{self.done}/{self.total}] {what}: reused from the cache", file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
