"""Run the walk-throughs of a Markdown document, as a reader would.

A walk-through is a ``##`` section of the document with ``console`` blocks.
Each line of a block that starts with ``$ `` is a shell command; the lines
after it, up to the next command or the end of the block, are what it
prints (its standard output and error together). Every block of a section
runs in one fresh directory, in order, with the ``fastfc`` of this checkout
first on ``PATH``, a terminal 100 columns wide and no colour.

What a line of expected output may say:

- ``...`` alone matches any number of lines (none too);
- ``...`` inside a line matches any text there;
- otherwise the line must be equal (trailing blanks aside);
- a last line ``[exit N]`` says the command exits with status N (else 0).

A command that ends with `` &`` runs in the background, as in a shell, until
the walk-through ends (then it gets SIGTERM and must exit 0); when it names
a ``--socket PATH``, the next command waits for that socket to exist (a
server that listens), as a reader waits for the server to start.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    command: str
    expected: list[str]
    line: int                       # where the command is in the document


@dataclass
class Walkthrough:
    title: str
    steps: list[Step] = field(default_factory=list)


def walkthroughs(text: str, page: str = "") -> list[Walkthrough]:
    """The walk-throughs of a Markdown text, in order (titled ``page: title``
    when ``page`` is given)."""
    out: list[Walkthrough] = []
    current: Walkthrough | None = None
    in_block = False
    for n, line in enumerate(text.splitlines(), 1):
        if not in_block and line.startswith("## "):
            current = Walkthrough(f"{page}: {line[3:].strip()}" if page else line[3:].strip())
            continue
        if line.startswith("```"):
            if in_block:
                in_block = False
            elif line.strip() == "```console":
                in_block = True
                if current is None:
                    raise ValueError(f"line {n}: a console block outside a ## section")
                if not out or out[-1] is not current:
                    out.append(current)
            continue
        if in_block:
            assert current is not None
            if line.startswith("$ "):
                current.steps.append(Step(line[2:], [], n))
            elif current.steps:
                current.steps[-1].expected.append(line)
            elif line.strip():
                raise ValueError(f"line {n}: output before any command")
    if in_block:
        raise ValueError("a console block is not closed")
    return out


def matches(expected: list[str], got: list[str]) -> bool:
    """Whether the lines ``got`` fit ``expected`` (see the module's doc)."""
    pats = [None if e.strip() == "..." else
            re.compile("".join(".*" if part == "..." else re.escape(part)
                               for part in re.split(r"(\.\.\.)", e.rstrip())) + r"\s*")
            for e in expected]

    def fit(i: int, j: int) -> bool:
        if i == len(pats):
            return j == len(got)
        if pats[i] is None:
            return any(fit(i + 1, k) for k in range(j, len(got) + 1))
        return j < len(got) and pats[i].fullmatch(got[j]) is not None and fit(i + 1, j + 1)

    return fit(0, 0)


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTFC_", "PYTEST", "COLUMNS", "LINES"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               COLUMNS="100", NO_COLOR="1", TERM="dumb", PYTHONPATH=str(ROOT))
    return env


def run(walk: Walkthrough, where: Path, timeout: float = 120.0) -> None:
    """Run ``walk`` in directory ``where``; AssertionError naming the first
    command whose output or status differs."""
    env = environment()
    background: list[tuple[Step, subprocess.Popen]] = []
    wait_for: Path | None = None
    try:
        for step in walk.steps:
            if wait_for is not None:
                deadline = time.monotonic() + 60
                while not wait_for.exists():
                    proc = background[-1][1]
                    assert proc.poll() is None, (
                        f"line {background[-1][0].line}: `{background[-1][0].command}` "
                        f"exited {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
                    assert time.monotonic() < deadline, f"{wait_for} never appeared"
                    time.sleep(0.05)
                wait_for = None
            command = step.command.rstrip()
            if command.endswith("&"):
                proc = subprocess.Popen(["bash", "-c", "exec " + command[:-1]], cwd=where,
                                        env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
                background.append((step, proc))
                words = shlex.split(command[:-1])
                if "--socket" in words:
                    wait_for = where / words[words.index("--socket") + 1]
                continue
            expected = list(step.expected)
            while expected and not expected[-1].strip():
                expected.pop()
            status = 0
            if expected and re.fullmatch(r"\[exit (\d+)\]", expected[-1].strip()):
                status = int(expected.pop().strip()[6:-1])
            r = subprocess.run(["bash", "-c", command], cwd=where, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=timeout)
            got = r.stdout.rstrip("\n").split("\n") if r.stdout.strip() else []
            assert r.returncode == status and matches(expected, got), (
                f"line {step.line}: `{command}` exited {r.returncode} (the document says "
                f"{status}) and printed:\n" + "\n".join(got)
                + "\n--- the document expects:\n" + "\n".join(expected))
    finally:
        for step, proc in reversed(background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise AssertionError(f"line {step.line}: `{step.command}` did not stop "
                                     "on SIGTERM") from None
            if code != 0:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"line {step.line}: `{step.command}` exited {code}:\n"
                                     f"{out}")
