"""The docs stay true to the code: every reference resolves inside the repository, and the option tables give
each option's default and help text exactly as `RLoraConfig` defines them."""

from __future__ import annotations

import ast
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml
from peft.config import PeftConfig

from rlora_plugin.config import RLoraConfig, Source, fields_from

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", *ROOT.glob("docs/*.md")])
SOURCES = sorted(
    p
    for top in ("rlora_plugin", "benchmarks", "examples", "tests")
    for p in (ROOT / top).rglob("*.py")
    if p != Path(__file__).resolve()  # its own probe text is broken on purpose
)

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path inside the repository as the docs and docstrings write it (`docs/method.md`, `rlora_plugin/layer.py`).
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:docs|benchmarks|examples|scripts|tests|rlora_plugin|\.ci)/[\w./-]*[\w/]|"
    r"(?:README|CHANGELOG)\.md|LICENSE|constraints\.txt|pyproject\.toml)((?:#|::)[\w-]+)?"
)
# A section cited by its title: `README ("What is patched")`, `benchmarks/README.md, 'Results ...'`.
QUOTED_SECTION = re.compile(r"((?:[\w./-]+/)?README(?:\.md)?|[\w./-]+\.md)[,:]? \(?[\"']([^\"'\n]{4,})[\"']")
NUMBERED_SECTION = re.compile(r"\b(?:spec )?sections? \d", re.IGNORECASE)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)]


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(page):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def prose(path: Path) -> str:
    """The text to check: a page without its code blocks; a module with adjacent string literals joined."""
    text = path.read_text()
    if path.suffix == ".md":
        return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"\"\s*\n\s*[rf]?\"", "", text)


def check_target(source: Path, target: Path, fragment: str | None) -> str | None:
    """Why `target` (with `#anchor` or `::test_name`) does not resolve, or None."""
    target = target.resolve()
    if ROOT not in target.parents and target != ROOT:
        return f"{target} is outside the repository"
    if not target.exists():
        return f"{target.relative_to(ROOT)} does not exist"
    if fragment and fragment.startswith("#"):
        page = source if target == source else target
        if page.suffix == ".md" and fragment[1:] not in anchors(page):
            return f"{page.relative_to(ROOT)} has no section {fragment}"
    if fragment and fragment.startswith("::") and not re.search(rf"def {fragment[2:]}\b", target.read_text()):
        return f"{target.relative_to(ROOT)} has no {fragment[2:]}"
    return None


def broken_references(path: Path, text: str | None = None) -> list[str]:
    """Every reference in `path` (or in `text`, as if it were `path`) that does not resolve."""
    text = prose(path) if text is None else text
    problems = []
    if path.suffix == ".md":
        for link in LINK.findall(text):
            if re.match(r"[a-z]+:", link):
                continue
            where, _, anchor = link.partition("#")
            target = path.parent / where if where else path
            problems.append(check_target(path, target, f"#{anchor}" if anchor else None))
    if path.name != "CHANGELOG.md":  # history may name files that no longer exist
        for where, fragment in REPO_PATH.findall(text):
            if ".cache" in where or where.endswith("/.venv"):
                continue  # generated outputs and venvs, not files of the repository
            problems.append(check_target(path, ROOT / where.rstrip("/."), fragment or None))
    for where, title in QUOTED_SECTION.findall(text):
        page = ROOT / (where if where.endswith(".md") else f"{where}.md")
        if not page.is_file():
            problems.append(f"{where} (cited for {title!r}) does not exist")
        elif not any(h.strip("`").startswith(title.strip()) for h in headings(page)):
            problems.append(f"{where} has no section {title!r}")
    problems += [f"numbered section reference {m.group(0)!r}" for m in NUMBERED_SECTION.finditer(text)]
    problems += [f"path outside the repository: {m.group(0)!r}" for m in re.finditer(r"\.\./shared|/work/\S+", text)]
    return [f"{path.relative_to(ROOT)}: {p}" for p in problems if p]


@pytest.mark.parametrize("path", PAGES + SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_references_resolve(path):
    assert broken_references(path) == []


def test_the_reference_check_catches_what_it_should():
    """A broken link, a missing anchor, a numbered section and paths that do not resolve are all found."""
    text = (
        "[a](method.md#no-such-section) [b](nothing-here.md) [c](method.md#the-router) [d](../README.md#install)\n"
        "See spec section 7, `docs/missing.md`, `tests/test_docs.py::no_such_test`, ../shared/notes and\n"
        'README ("No such heading"); `tests/test_docs.py::test_references_resolve` is fine.\n'
    )
    problems = broken_references(ROOT / "docs" / "probe.md", text)
    expected = ("#no-such-section", "nothing-here.md", "section 7", "docs/missing.md", "no_such_test", "../shared",
                "No such heading")  # fmt: skip
    assert len(problems) == len(expected), problems
    for needle in expected:
        assert any(needle in p for p in problems), needle


# The option tables ---------------------------------------------------------------------------------------------

OWN_FIELDS = {f.name for f in fields(RLoraConfig)} - {f.name for f in fields(PeftConfig)}


def own_field(name: str):
    return next(f for f in fields(RLoraConfig) if f.name == name)


def table(page: str, after: str) -> dict[str, tuple[str, str]]:
    """key -> (default cell, help cell) of the `| key | default | help |` table under the heading `after`."""
    lines = (ROOT / "docs" / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#") and after in line)
    rows: dict[str, tuple[str, str]] = {}
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    assert rows, f"no option table under {after!r} in docs/{page}"
    return rows


def check_table(rows: dict[str, tuple[str, str]], prefix: str, parse, host_defaults: dict[str, str]) -> None:
    for key, (default, help_text) in rows.items():
        name = key.removeprefix(prefix)
        if name not in OWN_FIELDS:
            continue  # a host's own key, checked by the caller
        spec = own_field(name)
        assert " ".join(help_text.split()) == " ".join(spec.metadata["help"].split()), f"help of {key}"
        if name in host_defaults:
            assert default == host_defaults[name], f"default of {key}"
        else:
            assert spec.default is not MISSING and parse(default.strip("`")) == spec.default, f"default of {key}"


def test_python_api_table_is_the_config():
    rows = table("python-api.md", "`RLoraConfig`")
    assert set(rows) == OWN_FIELDS
    check_table(rows, "", ast.literal_eval, {})


def test_axolotl_table_is_the_config():
    from rlora_plugin.axolotl_plugin.args import RLoraOptions

    rows = table("axolotl.md", "The `rlora:` block")
    assert set(rows) == set(RLoraOptions.model_fields)
    check_table(rows, "", yaml.safe_load, {"init_seed": "the run's `seed`"})
    assert yaml.safe_load(rows["metrics"][0].strip("`")) is RLoraOptions.model_fields["metrics"].default


def test_llamafactory_table_is_the_config():
    from rlora_plugin.llamafactory.translate import HOST, METRICS_KEY

    rows = table("llamafactory.md", "The `rlora_*` keys")
    assert set(rows) == {*HOST.rlora_keys(), METRICS_KEY}
    check_table(rows, "rlora_", yaml.safe_load, {"init_seed": "the run's `seed`"})
    assert rows[METRICS_KEY][0] == "`true`"


def test_ms_swift_table_is_the_config():
    """ms-swift's keys are `rlora_<field>` of `--model_kwargs` (rlora_plugin/ms_swift/tuner.py, which needs ms-swift
    to import: the prefix is checked there, in tests/test_ms_swift_args.py)."""
    rows = table("ms-swift.md", "The command line")
    assert set(rows) == {f"rlora_{name}" for name in fields_from(Source.RLORA, Source.RUN_SEED)}
    check_table(rows, "rlora_", yaml.safe_load, {"init_seed": "the run's `seed`"})
