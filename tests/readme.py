"""The README as the tests read it: its sections and the code blocks in
them, copied out verbatim, so that a test follows the text a person
follows."""

import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
SERVING = re.compile(r"piccolo serving CoAP on \[([^\]]*)\]:(\d+)")


def text():
    with open(README, encoding="utf-8") as f:
        return f.read()


def section(title):
    """The text under the heading ``title`` (any level), up to the next
    heading of the same or a higher level."""
    lines = text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = re.match(r"(#+) (.*)", line)
        if m and m.group(2).strip() == title:
            level = len(m.group(1))
            out = []
            for follow in lines[i + 1:]:
                n = re.match(r"(#+) ", follow)
                if n and len(n.group(1)) <= level:
                    break
                out.append(follow)
            return "".join(out)
    raise AssertionError(f"README has no section {title!r}")


def blocks(body):
    """The indented (4-space) code blocks of ``body``, each as its text with
    the indentation removed (fenced blocks are not included)."""
    found, current, fenced = [], [], False
    for line in body.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("    ") or (current and not line.strip()):
            current.append(line[4:] if line.startswith("    ") else "\n")
            continue
        if current:
            found.append("".join(current).rstrip("\n") + "\n")
            current = []
    if current:
        found.append("".join(current).rstrip("\n") + "\n")
    return found


def paragraphs(block):
    """A code block's parts between blank lines (a command and its output,
    two files shown together)."""
    return [p.strip("\n") + "\n" for p in block.split("\n\n") if p.strip()]


def block_starting(body, first_line):
    """The one code block (or part of one, between blank lines) of ``body``
    whose first line is ``first_line``."""
    matches = [p for b in blocks(body) for p in paragraphs(b)
               if p.splitlines()[0] == first_line]
    assert len(matches) == 1, (first_line, len(matches))
    return matches[0]


def strip_comment(line):
    """A shell line without its comment (a ``#`` after a blank, outside
    quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            if c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def commands(block):
    """The commands of a shell block: one per line, comments dropped
    (a line that continues a comment is dropped too)."""
    return [c for c in (strip_comment(line) for line in block.splitlines()) if c.strip()]


class Server:
    """A server process started by a README command; ``port`` is read from
    its start-up line (the commands here give ``--port 0``)."""

    def __init__(self, argv, log_path, env=None, cwd=None, timeout=60.0, out_path=None):
        self.log_path = log_path
        self.out_path = out_path or log_path + ".stdout"
        environment = dict(os.environ, GPIOZERO_PIN_FACTORY="mock")
        environment.update(env or {})
        if "piccolo" in argv and not any(a.startswith("--web") for a in argv):
            # the web page off unless the test names its port: never the
            # default 8080, which tests running in parallel would share
            argv = list(argv) + ["--web", "0"]
        self.out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT,
                                     env=environment, cwd=cwd)
        self.port = self._wait_serving(timeout)

    def log(self):
        text = ""
        for path in (self.log_path, self.out_path):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f.read()
        return text

    def _wait_serving(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = SERVING.search(self.log())
            if m:
                return int(m.group(2))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"the server did not start serving:\n{self.log()[-3000:]}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


def venv_bin(name):
    """A console script of the environment the tests run in."""
    return os.path.join(os.path.dirname(os.path.abspath(sys.executable)), name)
