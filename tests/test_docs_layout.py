"""docs/ARCHITECTURE.md's layout section names the tree file for file, and nothing else; README links to it."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("flap_deploy/", "flap_deploy_cli/", "exporters/", "serving/", "benchmarks/")
PATH = re.compile(r"\b((?:flap_deploy_cli|flap_deploy|exporters|serving|benchmarks)/[\w/.]+\.(?:py|sh))\b")


def tracked_sources() -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return {f for f in files if f.startswith(PACKAGES) and f.endswith((".py", ".sh")) and (REPO / f).is_file()}


def layout_section(doc: Path) -> str:
    text = doc.read_text()
    start = text.index("\n## Layout")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_layout_sections_match_the_tree():
    tree = tracked_sources()
    named = set(PATH.findall(layout_section(REPO / "docs" / "ARCHITECTURE.md")))
    assert not tree - named, f"the layout does not name {sorted(tree - named)}"
    assert not named - tree, f"the layout names files that are not there: {sorted(named - tree)}"


def test_readme_links_to_the_layout_instead_of_copying_it():
    section = layout_section(REPO / "README.md")
    assert "docs/ARCHITECTURE.md" in section
    assert not PATH.findall(section)
