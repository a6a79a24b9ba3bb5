"""A real English text corpus with no download: prose paragraphs from the long descriptions
(READMEs) of the Python distributions installed here (pinned by `requirements.lock`), then from
the docstrings of the standard library's modules. One paragraph a line, the `.txt` form
`--corpus` reads. Paragraphs that are mostly code, tables or markup are left out.

    python -m tools.corpus OUT.txt
"""

import ast
import importlib.metadata
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

MIN_WORDS = 20
MIN_PROSE = 0.9  # share of letters and spaces


def _prose(block: str) -> str | None:
    text = " ".join(block.split())
    if len(text.split()) < MIN_WORDS or text[0] in "#|[!<>`$*-=:.":
        return None
    if sum(c.isalpha() or c.isspace() for c in text) / len(text) < MIN_PROSE:
        return None
    return text


def readme_paragraphs() -> Iterator[str]:
    seen: set[str] = set()
    dists = sorted(importlib.metadata.distributions(), key=lambda d: str(d.metadata["Name"]))
    for dist in dists:
        name = str(dist.metadata["Name"]).lower()
        if name in seen:
            continue
        seen.add(name)
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""  # type: ignore[attr-defined]
        for block in re.split(r"\n\s*\n", str(body)):
            if (text := _prose(block)) is not None:
                yield text


def docstring_paragraphs() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                for block in re.split(r"\n\s*\n", doc or ""):
                    if (text := _prose(block)) is not None:
                        yield text


def write(out: Path) -> int:
    """Write the corpus; returns its number of paragraphs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = list(dict.fromkeys([*readme_paragraphs(), *docstring_paragraphs()]))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


if __name__ == "__main__":
    n = write(Path(sys.argv[1]))
    print(f"wrote {n} paragraphs to {sys.argv[1]}")
