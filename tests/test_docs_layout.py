"""README's and docs/ARCHITECTURE.md's layout sections name the tree file for file, and nothing else."""

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
    for doc in (REPO / "README.md", REPO / "docs" / "ARCHITECTURE.md"):
        named = set(PATH.findall(layout_section(doc)))
        assert not tree - named, f"{doc.name} layout does not name {sorted(tree - named)}"
        assert not named - tree, f"{doc.name} layout names files that are not there: {sorted(named - tree)}"
