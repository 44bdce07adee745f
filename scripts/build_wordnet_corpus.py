"""Build ``wordnet_facts.jsonl``: short fact documents from WordNet 3.0 nouns.

Reads ``data.noun`` and ``cntlist.rev`` from Debian's ``wordnet-base``
package and writes one JSON line per selected noun synset with the fields
``id``, ``headword``, ``text``, ``prompt`` and ``completion``
(``prompt + completion == text``).  Selection prefers common (highest
sense-tag count), short, lowercase, single-word headwords, keeps each
headword once, and sorts the output by synset offset, so the output is
byte-identical across runs.

Usage::

    python scripts/build_wordnet_corpus.py [--wordnet-dir /usr/share/wordnet] \
        [--n 3000] [--out hf_mirror/data]
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

HEADWORD_RE = re.compile(r"[a-z]{3,12}")
MARKER_RE = re.compile(r"\([a-z]+\)$")  # syntactic markers such as "(p)"
PAREN_RE = re.compile(r"\s*\([^()]*\)")
MAX_WORDS = 35
MAX_GLOSS_WORDS = 16
MAX_SYNONYMS = 2


@dataclass(frozen=True)
class Synset:
    """One parsed line of a WordNet ``data.*`` file."""

    offset: str
    lex_filenum: str
    lemmas: tuple[str, ...]
    lex_ids: tuple[int, ...]
    pointers: tuple[tuple[str, str, str, str], ...]
    gloss: str


def parse_data_file(path: Path) -> dict[str, Synset]:
    """Parse a WordNet data file into ``{offset: Synset}``, skipping the licence header."""
    synsets: dict[str, Synset] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("  "):
                continue
            body, _, gloss = line.partition(" | ")
            f = body.split()
            offset, lex_filenum, w_cnt = f[0], f[1], int(f[3], 16)
            words = f[4 : 4 + 2 * w_cnt]
            i = 4 + 2 * w_cnt
            p_cnt = int(f[i])
            ptrs = f[i + 1 : i + 1 + 4 * p_cnt]
            synsets[offset] = Synset(
                offset=offset,
                lex_filenum=lex_filenum,
                lemmas=tuple(MARKER_RE.sub("", w) for w in words[0::2]),
                lex_ids=tuple(int(x, 16) for x in words[1::2]),
                pointers=tuple(zip(ptrs[0::4], ptrs[1::4], ptrs[2::4], ptrs[3::4], strict=True)),
                gloss=gloss.strip(),
            )
    return synsets


def load_tag_counts(path: Path) -> dict[str, int]:
    """Map sense keys to their semantic-concordance tag counts (``cntlist.rev``)."""
    counts: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            key, _, cnt = line.split()
            counts[key] = int(cnt)
    return counts


def phrase(lemma: str) -> str:
    """Turn a WordNet lemma into plain text."""
    return lemma.replace("_", " ")


def definition(gloss: str) -> str:
    """Return the gloss's definition: text before the first ';' or quoted example, minus asides."""
    text = re.split(r';|"', gloss, maxsplit=1)[0]
    return " ".join(PAREN_RE.sub("", text).split()).rstrip(" ,:;.")


def first_target(synset: Synset, symbol: str, pos: str = "n") -> str | None:
    """Return the offset of the first semantic pointer with ``symbol`` to ``pos``."""
    for sym, offset, ptr_pos, source_target in synset.pointers:
        if sym == symbol and ptr_pos == pos and source_target == "0000":
            return offset
    return None


def make_document(s: Synset, synsets: dict[str, Synset]) -> dict[str, str]:
    """Build the fact document for one noun synset."""
    headword = phrase(s.lemmas[0])
    parts = [definition(s.gloss) + "."]
    synonyms = [phrase(w) for w in s.lemmas[1:] if phrase(w).lower() != headword][:MAX_SYNONYMS]
    if synonyms:
        parts.append("Also called " + ", ".join(synonyms) + ".")
    for symbol, template in (("@", "A kind of {}."), ("#p", "Part of {}.")):
        target = first_target(s, symbol)
        if target is not None and (name := phrase(synsets[target].lemmas[0])) != headword:
            parts.append(template.format(name))
    # Drop optional trailing sentences until the document is short enough.
    while len(parts) > 1 and len(" ".join(parts).split()) + 1 > MAX_WORDS:
        parts.pop()
    prompt = headword + ":"
    completion = " " + " ".join(parts)
    return {
        "id": f"wn-noun-{s.offset}",
        "headword": headword,
        "text": prompt + completion,
        "prompt": prompt,
        "completion": completion,
    }


def select(synsets: dict[str, Synset], counts: dict[str, int], n: int) -> list[Synset]:
    """Pick ``n`` synsets with common short lowercase headwords, one synset per headword."""
    best: dict[str, tuple[int, str]] = {}
    for s in synsets.values():
        head = s.lemmas[0]
        if not HEADWORD_RE.fullmatch(head) or first_target(s, "@i") is not None:
            continue
        words = re.findall(r"[a-z]+", definition(s.gloss).lower())
        if not 4 <= len(words) <= MAX_GLOSS_WORDS or head in words:  # skip circular glosses
            continue
        key = f"{head}%1:{s.lex_filenum}:{s.lex_ids[0]:02d}::"
        rank = (-counts.get(key, 0), s.offset)
        if head not in best or rank < best[head]:
            best[head] = rank
    ranked = sorted(best.values())[:n]
    if len(ranked) < n:
        raise SystemExit(f"only {len(ranked)} candidate synsets, wanted {n}")
    return [synsets[offset] for _, offset in sorted(ranked, key=lambda r: r[1])]


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=Path("hf_mirror/data"))
    args = ap.parse_args()

    synsets = parse_data_file(args.wordnet_dir / "data.noun")
    counts = load_tag_counts(args.wordnet_dir / "cntlist.rev")
    docs = [make_document(s, synsets) for s in select(synsets, counts, args.n)]
    args.out.mkdir(parents=True, exist_ok=True)
    out_path = args.out / "wordnet_facts.jsonl"
    with out_path.open("w", encoding="utf-8", newline="\n") as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {len(docs)} documents to {out_path} ({out_path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
