"""The package's structure: layers point one way, no import cycles, imports at the top of files,
every config key read, and one command-line dialect with errors that name the key."""
from __future__ import annotations

import ast
import configparser
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ivcr_jax import cli, experiment

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "ivcr_jax"


# ----------------------------------------------------------------------------- the import graph

def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[mod.removesuffix(".__init__")] = p
    return out


def _own_imports(path: Path, mod: str, modules) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of the package's own modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {ch: node for node in ast.walk(tree) for ch in ast.iter_child_nodes(node)}
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    here = here.rpartition(".")[0]
                base = here + ("." + base if base else "")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        hits = set()
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n and n != mod and n != "ivcr_jax":
                hits.add(n)
        if isinstance(node, ast.ImportFrom):  # `from a import b`: the most specific module
            hits = {h for h in hits if not any(o != h and o.startswith(h + ".") for o in hits)}
        local, p = False, node
        while p in parents:
            p = parents[p]
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local = True
                break
        out += [(h, node.lineno, local) for h in hits]
    return out


def _graph():
    modules = _modules()
    edges = {m: set() for m in modules}
    local = []
    for mod, path in modules.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line, is_local in _own_imports(path, mod, modules):
            edges[mod].add(target)
            if is_local:
                local.append((mod, line, lines[line - 2].strip() + " " + lines[line - 1].strip()))
    return edges, local


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _folder(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (PKG / parts[-1]).is_dir() else mod


def _ignored_imports() -> set[tuple[str, str]]:
    """The ``a -> b`` imports that .importlinter's contracts ignore (each with its reason there)."""
    cp = configparser.ConfigParser()
    cp.read(ROOT / ".importlinter")
    out = set()
    for section in cp.sections():
        for line in cp[section].get("ignore_imports", "").splitlines():
            if "->" in line:
                a, b = (x.strip() for x in line.split("->"))
                out.add((a, b))
    return out


def test_no_import_cycle_between_files_or_folders_function_local_imports_included():
    edges, _ = _graph()
    assert _cycles(edges) == []
    ignored = _ignored_imports()
    folders: dict[str, set[str]] = {}
    for a, targets in edges.items():
        for b in targets:
            fa, fb = _folder(a), _folder(b)
            if fa != fb and (a, b) not in ignored:
                folders.setdefault(fa, set()).add(fb)
    assert _cycles(folders) == []


def test_own_modules_are_imported_at_the_top_unless_a_comment_says_why():
    _, local = _graph()
    unexplained = [(m, line) for m, line, text in local if "# Lazy:" not in text and "# lazy:" not in text]
    assert not unexplained, f"function-local imports of the package's own modules: {unexplained}"


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is not installed")
def test_import_linter_contracts_hold():
    """The layers of .importlinter (programs > wiring > convert, retrieval > data, models > base)."""
    r = subprocess.run(["lint-imports", "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_a_lower_layer_importing_an_upper_one_is_caught(tmp_path):
    """The checks above can fail: a copy of the package where data/ imports the trainer breaks both."""
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed")
    copy = tmp_path / "ivcr_jax"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    bad = copy / "data" / "schema.py"
    bad.write_text(bad.read_text() + "\nfrom ivcr_jax.train import loop  # noqa: E402,F401\n")
    r = subprocess.run(["lint-imports", "--config", str(ROOT / ".importlinter")], cwd=tmp_path,
                       capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"
                                                            + ":" + str(Path(sys.executable).parent)})
    assert r.returncode != 0 and "ivcr_jax.data is not allowed to import ivcr_jax.train" in r.stdout, r.stdout[-2000:]


# ----------------------------------------------------------------------------- configs

CONFIGS = ("configs/paper.py", "configs/paper.py:tiny", "configs/paper.py:head64", "configs/paper.py:tiny,head64",
           "configs/demo.py")


@pytest.mark.parametrize("spec", CONFIGS)
def test_every_config_key_is_a_typed_field(spec):
    exp = experiment.Experiment.resolve(cli.load_config(spec))
    assert exp.pipeline(2).sample.tokens_per_window == exp.model.video_qformer.num_query_tokens


def test_every_typed_field_is_read_somewhere():
    """A field of the typed sections that no code reads is a dead config key."""
    # ``x.name`` or ``"name"`` (PipelineConfig.from_config reads data.* by name); a field's own
    # definition (``name: type``) matches neither.
    source = "\n".join(p.read_text(encoding="utf-8") for p in PKG.rglob("*.py"))
    classes = (experiment.TrainConfig, experiment.EvalConfig, experiment.InitConfig, experiment.DataConfig,
               experiment.MeshConfig)
    unread = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
              if not re.search(rf"\.{f.name}\b|[\"']{f.name}[\"']", source)]
    assert not unread, unread


def test_unknown_config_keys_are_errors_with_suggestions(tmp_path):
    with pytest.raises(cli.UsageError, match=r"train\.lrr.*did you mean train\.lr"):
        cli.resolve("configs/demo.py", ["train.lrr=1"])
    with pytest.raises(cli.UsageError, match="invalid literal"):
        cli.resolve("configs/demo.py", ["train.steps=many"])
    bad = tmp_path / "bad.py"
    bad.write_text("import ml_collections as mlc\nimport importlib.util, pathlib\n"
                   f"spec = importlib.util.spec_from_file_location('p', {str(ROOT / 'configs' / 'paper.py')!r})\n"
                   "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                   "def get_config(arg=''):\n    c = m.get_config('tiny')\n    c.train.eval_freq = 5\n    return c\n")
    with pytest.raises(cli.UsageError, match=r"config\.train\.eval_freq: the config has no such key"):
        experiment.Experiment.resolve(cli.load_config(str(bad)))
    with pytest.raises(cli.UsageError, match="ckpt_every must be positive"):
        experiment.Experiment.resolve(cli.resolve("configs/demo.py", ["train.ckpt_every=0"]))


# ----------------------------------------------------------------------------- the command lines

def _programs():
    from ivcr_jax import __main__ as demo, chat
    from ivcr_jax.app import __main__ as app
    from ivcr_jax.eval import __main__ as ev
    from ivcr_jax.data import prepare
    from ivcr_jax.retrieval import index, search, train as xtrain
    from ivcr_jax.train import __main__ as tr, plan
    return {"train": (tr.main, "configs/demo.py", ["--workdir", "w"]),
            "plan": (plan.main, "configs/paper.py:tiny", []),
            "eval": (ev.main, "configs/demo.py", []),
            "chat": (chat.main, "configs/demo.py", ["--corpus", "c"]),
            "app": (app.main, "configs/demo.py", ["--corpus", "c"]),
            "demo": (demo.main, "configs/demo.py", []),
            "data.prepare": (prepare.main, "configs/paper.py:tiny", ["--corpus", "c", "--out", "o"]),
            "retrieval.train": (xtrain.main, "configs/xpool.py:tiny", ["--index", "i", "--annotations", "a",
                                                                        "--workdir", "w"]),
            "retrieval.index": (index.main, "configs/xpool.py:tiny", ["--corpus", "c", "--out", "o"]),
            "retrieval.search": (search.main, "configs/xpool.py:tiny", ["--index", "i", "--annotations", "a",
                                                                         "--out", "o"])}


@pytest.mark.parametrize("name", sorted(_programs()))
def test_every_program_speaks_the_config_dialect(name, capsys):
    main, spec, required = _programs()[name]
    with pytest.raises(SystemExit) as e:
        main(["--config", spec, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config.seed=" in out, out[-500:]            # --help lists the config's fields
    with pytest.raises(SystemExit) as e:
        main(["--config", spec, "--config.seed=7", "--print_config"])
    assert e.value.code == 0 and "--config.seed=7" in capsys.readouterr().out
    assert main(["--config", spec, "--config.sed=1", *required]) == 2
    assert "--config.sed: the config has no such key (did you mean seed" in capsys.readouterr().err
