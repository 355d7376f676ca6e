"""The project stands alone: no file of it cites a document or path outside the repository.

Design notes that code or docs rely on live in docs/ (the ShapesWorld spec is docs/world.md, the
layers docs/architecture.md); a reference to a file beside the checkout means nothing to a user.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["README.md", "pyproject.toml", "constraints-cpu.txt", ".ci", "docs", "src/mmbridge", "tests", "bench",
           "scripts"]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".jinja", ".txt", ".cfg", ""}
# Built from pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\bROAD" + r"MAP\b", r"\.\./" + "shared", r"/work/" + "shared"]))

# Files that may cite an outside note (none: what the code relies on is written down in docs/).
KNOWN_OUTSIDE_REFERENCES: set[str] = set()


def _files():
    for entry in SCANNED:
        path = ROOT / entry
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in candidates:
            if p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts and not p.name.startswith("."):
                yield p


def _citing() -> dict[str, list[str]]:
    found = {}
    for path in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        hits = [f"{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
        if hits:
            found[path.relative_to(ROOT).as_posix()] = hits
    return found


def test_no_file_cites_a_note_outside_the_repo():
    new = {f: hits for f, hits in _citing().items() if f not in KNOWN_OUTSIDE_REFERENCES}
    assert not new, "cite docs/ instead (docs/world.md, docs/architecture.md, ...):\n" + "\n".join(
        f"  {f}:{hit}" for f, hits in new.items() for hit in hits)


def test_known_outside_references_still_exist():
    fixed = sorted(KNOWN_OUTSIDE_REFERENCES - set(_citing()))
    assert not fixed, f"these files no longer cite outside notes — remove them from KNOWN_OUTSIDE_REFERENCES: {fixed}"
