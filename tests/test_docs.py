"""The documentation the code cites exists: every "docs/REFERENCE.md <section>" and "docs/OPS.md op <n>" in
the tree names a section of those files, and nothing we ship cites files that are not in the repository."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_DIRS = ["python", "mage_kernels", "csrc", "scripts", "benchmarks", "examples", "docs", "tests"]
SHIPPED_DIRS = ["python", "mage_kernels", "csrc", "scripts", "benchmarks", "examples", "docs"]
SUFFIXES = (".py", ".md", ".cpp", ".cu", ".h", ".sh", ".toml", ".txt", ".cmake")


def files(dirs):
    yield os.path.join(ROOT, "README.md")
    for d in dirs:
        for base, _, names in os.walk(os.path.join(ROOT, d)):
            yield from (os.path.join(base, n) for n in names if n.endswith(SUFFIXES))


def reference_sections() -> set[str]:
    """'2', '3.1', ..., the numbered steps of 5.2 as '5.2.1'..., and 'appendix'."""
    found, current = set(), None
    for line in open(os.path.join(ROOT, "docs", "REFERENCE.md"), encoding="utf-8"):
        m = re.match(r"#{2,3} (\d+(?:\.\d+)?)[. ]", line)
        if m:
            current = m.group(1)
            found.add(current)
        elif line.startswith("## Appendix"):
            found.add("appendix")
        elif current == "5.2" and (m := re.match(r"(\d+)\. ", line)):
            found.add(f"5.2.{m.group(1)}")
    return found


NUMBER = r"\d+(?:\.\d+)*"
REF = re.compile(rf"docs/REFERENCE\.md,?\s+(?:sections?\s+)?({NUMBER}(?:\s*(?:-|,|and)\s*{NUMBER})*|appendix)")
OPS = re.compile(r"docs/OPS\.md,?\s+ops?\s+(\d+)(?:\s*-\s*(\d+))?")


def citations(pattern):
    for path in files(SOURCE_DIRS):
        text = open(path, encoding="utf-8", errors="replace").read()
        for m in pattern.finditer(text):
            yield os.path.relpath(path, ROOT), m


def test_reference_citations_resolve():
    sections = reference_sections()
    assert {"2", "3.1", "3.5", "4.1", "4.12", "5.1", "5.2", "5.2.1", "5.2.10", "5.3", "5.4", "10", "appendix"} <= sections
    missing = []
    for path, m in citations(REF):
        for number in re.split(r"\s*(?:-|,|and)\s*", m.group(1)):
            if number not in sections:
                missing.append(f"{path}: {m.group(0)!r} ({number})")
    assert not missing, "citations of sections docs/REFERENCE.md does not have:\n" + "\n".join(missing)


def test_ops_citations_resolve():
    text = open(os.path.join(ROOT, "docs", "OPS.md"), encoding="utf-8").read()
    ops = {int(n) for n in re.findall(r"^## Op (\d+)\.", text, flags=re.M)}
    assert ops == {1, 2, 3, 4, 5}
    found = list(citations(OPS))
    assert found
    for path, m in found:
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        assert set(range(lo, hi + 1)) <= ops, f"{path}: {m.group(0)!r}"


@pytest.mark.parametrize("internal", ["MAGE_REFERENCE", "DESIGN.md", "shared/notes", "BUILD_NOTES", "BENCHMARKING.md",
                                      "STYLE.md", "DATA.md"])
def test_nothing_shipped_cites_internal_notes(internal):
    hits = [os.path.relpath(p, ROOT) for p in files(SHIPPED_DIRS) if internal in open(p, errors="replace").read()]
    assert not hits, f"{internal} is not in the repository, but these files cite it: {hits}"
