"""The results pages (docs/results/*.md) are generated from the committed records: each table's `--table`
regenerates its page, which must equal the committed one (a page edited by hand, or records changed without the
page, fails here)."""

import subprocess
import sys

import pytest
from tiny import ROOT

PAGES = {
    "self-training": ["benchmarks/self_improve_table.py", "--table"],
    "rl": ["benchmarks/rl_table.py", "--table"],
    "tta": ["benchmarks/tta_table.py", "--table"],
    "dynamics": ["benchmarks/dynamics_table.py", "--table"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAGES))
def test_a_results_page_equals_what_its_records_give(name, tmp_path):
    script, *args = PAGES[name]
    subprocess.run([sys.executable, str(ROOT / script), *args, "--pages", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    committed = (ROOT / "docs" / "results" / f"{name}.md").read_text()
    assert (tmp_path / f"{name}.md").read_text() == committed, (
        f"docs/results/{name}.md differs from what `python {script} --table` writes: regenerate it")


def test_every_results_page_has_its_generator():
    assert {p.stem for p in (ROOT / "docs" / "results").glob("*.md")} == set(PAGES)
