"""What every command of this project shares, so each tool's file can start with its own idea:

- argument parsing: a mistake is one line naming the flag, what it allows and what was given
  (argparse's usage block would bury it), and numeric flags check their range when parsed;
- finding an input: a local directory as is, otherwise a Hugging Face Hub id downloaded into the
  local cache, with an error that says both why the path is missing and what the Hub answered;
- writing outputs so that an interrupted run (Ctrl-C, a full disk) never leaves a half-written one
  where a finished one is expected: write beside it, then rename into place;
- the user's mistakes: `UserError`, which every command prints as one line and exits USER_ERROR with.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TextIO

USER_ERROR = 2  # the exit status of every command for a mistake the user can fix (argparse's own)


class UserError(Exception):
    """A problem the user can fix (a missing file, a bad setting, an arm that does not answer): the
    command lines print its message in one line, without a traceback, and exit with USER_ERROR."""

def gl_problem(err: BaseException) -> str:
    """One line saying what to install when MuJoCo cannot render headless (the simulators' worlds)."""
    backend = os.environ.get("MUJOCO_GL", "")
    hint = {"egl": "libEGL (Debian/Ubuntu: apt install libegl1 libgl1-mesa-dri)",
            "osmesa": "OSMesa (Debian/Ubuntu: apt install libosmesa6)"}.get(
        backend, "libEGL and set MUJOCO_GL=egl (or OSMesa and MUJOCO_GL=osmesa)")
    last = str(err).strip().splitlines()[-1] if str(err).strip() else ""
    return f"MuJoCo cannot render with MUJOCO_GL={backend or '(unset)'} ({type(err).__name__}: {last}); install {hint}"


def print_live(line: str, end: bool = False, stream: TextIO | None = None) -> None:
    """A status line rewritten in place on a terminal (`end`: then kept, and the next starts below);
    in a log (not a terminal) every call is a plain line, so callers print there only what a log
    should keep. Standard error unless `stream`."""
    stream = stream or sys.stderr
    if stream.isatty():
        stream.write("\r" + line + "\x1b[K" + ("\n" if end else ""))
    else:
        stream.write(line + "\n")
    stream.flush()

# ---------------------------------------------------------------------------------------------
# Argument parsing


class Parser(argparse.ArgumentParser):
    """One line per mistake and argparse's exit status (USER_ERROR)."""

    def error(self, message: str):
        self.exit(USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends a flag's default unless it is empty or the help
    already speaks of it (which also keeps a token taken from the environment out of --help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, [], "", argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def _bounded(kind: type, noun: str, minimum: float | None, maximum: float | None,
             above: float | None, below: float | None) -> Callable[[str], float]:
    spec = "d" if kind is int else "g"  # an integer bound in full (2**32 - 1, not 4.29497e+09)
    if minimum is not None and maximum is not None:
        allowed = f"{noun} from {minimum:{spec}} to {maximum:{spec}}"
    else:
        parts = [f"{op} {value:{spec}}" for op, value in ((">=", minimum), (">", above), ("<=", maximum), ("<", below))
                 if value is not None]
        allowed = f"{noun} {' and '.join(parts)}" if parts else noun

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
        if (not math.isfinite(value) or (minimum is not None and value < minimum)
                or (maximum is not None and value > maximum) or (above is not None and value <= above)
                or (below is not None and value >= below)):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum] (either end may be open)."""
    return _bounded(int, "an integer", minimum, maximum, None, None)


def number(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
           below: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite float in [minimum, maximum], or (above, below) for open ends."""
    return _bounded(float, "a number", minimum, maximum, above, below)


# ---------------------------------------------------------------------------------------------
# Finding an input: a local directory or a Hub id


def looks_like_hub_id(name: str) -> bool:
    """'owner/name', and not a path that starts like one (absolute, ./, ~)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def similar_directories(path: Path) -> str:
    """' (did you mean outputs/demo?)' for a missing path whose parent holds a directory of a similar
    name: a mistyped 'outputs/demo_datset' has the shape of a Hub id and would otherwise only fail there."""
    try:
        siblings = [child.name for child in path.parent.iterdir() if child.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(str(path.parent / name) for name in close)}?)" if close else ""


def resolve_dir(repo_id_or_dir: str | os.PathLike, what: str, repo_type: str = "model",
                allow_patterns: list[str] | None = None, revision: str | None = None,
                error: type[Exception] = FileNotFoundError) -> Path:
    """A local directory as is, or a Hugging Face Hub repository (model or dataset) downloaded into the
    local cache (or found there). Raises `error` naming what was looked for, where, and the Hub's answer."""
    path = Path(repo_id_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise error(f"{what}: {path} is a file, not a directory")
    text = str(repo_id_or_dir)
    missing = f"{what}: no such local directory: {path.absolute()}{similar_directories(path)}"
    if not looks_like_hub_id(text):
        raise error(f"{missing} (and {text!r} is not a Hub id of the form 'owner/name')")
    from huggingface_hub import snapshot_download  # only when a download is needed

    try:
        return Path(snapshot_download(text, repo_type=repo_type, allow_patterns=allow_patterns, revision=revision))
    except Exception as err:  # network, auth, unknown repo: all mean "not available here"
        reason = " ".join(str(err).split())  # the Hub client's messages run over several lines
        raise error(f"{missing}; and the Hugging Face Hub could not provide {repo_type} {text!r} "
                    f"(revision {revision or 'main'}): {type(err).__name__}: {reason}") from err


# ---------------------------------------------------------------------------------------------
# Writing outputs atomically


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under root (and root) to disk."""
    for path in sorted(root.rglob("*")) + [root]:
        if path.is_file() or path.is_dir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextmanager
def writing_dir(final: Path, partial: Path | None = None, durable: bool = False) -> Iterator[Path]:
    """Yields an empty directory beside `final` (`<final>.partial` unless named) to write into; when
    the block finishes it replaces `final` (an existing one is removed only after the new one is in
    place); when the block raises it is removed and `final` is left as it was. `durable` flushes the
    files to disk before the rename, for what must survive a power cut (checkpoints)."""
    final = Path(final)
    partial = Path(partial) if partial is not None else final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted earlier run
    partial.mkdir(parents=True)
    try:
        yield partial
        if durable:
            fsync_tree(partial)
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            final.rename(old)
            partial.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> Path:
    """Write a small text file through a temporary name and os.replace, so readers see the old file or
    the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
