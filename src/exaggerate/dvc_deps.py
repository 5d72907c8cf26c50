"""The code each DVC stage depends on, derived from the imports, so that dvc.yaml stays correct.

`exaggerate stage NAME` runs the package's entry modules (cli, errors, stages and what stages
imports at its top) and the stage's function in stages.py, whose imports are made inside it or
inside the stages.py helpers it calls. A stage's code is the import closure of all those,
counting every import a module makes anywhere (at its top or inside a function): a superset of
what a run executes, never less. `python -m exaggerate.dvc_deps` compares dvc.yaml with it
(exit 1 on a difference); `--write` rewrites the code lines of each stage's deps first.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path
from typing import Callable

PACKAGE = "exaggerate"
SRC = Path(__file__).resolve().parent
ENTRY = ("__init__", "__main__", "cli", "errors", "stages")


def _imported(tree: ast.AST, nodes=None) -> set[str]:
    """Package modules imported by the given nodes (default: anywhere in the tree)."""
    found: set[str] = set()
    for node in ast.walk(tree) if nodes is None else (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base.split(".")[0] == PACKAGE:
                mod = base.split(".")[-1] if base and base != PACKAGE else ""
                found |= {mod} if mod else {a.name for a in node.names if (SRC / f"{a.name}.py").is_file()}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(PACKAGE + ".")}
    return {m for m in found if (SRC / f"{m}.py").is_file()}


def module_closure(modules: set[str]) -> set[str]:
    todo, seen = list(modules), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += _imported(ast.parse((SRC / f"{m}.py").read_text()))
    return seen


def _top_level(tree: ast.Module) -> set[str]:
    return _imported(tree, [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))])


def _stage_functions(stages_tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in stages_tree.body if isinstance(n, ast.FunctionDef)}


def _entry_modules(cli_functions: tuple[str, ...]) -> set[str]:
    """What the entry modules import at top level, and the given cli.py functions (a command's)."""
    entry: set[str] = set()
    for name in ("__init__", "__main__", "errors"):
        entry |= _top_level(ast.parse((SRC / f"{name}.py").read_text()))
    cli = ast.parse((SRC / "cli.py").read_text())
    return entry | _top_level(cli) | _imported(cli, [_stage_functions(cli)[f] for f in (*cli_functions, "main")])


def command_code_deps(cli_functions: tuple[str, ...]) -> list[str]:
    """src/ paths the `exaggerate` command run by these cli.py functions can import (the entry
    modules counted shallowly, as for the stages): the code deps of a stage that runs it."""
    entry = _entry_modules(cli_functions) | _top_level(ast.parse((SRC / "stages.py").read_text()))
    modules = set(ENTRY) | module_closure(entry - set(ENTRY))
    return sorted(f"src/{PACKAGE}/{m}.py" for m in modules)


def stage_modules(stage: str) -> set[str]:
    """The package modules `exaggerate stage <stage>` can import."""
    tree = ast.parse((SRC / "stages.py").read_text())
    functions = _stage_functions(tree)
    if stage not in functions:
        raise KeyError(f"no stage function {stage!r} in stages.py")
    # The entry modules count shallowly: their top-level imports, and for cli the functions the
    # `stage` command runs; their other functions import what other commands need.
    entry = _top_level(tree) | _entry_modules(("_stage",))
    reached, todo = set(), [stage]
    while todo:  # the stage function and the stages.py helpers it calls
        fn = functions[todo.pop()]
        if fn.name in reached:
            continue
        reached.add(fn.name)
        todo += [n.func.id for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                 and n.func.id in functions and n.func.id not in reached]
    inner = _imported(tree, [functions[name] for name in reached])
    return set(ENTRY) | module_closure((entry | inner) - set(ENTRY))


def stage_code_deps(stage: str) -> list[str]:
    return sorted(f"src/{PACKAGE}/{m}.py" for m in stage_modules(stage))


# audit/dvc.yaml's stages run `exaggerate audit <command>`: the cli.py function of each.
AUDIT_COMMANDS = {"attributes": ("_audit_attributes",), "confounder_classifier": ("_audit_confounder", "_confounder_train"),
                  "confounder_explainer": ("_audit_confounder", "_confounder_train"),
                  "confounder_report": ("_audit_confounder", "_confounder_report")}


def audit_code_deps(stage: str) -> list[str]:
    return command_code_deps(AUDIT_COMMANDS[stage])


def code_deps_for(dvc_yaml: Path) -> Callable[[str], list[str]]:
    """How the stages of this dvc.yaml derive their code deps."""
    return audit_code_deps if Path(dvc_yaml).parent.name == "audit" else stage_code_deps


def check(dvc_yaml: Path) -> list[str]:
    """Differences between dvc.yaml's code deps and the derived ones, one line each."""
    import yaml

    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    deps_of = code_deps_for(dvc_yaml)
    problems = []
    for name, spec in stages.items():
        spec = spec.get("do", spec)  # foreach / matrix stages
        listed = {d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith(f"src/{PACKAGE}")}
        wanted = set(deps_of(name))
        for d in sorted(wanted - listed):
            problems.append(f"{dvc_yaml}: stage {name} imports {d} but does not list it in deps")
        for d in sorted(listed - wanted):
            problems.append(f"{dvc_yaml}: stage {name} lists {d} in deps but never imports it")
    return problems


def write(dvc_yaml: Path) -> None:
    """Replace each stage's src/ deps lines by the derived list (other lines untouched)."""
    lines, out, stage = dvc_yaml.read_text().splitlines(), [], None
    deps_of = code_deps_for(dvc_yaml)
    code_line = re.compile(rf"^(\s+)- src/{PACKAGE}/\S+$")
    for i, line in enumerate(lines):
        m = re.match(r"^  (\w+):\s*$", line)
        if m:
            stage = m.group(1)
        cm = code_line.match(line)
        if cm:
            if not code_line.match(lines[i - 1]):  # the first code line of a block
                out += [f"{cm.group(1)}- {d}" for d in deps_of(stage)]
            continue
        out.append(line)
    dvc_yaml.write_text("\n".join(out) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dvc_yaml", nargs="?", default="dvc.yaml")
    ap.add_argument("--write", action="store_true", help="rewrite the code deps instead of checking them")
    args = ap.parse_args(argv)
    if args.write:
        write(Path(args.dvc_yaml))
    problems = check(Path(args.dvc_yaml))
    print("\n".join(problems) or f"{args.dvc_yaml}: every stage lists exactly the code it imports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
