"""Citations of the original's behaviour (`docs/original.md §N`) in code, tests and the README
name sections that exist in docs/original.md."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/original\.md (§\d+(?:(?:, | and )§\d+)*)")


def cited_files() -> list[Path]:
    return [p for p in [*ROOT.glob("*.py"), *ROOT.glob("*.md"), *ROOT.glob("lm_human_preferences/**/*.py"),
                        *ROOT.glob("datasets/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]
            if p.name != "test_citations.py"]


def test_every_cited_section_exists():
    sections = set(re.findall(r"^## (§\d+) ", (ROOT / "docs" / "original.md").read_text(encoding="utf-8"), re.M))
    assert sections >= {f"§{n}" for n in range(1, 9)}
    cited = {}
    for path in cited_files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            for section in re.findall(r"§\d+", match.group(1)):
                cited.setdefault(section, []).append(path.relative_to(ROOT).as_posix())
    assert cited, "no citation found: the pattern no longer matches how code cites"
    missing = {s: files for s, files in cited.items() if s not in sections}
    assert not missing, f"sections cited but not in docs/original.md: {missing}"
