"""Controlled rewrites of evaluation items for the leakage benchmark: near copies and paraphrases.

A *near copy* is the item with one small edit (a word swapped for another, a word deleted, or punctuation
changed): most of it is still verbatim. A *paraphrase* says the same thing in other words and another order:
WordNet-style entries (``headword: gloss. Also called x, y. A kind of z. Part of w.``) are re-templated
("The word ... names ...", "a type of", "also known as", parts in a new order) and the gloss itself is
rewritten with synonym and function-word substitutions and swapped conjuncts, so that no long token run of the
original survives. Other texts get only the word-level rewrites.
"""

from __future__ import annotations

import random
import re

# word -> replacement; used by the paraphraser (content-preserving) and, one at a time, by near copies
SYNONYMS = {
    "a": "one", "an": "one", "the": "this", "that": "which", "which": "that", "who": "that", "with": "having",
    "without": "lacking", "used": "employed", "especially": "particularly", "usually": "typically",
    "any": "every", "often": "frequently", "large": "big", "small": "little", "having": "with", "made": "produced",
    "make": "produce", "person": "individual", "people": "persons", "someone": "somebody", "something": "some thing",
    "various": "diverse", "very": "highly", "in": "within", "on": "upon", "from": "out of", "for": "meant for",
    "by": "through", "as": "like", "or": "or else", "into": "inside", "such": "like", "one": "a single",
    "its": "their", "their": "its",
    "consisting": "composed", "containing": "holding", "relating": "pertaining", "part": "portion",
    "state": "condition", "act": "action", "process": "procedure", "quality": "property", "feeling": "sensation",
    "group": "set", "place": "location", "instrument": "tool", "device": "apparatus", "building": "structure",
}
_WORD = re.compile(r"[A-Za-z]+")
_ENTRY = re.compile(r"^(?P<head>[^:]+):\s*(?P<body>.*)$", re.S)


def near_copy(text: str, rng: random.Random) -> str:
    """One small edit: a word replaced (synonym), a word deleted, or the punctuation changed."""
    words = text.split(" ")
    kind = rng.choice(["swap", "delete", "punct"])
    inner = [i for i in range(1, len(words) - 1) if _WORD.fullmatch(words[i])]
    if kind == "swap" and inner:
        swappable = [i for i in inner if words[i].lower() in SYNONYMS] or inner
        i = rng.choice(swappable)
        words[i] = SYNONYMS.get(words[i].lower(), words[i] + "s")
        return " ".join(words)
    if kind == "delete" and len(inner) > 1:
        del words[rng.choice(inner)]
        return " ".join(words)
    i = text.find(". ")
    if i >= 0:  # merge two sentences with a semicolon
        return text[:i] + ";" + text[i + 1 :]
    return text.rstrip(".") + "!" if text.endswith(".") else text + "."


def _reword(phrase: str, rng: random.Random, rate: float = 1.0) -> str:
    """Synonym/function-word substitutions and swapped conjuncts ("x and y" -> "y and x")."""
    m = re.match(r"^(.*?\b)(\w+) (and|or) (\w+)(\b.*)$", phrase)
    if m and m.group(2).lower() not in SYNONYMS and m.group(4).lower() not in SYNONYMS:
        phrase = f"{m.group(1)}{m.group(4)} {m.group(3)} {m.group(2)}{m.group(5)}"

    def sub(match: re.Match) -> str:
        word = match.group(0)
        rep = SYNONYMS.get(word.lower())
        if rep is None or rng.random() > rate:
            return word
        return rep.capitalize() if word[0].isupper() else rep

    return _WORD.sub(sub, phrase)


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


def paraphrase(text: str, rng: random.Random) -> str:
    """The same content in other words and another order (see the module docstring)."""
    m = _ENTRY.match(text.strip())
    if not m:
        return _reword(text, rng)
    head, body = m.group("head").strip(), m.group("body").strip()
    sentences = [s.strip() for s in re.split(r"(?<=\.)\s+", body) if s.strip()]
    gloss, aliases, kind, part = sentences[0].rstrip("."), None, None, None
    extra = []
    for s in sentences[1:]:
        s = s.rstrip(".")
        if s.startswith("Also called "):
            aliases = s[len("Also called "):]
        elif s.startswith("A kind of "):
            kind = s[len("A kind of "):]
        elif s.startswith("Part of "):
            part = s[len("Part of "):]
        else:
            extra.append(s)
    gloss = _reword(gloss, rng)
    alias_text = None
    if aliases:
        names = [a.strip() for a in aliases.split(",")]
        rng.shuffle(names)
        alias_text = " or ".join(names)
    templates = [
        "The word {head}{alias} names {gloss}{kind}{part}.",
        "{Kind}{head}{alias} is defined as {gloss}{part}.",
        "By {head}{alias} we mean {gloss}{kind}{part}.",
    ]
    template = rng.choice(templates)
    alias = f" (also known as {alias_text})" if alias_text else ""
    kind_clause = f", a type of {kind}" if kind else ""
    kind_lead = f"A type of {kind}, " if kind else ""
    part_clause = f"; it belongs to {part}" if part else ""
    out = template.format(head=head, alias=alias, gloss=gloss, kind=kind_clause, Kind=kind_lead, part=part_clause)
    if extra:
        out += " " + " ".join(_reword(e, rng) + "." for e in extra)
    return out[0].upper() + out[1:]
