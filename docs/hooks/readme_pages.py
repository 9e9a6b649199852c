"""MkDocs hook: pages of the site made from sections of README.md, so the README stays their one source.

Code, tests and docs cite README sections by name (README "Telemetry envelope"), so those sections stay in the
README; the site shows each group below as a page of its own. A section is a ``## `` heading with everything
under it up to the next ``## ``; its headings move up one level, and links into docs/ are made relative to the
site. A missing section fails the build (a renamed README heading must be renamed here too).

In every page, a citation README "Section" becomes a link to that heading on its generated page (a heading
that starts with, else holds, the cited name counts: README "Topics" is "Topics (prefix `vgw`)"). A citation
of a heading the README does not have is a warning, so `mkdocs build --strict` fails on it like on a broken
link.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

from markdown.extensions.toc import slugify
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

log = logging.getLogger("mkdocs.hooks.readme_pages")
CITATION = re.compile(r'README "([^"`]{1,80})"')

# generated page -> (its title, the README sections it holds, in this order)
PAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dev-stack.md": ("Your own dev stack", ("Your own dev stack",)),
    "running.md": ("Running the agent", ("Running the agent",)),
    "owner-consent.md": ("The owner's consent service", ("The owner's consent service",)),
    "contract.md": ("The contract, in our words", ("The contract, in our words",)),
    "privacy-report.md": ("Privacy report", ("Privacy report",)),
    "collection-rules.md": ("Collection rules", ("Collection rules (per grant)",)),
    "fleet-results.md": ("A fleet: results and replay after failover", ("A fleet",)),
    "performance-summary.md": ("Performance: the numbers", ("Performance",)),
    "layout.md": ("Layout and layers", ("Layout",)),
}


def readme_sections(text: str) -> dict[str, str]:
    """Each ``## `` section of the README by its title, with its body (code blocks are not headings)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
            continue
        if current is not None:
            current.append(line)
    return {title: "\n".join(body).strip("\n") for title, body in sections.items()}


def _page_text(title: str, bodies: list[tuple[str, str]]) -> str:
    out = [f"# {title}", ""]
    for name, body in bodies:
        if len(bodies) > 1 or name != title:
            out += [f"## {name}", ""]
        fenced = False
        for line in body.splitlines():
            if line.startswith("```"):
                fenced = not fenced
            if not fenced and re.match(r"#{3,} ", line):
                line = line[1:] if len(bodies) == 1 and name == title else line
            out.append(line)
        out.append("")
    text = "\n".join(out)
    # README links into docs/ ("docs/obd.md") are site pages next to this one.
    return re.sub(r"\]\(docs/", "](", text)


# README heading -> (generated page, anchor); filled by on_files, read by on_page_markdown.
_HEADINGS: dict[str, tuple[str, str]] = {}


def on_files(files: Files, config: Any) -> Files:
    readme = Path(config["config_file_path"]).parent / "README.md"
    sections = readme_sections(readme.read_text(encoding="utf-8"))
    _HEADINGS.clear()
    for page, (title, names) in PAGES.items():
        missing = [n for n in names if n not in sections]
        if missing:
            raise ValueError(f"README.md has no section '## {missing[0]}' (docs/hooks/readme_pages.py, PAGES)")
        text = _page_text(title, [(n, sections[n]) for n in names])
        files.append(File.generated(config, page, content=text))
        fenced = False
        for line in text.splitlines():
            if line.startswith("```"):
                fenced = not fenced
            heading = re.match(r"(#+) (.+)", line)
            if heading and not fenced:
                name = heading.group(2).strip()
                anchor = "" if heading.group(1) == "#" else "#" + slugify(name.replace("`", ""), "-")
                _HEADINGS.setdefault(name, (page, anchor))
        for name in names:  # the README's own title of a section that a page renames
            _HEADINGS.setdefault(name, (page, ""))
    return files


def _target(cited: str) -> tuple[str, str] | None:
    if cited in _HEADINGS:
        return _HEADINGS[cited]
    starts = [h for h in _HEADINGS if h.startswith(cited)] or [h for h in _HEADINGS if cited in h]
    return _HEADINGS[starts[0]] if starts else None


def on_page_markdown(markdown: str, page: Page, config: Any, files: Files) -> str:
    here = posixpath.dirname(page.file.src_uri) or "."

    def link(match: re.Match[str]) -> str:
        cited = " ".join(match.group(1).split())  # a citation may wrap onto the next line
        target = _target(cited)
        if target is None:
            log.warning('%s cites README "%s", a heading README.md does not have', page.file.src_uri, cited)
            return match.group(0)
        return f"[{match.group(0)}]({posixpath.relpath(target[0], here)}{target[1]})"

    # Code blocks (``` fences) are left alone; so is a citation with a backtick in it (inline code).
    chunks = re.split(r"(^```.*?^```[^\n]*$)", markdown, flags=re.MULTILINE | re.DOTALL)
    return "".join(c if c.startswith("```") else CITATION.sub(link, c) for c in chunks)
