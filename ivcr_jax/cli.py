"""The one command-line dialect of every ``python -m ivcr_jax...`` program.

    --config configs/<file>.py[:arg]  [--config.key=value ...]  [program flags]  [--print_config]

The config is an ml_collections ``get_config(arg)`` file; overrides go through ml_collections'
``config_flags`` (typed: ``--config.train.lr=1e-4``, ``--config.data.text_buckets="(256, 512)"``).
A key the config does not have is an error naming it, with the closest existing keys. A
program's own flags (``--workdir``, ``--checkpoint`` ...) are ordinary ``argparse`` options;
``--help`` lists them and, when ``--config`` is given, every config field with its value;
``--print_config`` prints the resolved config (after overrides) and exits.

A relative config path that does not exist from the working directory is looked up in the
repository's ``configs/`` parent (so ``configs/demo.py`` works from anywhere in a source checkout).
A key given twice takes its last value (a tuple too: ``--config.data.text_buckets`` twice is not
concatenated), as argparse options do.

Errors (:func:`run`): a :class:`UsageError` or another known error of the program (a bad file,
record, checkpoint) prints one line ``error: ...`` on stderr and exits 2; ``--debug`` (or
``IVCR_DEBUG=1``) prints its traceback too. Any other exception is a bug and keeps its traceback.
Control characters in a message (from a data file, say) are printed escaped (:func:`printable`).
"""
from __future__ import annotations

import argparse
import difflib
import errno
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

_REPO = Path(__file__).resolve().parent.parent


class UsageError(ValueError):
    """A bad command line or config value: printed as one line, exit status 2."""


def output_dir(path: str | Path, what: str) -> Path:
    """Create the output directory ``path`` (``what``: the flag naming it), or one line saying why not."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise UsageError(f"{what} {d}: exists and is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {d}: cannot be created ({e.strerror or e})") from None
    return d


# C0 and C1 control characters (newline and tab kept) and the bidirectional overrides: text from a
# data file or a model printed to a terminal must not move the cursor, recolour it or reorder a line.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object, *, newlines: bool = True) -> str:
    """``str(text)`` with control characters escaped as ``\\xNN`` / ``\\uNNNN`` (``newlines=False``:
    ``\\n`` and ``\\t`` too, for text that must stay on one line)."""
    def esc(m: re.Match) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"
    s = _CONTROL.sub(esc, str(text))
    return s if newlines else s.replace("\n", "\\n").replace("\t", "\\t")


def config_path(spec: str) -> tuple[Path, str]:
    """``path[:arg]`` → (an existing config file, arg)."""
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (_REPO / path).is_file():
        p = _REPO / path
    if not p.is_file():
        raise UsageError(f"--config {spec}: no such config file")
    return p, arg


def leaf_paths(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 3e-5, ...}`` for every leaf of a ConfigDict (tuples are leaves)."""
    out = {}
    items = node.items() if isinstance(node, (ConfigDict, dict)) else ()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (ConfigDict, dict)):
            out.update(leaf_paths(v, key))
        else:
            out[key] = v
    return out


def unknown_key_message(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    if not close:  # a misspelt section: compare the last component within all sections
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], cutoff=0.75)][:3]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"--config.{key}: the config has no such key{hint}"


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ConfigDict:
    """Load ``configs/<file>.py[:arg]`` outside a command line (tests, notebooks, tools).

    ``overrides`` (``{"train.lr": 1e-4}``) must name existing keys; values replace them as given.
    """
    p, arg = config_path(spec)
    mod_spec = importlib.util.spec_from_file_location(f"ivcr_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
        cfg = mod.get_config(arg) if arg else mod.get_config()
    except (ValueError, KeyError, TypeError, AttributeError, SyntaxError, ImportError) as e:
        raise UsageError(f"--config {spec}: {type(e).__name__}: {e}") from None
    known = leaf_paths(cfg)
    for k, v in (overrides or {}).items():
        if k not in known:
            raise UsageError(unknown_key_message(k, known))
        node = cfg
        *parents, leaf = k.split(".")
        for q in parents:
            node = node[q]
        node[leaf] = v
    return cfg


def _split_argv(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(the program's own arguments, the ``--config`` spec, the ``key=value`` overrides)."""
    own, spec, overrides = [], None, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or (a.startswith("--config.") and "=" not in a):
            if i + 1 >= len(argv):
                raise UsageError(f"{a} needs a value")
            value, i = argv[i + 1], i + 1
        elif a.startswith("--config=") or a.startswith("--config."):
            a, value = a.split("=", 1)
        else:
            own.append(a)
            i += 1
            continue
        if a == "--config":
            spec = value
        else:
            overrides.append(f"{a[len('--config.'):]}={value}")
        i += 1
    return own, spec, overrides


def config_overrides(argv: Sequence[str]) -> list[str]:
    """The ``key=value`` overrides of a command line (``--config.k=v`` and ``--config.k v``), each key
    once at its last value: what a program passes on to the programs it runs."""
    return last_wins(_split_argv(argv)[2])


def describe_config(cfg: ConfigDict) -> str:
    return "\n".join(f"  --config.{k}={v!r}" for k, v in leaf_paths(cfg).items())


def parse(argv: Sequence[str] | None, parser: argparse.ArgumentParser, *, default_config: str | None = None,
          config_required: bool = True) -> tuple[ConfigDict | None, argparse.Namespace]:
    """Parse a program's command line: ``(config, args)``.

    Raises :class:`UsageError` (one line) for a missing or unknown config file or key, or a value of
    the wrong type; ``--help`` and ``--print_config`` print and raise ``SystemExit(0)``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, spec, overrides = _split_argv(argv)
    _STATE["debug"] = _STATE["debug"] or "--debug" in own
    spec = spec or default_config
    parser.add_argument("--config", metavar="FILE.py[:ARG]", default=default_config,
                        help="experiment config (ml_collections get_config(arg) file)"
                             + (f"; default {default_config}" if default_config else "")
                             + ". Override any field with --config.KEY=VALUE")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' INFO logs (Orbax, absl)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print its traceback as well as the one-line message")
    _one_line_errors(parser)
    if any(a in ("-h", "--help") for a in own):
        if spec:
            try:
                parser.epilog = ((parser.epilog or "") + f"\n\nconfig fields of {spec}:\n"
                                 + describe_config(load_config(spec)))
            except Exception as e:  # noqa: BLE001 - help must print whatever the config does
                parser.epilog = (parser.epilog or "") + f"\n\n(config {spec} could not be loaded: {e})"
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.parse_args(own)  # prints help, exits 0
    if "--print_config" in own:  # before the program's own required flags are checked
        if spec is None:
            raise UsageError("--print_config needs --config FILE.py")
        print(f"# {spec}")
        print(describe_config(resolve(spec, overrides)))
        raise SystemExit(0)
    args = parser.parse_args(own)
    set_verbosity(args.verbose)
    if spec is None:
        if config_required:
            raise UsageError("--config FILE.py[:ARG] is required")
        if overrides:
            raise UsageError("--config.KEY=VALUE overrides need --config FILE.py")
        return None, args
    config = resolve(spec, overrides)
    args.config = spec
    return config, args


def set_verbosity(verbose: bool) -> None:
    """Library INFO logs (Orbax's checkpoint chatter goes through absl) only with ``--verbose``."""
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)


def resolve(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Load ``spec`` and apply ``key=value`` overrides through ml_collections' config_flags
    (values parsed by the type of the field they replace); the result is locked."""
    path, arg = config_path(spec)
    known = leaf_paths(load_config(spec))
    overrides = last_wins(overrides)
    for item in overrides:
        key = item.split("=", 1)[0]
        if key not in known and not any(k.startswith(key + ".") for k in known):
            raise UsageError(unknown_key_message(key, known))
    tokens = [f"--config.{item}" for item in overrides]
    argv = ["prog", f"--config={path}{':' + arg if arg else ''}", *tokens]
    fv = flags.FlagValues()
    try:
        # config_flags defines the override flags it finds in ``sys_argv`` (default: sys.argv).
        holder = config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                                 lock_config=True, sys_argv=argv)
        fv(argv)
        return holder.value
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        what = " ".join(tokens) or f"--config {spec}"
        raise UsageError(f"{what}: {str(e).splitlines()[0]}") from None


def last_wins(overrides: Sequence[str]) -> list[str]:
    """``key=value`` overrides with each key once, at its last value (in the order of those last
    values). config_flags would concatenate a tuple given twice: ``(1024,)`` then ``(512, 1024)``
    became ``(1024, 512, 1024)``."""
    last: dict[str, str] = {}
    for item in overrides:
        key = item.split("=", 1)[0]
        last.pop(key, None)
        last[key] = item
    return list(last.values())


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse's own errors (a missing or unknown option, a bad value) as :class:`UsageError`:
    one line, not the usage block, and the same exit status 2."""
    def error(message: str):
        raise UsageError(f"{message} (see {parser.prog} --help)")
    for p in [parser, *(a for act in parser._actions if isinstance(act, argparse._SubParsersAction)
                        for a in act.choices.values())]:
        p.error = error  # type: ignore[method-assign]


_STATE = {"debug": False}
# OSErrors that are the user's to fix (a path, a permission, a full disk); others are bugs.
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EEXIST, errno.EISDIR, errno.ENOTDIR,
                errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG}


def is_user_error(e: BaseException, known: Sequence[type] = ()) -> bool:
    """Whether ``e`` is one :func:`run` prints as one line: a :class:`UsageError`, one of ``known``,
    or an ``OSError`` about a path, a permission or a full disk (our own ``FileNotFoundError``s,
    which carry no errno, name the path)."""
    if isinstance(e, (UsageError, *known)):
        return True
    # A FileNotFoundError raised by our own code names the path in its message (no errno).
    return isinstance(e, OSError) and (e.errno in _USER_ERRNOS or (isinstance(e, FileNotFoundError)
                                                                   and e.errno is None))


def run(main: Callable[[], int], *, known: Sequence[type] = ()) -> int:
    """Run a program's body. A :class:`UsageError`, an error of ``known`` (the program's errors
    that name what is wrong: a checkpoint, a record, a file) or an OSError about a path or a full
    disk becomes one line ``error: ...`` on stderr and exit status 2 (with ``--debug`` or
    ``IVCR_DEBUG=1`` its traceback is printed first); Ctrl-C exits 130 with one line. Any other
    exception propagates with its traceback: it is a bug to report."""
    _STATE["debug"] = os.environ.get("IVCR_DEBUG", "") not in ("", "0")
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        if _STATE["debug"]:
            traceback.print_exc()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if not is_user_error(e, known):
            raise
        if _STATE["debug"]:
            traceback.print_exc()
        print(f"error: {printable(e)}", file=sys.stderr, flush=True)
        return 2
