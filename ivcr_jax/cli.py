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
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import ConfigDict, config_flags

_REPO = Path(__file__).resolve().parent.parent


class UsageError(ValueError):
    """A bad command line or config value: printed as one line, exit status 2."""


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
    spec = spec or default_config
    parser.add_argument("--config", metavar="FILE.py[:ARG]", default=default_config,
                        help="experiment config (ml_collections get_config(arg) file)"
                             + (f"; default {default_config}" if default_config else "")
                             + ". Override any field with --config.KEY=VALUE")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' INFO logs (Orbax, absl)")
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


def run(main: Callable[[], int]) -> int:
    """Run a program's body; a :class:`UsageError` becomes one line on stderr and exit 2."""
    try:
        return int(main() or 0)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
