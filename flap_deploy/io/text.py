"""Reading evaluation / calibration text from files or directories, WikiText detokenized."""

from __future__ import annotations

import os
import re
from pathlib import Path

from flap_deploy.errors import FlapDeployError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".raw")

# WikiText v1 joins hyphens and number separators with @-@ @,@ @.@ and splits punctuation;
# these are the light rules of the data's README (keeps figures comparable across tools).
_WIKITEXT_RULES = (
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" , ", ", "),
    (" . ", ". "),
)


def looks_like_wikitext(text: str) -> bool:
    """True when the text carries WikiText's tokenization marks (" @-@ ", " = Heading = ")."""
    sample = text[:200_000]
    return " @-@ " in sample or " @,@ " in sample or bool(re.search(r"^ = [^=\n]+ = $", sample, re.M))


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenization so the text is closer to what models were trained on."""
    for old, new in _WIKITEXT_RULES:
        text = text.replace(old, new)
    return text


def load_text(path: str | os.PathLike, detokenize: bool | None = None) -> str:
    """Concatenate a text file, or every text file of a directory (sorted), as one string.

    WikiText is detokenized when it looks like WikiText, unless ``detokenize`` says otherwise.
    """
    path = Path(path)
    if not path.exists():
        raise FlapDeployError(f"text {path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FlapDeployError(f"text directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    else:
        files = [path]
    parts = []
    for f in files:
        try:
            parts.append(f.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise FlapDeployError(f"text file {f} is not UTF-8 text") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise FlapDeployError(f"text {path} is empty")
    if detokenize if detokenize is not None else looks_like_wikitext(text):
        text = detokenize_wikitext(text)
    return text


def python_docs_text() -> str:
    """The second evaluation domain: technical prose unlike Wikipedia, shipped with every CPython.

    The topics of the Python Language Reference that the running interpreter's ``help()`` shows
    (``pydoc_data.topics.topics``, generated from the CPython documentation, PSF License; read in
    place, never copied), in sorted key order, joined by blank lines. Deterministic for a given
    Python version (3.11.7 here: 79 topics, 464,970 characters, about 100k SmolLM2 tokens).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise FlapDeployError("this Python ships no pydoc_data (the python-docs evaluation text)") from None
    return "\n\n".join(topics[key] for key in sorted(topics))
