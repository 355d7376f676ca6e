"""The package's layers only import in the allowed directions (docs/architecture.md, "Allowed arrows").

Every module under src/mmbridge is parsed with `ast`; every import counts, wherever it stands (top
level, inside a function, under `if TYPE_CHECKING`), and relative imports are resolved. An import of
`a.b.c` also counts as an import of `a.b` and `a`, so a rule on `mmbridge.modeling` covers
`from mmbridge.modeling.qformer import …`.

`__main__.py` files are launch shims (`python -m mmbridge.train` runs `mmbridge train`): they belong to
the command layer wherever they sit, so the rules for their package do not apply to them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "mmbridge"

# (importing layer, layers it must never import). A layer is a module or package prefix: the rule for
# "mmbridge.eval" covers mmbridge/eval.py or mmbridge/eval/**; one for "diffusers" covers diffusers.*.
FORBIDDEN_ARROWS: list[tuple[str, tuple[str, ...]]] = [
    ("mmbridge.config", ("mmbridge.modeling", "diffusers")),
    ("mmbridge.processing", ("mmbridge.modeling",)),
    ("mmbridge.modeling", ("mmbridge.generation", "mmbridge.serve", "mmbridge.train", "mmbridge.commands",
                           "mmbridge.cli", "mmbridge.recipes", "mmbridge.pretrain")),
    ("mmbridge.modeling.draw", ("mmbridge.modeling.act",)),  # act may use draw ([GEN] / [EDIT]), not back
    ("mmbridge.eval", ("mmbridge.pretrain", "mmbridge.train", "mmbridge.recipes")),
    ("mmbridge.evaluate", ("mmbridge.pretrain", "mmbridge.train", "mmbridge.recipes")),
    ("mmbridge.evaluate_act", ("mmbridge.pretrain", "mmbridge.train", "mmbridge.recipes")),
    ("mmbridge.evaluate_all", ("mmbridge.pretrain", "mmbridge.train", "mmbridge.recipes")),
    ("mmbridge.testing", ("mmbridge.pretrain", "mmbridge.train", "mmbridge.recipes")),
    # pretrain and recipes build on train, so train importing them would be a loop.
    ("mmbridge.train", ("mmbridge.recipes", "mmbridge.pretrain", "mmbridge.commands", "mmbridge.cli")),
]

# Arrows that exist today only because the file that has them is being rewritten, as
# (file under src/, imported module), e.g. ("mmbridge/processing.py", "mmbridge.modeling.qformer").
# TEMP — to be removed by the heads-core work; keep it empty. `test_known_violations_still_exist`
# fails when an entry's arrow is gone, so the list can only shrink.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    return _parse_imports(path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py")


def _parse_imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, imported module) for every import in `source`, relative ones resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from mmbridge import modeling` imports the submodule mmbridge.modeling.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def _within(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


def _violations() -> list[tuple[str, int, str, str]]:
    """(file, line, imported module, rule's forbidden layer) for every import against the table."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__main__.py":
            continue  # launch shim: part of the command layer (module docstring)
        module = _module_name(path)
        rules = [(layer, banned) for layer, banned in FORBIDDEN_ARROWS if _within(module, layer)]
        if not rules:
            continue
        for line, target in _imports(path):
            for layer, banned in rules:
                for forbidden in banned:
                    if _within(target, forbidden) and not _within(target, layer):
                        out.append((path.relative_to(SRC).as_posix(), line, target, f"{layer} -> {forbidden}"))
    # `from a.b import c` yields both a.b and a.b.c: report each file:line:rule once.
    unique = {}
    for file, line, target, rule in out:
        unique.setdefault((file, line, rule), (file, line, target, rule))
    return sorted(unique.values())


def test_every_rule_names_a_layer_that_exists_or_is_planned():
    # A typo in the table would silently allow everything; the planned layers are in docs/architecture.md.
    planned = {"mmbridge.eval", "mmbridge.modeling.draw", "mmbridge.modeling.act"}
    for layer, _ in FORBIDDEN_ARROWS:
        rel = Path(*layer.split("."))
        exists = (SRC / rel).is_dir() or (SRC / rel).with_suffix(".py").is_file()
        assert exists or layer in planned, f"FORBIDDEN_ARROWS names {layer!r}, which is neither a module nor planned"


def test_imports_only_follow_allowed_arrows():
    new = [v for v in _violations() if (v[0], v[2]) not in KNOWN_VIOLATIONS]
    if new:
        lines = "\n".join(f"  src/{file}:{line}: imports {target}  (forbidden: {rule})"
                          for file, line, target, rule in new)
        pytest.fail(f"{len(new)} import(s) point the wrong way (see docs/architecture.md):\n{lines}",
                    pytrace=False)


def test_known_violations_still_exist():
    current = {(file, target) for file, _, target, _ in _violations()}
    fixed = sorted(KNOWN_VIOLATIONS - current)
    assert not fixed, f"these arrows are gone — remove them from KNOWN_VIOLATIONS: {fixed}"


def test_the_checker_sees_late_and_relative_imports():
    source = ("import diffusers\n"
              "def f():\n"
              "    from .modeling.qformer import QFormer\n"
              "    from .. import serve\n")
    found = _parse_imports(source, "mmbridge.data.probe", is_package=False)
    assert (1, "diffusers") in found
    assert (3, "mmbridge.data.modeling.qformer") in found
    assert (4, "mmbridge.serve") in found
    found = _parse_imports("from .modeling import qformer\n", "mmbridge", is_package=True)
    assert (1, "mmbridge.modeling.qformer") in found
