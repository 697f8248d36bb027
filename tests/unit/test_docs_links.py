"""README.md and docs/*.md link to each other with relative links that resolve: every link names a file that exists
inside the repository and, with a #anchor, a heading of that file (GitHub's heading ids); and the design page links
nowhere outside the repository."""

import re
from pathlib import Path

from tests.conftest import ROOT

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed (neither holds links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return lines


def heading_ids(text: str) -> set[str]:
    """The ids GitHub gives the headings of a Markdown page: the heading's text lower-cased, without punctuation
    (letters, digits, `_`, `-` and spaces stay), each space a `-`; a repeated id gets -1, -2, ..."""
    ids, seen, fenced = set(), {}, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading: its text
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """`page:LINE: target: reason` for every relative link of `page` that does not resolve."""
    problems = []
    for number, line in enumerate(_prose(page.read_text(encoding="utf-8")), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...: not a file of ours
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page.resolve()
            where = f"{page.relative_to(root)}: {target}"
            if not dest.is_relative_to(root.resolve()):
                problems.append(f"{where}: outside the repository")
            elif not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root.resolve())}")
    return problems


def _pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = _pages()
    assert len(pages) > 20, "the README and the docs pages"
    problems = [p for page in pages for p in broken_links(page)]
    assert not problems, "\n".join(problems)


def test_the_readme_and_every_docs_page_are_linked_both_ways():
    """The README links to the docs index; the index links to every page and back to the README; every page links
    to the index, so a reader who lands anywhere finds the rest."""
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert "](docs/index.md" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](../README.md" in index
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not link to {page.name}"
            assert "](index.md)" in page.read_text(encoding="utf-8"), f"docs/{page.name} does not link to index.md"


def test_the_design_page_links_only_inside_the_repository():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    assert not re.search(r"https?://", text)
    assert "DESIGN.md" not in text and "../shared" not in text
    assert "shared/DESIGN" not in (ROOT / "README.md").read_text(encoding="utf-8")


def test_broken_links_and_anchors_are_found(tmp_path):
    """The checker itself: a missing file, a missing heading, a link out of the repository, while good links,
    links in code and web links pass."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Planning memory: `rlhf plan`\n\n## Same\n\n## Same\n",
                                            encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#planning-memory-rlhf-plan) [ok](docs/a.md#same-1) [ok](#top)\n"
        "[web](https://example.org/x.md) `[in code](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[gone](docs/b.md) [no heading](docs/a.md#planning) [out](../outside.md) ![picture](docs/p.png)\n",
        encoding="utf-8")
    problems = broken_links(page, tmp_path)
    assert [p.split(": ", 1)[1] for p in problems] == [
        "docs/b.md: no such file",
        "docs/a.md#planning: no heading #planning in docs/a.md",
        "../outside.md: outside the repository",
        "docs/p.png: no such file",
    ]


def test_the_readmes_use_it_on_your_data_command_runs_configs_my_data(tmp_path, monkeypatch):
    """The README's `rlhf run my-data.yaml --set ...` line applies to configs/my-data.yaml as shipped, names the
    user's file in both places, and evaluate holds out the prompts the preferences stage held out (same fraction:
    the split is seeded by prompt). The whole chain was run on the tiny model by hand (a 120-row CSV)."""
    from pipeline.config import load_pipeline

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("rlhf run my-data.yaml "))
    sets = re.findall(r"--set (\S+)", line)
    assert len(sets) == 2
    (tmp_path / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = load_pipeline(ROOT / "configs" / "my-data.yaml", overrides=sets)
    prefs, evaluate = cfg.stage("preferences"), cfg.stage("evaluate")
    assert prefs.data.path == evaluate.prompts == "prefs.jsonl"
    assert prefs.eval_fraction == evaluate.eval_fraction > 0
