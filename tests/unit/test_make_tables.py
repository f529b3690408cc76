"""docs/benchmarks.md and README.md carry the tables benchmarks/make_tables.py builds from docs/results/*.json."""

from __future__ import annotations

import pytest
from benchmarks.make_tables import DOCS, MARKER, TABLES, load_results, render


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_committed_docs_are_up_to_date_with_the_committed_results(path):
    text = path.read_text()
    assert MARKER.search(text), f"{path.name} has no generated block"
    assert render(text, load_results()) == text, f"run: python benchmarks/make_tables.py ({path.name} is stale)"


def test_every_benchmark_has_its_table():
    marked = {m["key"] for m in MARKER.finditer(DOCS[0].read_text())}
    assert marked == set(TABLES)


def test_render_replaces_only_the_marked_blocks():
    text = "prose 1\n<!-- results:routing -->\nold table\n<!-- /results:routing -->\nprose 2\n"
    out = render(text, {})
    assert out == "prose 1\n<!-- results:routing -->\n*Not measured: no `docs/results/routing.json`.*\n" \
        "<!-- /results:routing -->\nprose 2\n"  # fmt: skip
