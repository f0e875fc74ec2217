"""MkDocs hook: the site's home page is the README (its `docs/` links made relative to the site), and a link from
a page to a file outside `docs/` (a config, a test, a benchmark) is written as the path in code, since the site
does not carry the repository's files."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).parents[2]


def on_files(files, config):
    readme = (ROOT / "README.md").read_text()
    readme = re.sub(r"\]\(docs/([^)]+)\)", r"](\1)", readme)
    files.append(File.generated(config, "index.md", content=readme))
    return files


def _outside(match: re.Match) -> str:
    text, target = match.group(1), match.group(2)
    path = re.sub(r"^(\.\./)+", "", target)
    return text if text.strip("`").rstrip("/") == path.rstrip("/") else f"{text} (`{path}`)"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "index.md":
        pattern = r"\[([^\]]+)\]\(((?!https?:|#)[^)]*?/[^)]*|(?!https?:|#)[^)]*\.(?:yaml|py|jsonl))\)"
        return re.sub(pattern, lambda m: m.group(0) if (Path(config["docs_dir"]) / m.group(2).split("#")[0]).exists()
                      else _outside(m), markdown)
    return re.sub(r"\[([^\]]+)\]\(((?:\.\./)+[^)]*)\)", _outside, markdown)
