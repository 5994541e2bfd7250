"""Load a ``configs/<file>.py[:arg]`` config outside absl flags (tests, tools)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def load_config(spec: str, overrides: dict | None = None):
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        root = Path(__file__).resolve().parent.parent
        if (root / path).is_file():
            p = root / path
        else:
            raise FileNotFoundError(f"{path}: no such config file")
    mod_spec = importlib.util.spec_from_file_location(f"ivcr_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    cfg = mod.get_config(arg) if arg else mod.get_config()
    for k, v in (overrides or {}).items():
        node = cfg
        *parents, leaf = k.split(".")
        for q in parents:
            node = node[q]
        node[leaf] = v
    return cfg
