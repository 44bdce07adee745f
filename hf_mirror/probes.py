"""Probes: a prompt plus the generation to explain, tokenised with a completion mask."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hf_mirror.errors import InputError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROBE_FIELDS = ("id", "prompt", "completion")  # what a probe record is read for; any other key is named in a warning


@dataclass
class Probe:
    """One generation to explain: ``prompt`` followed by ``completion``."""

    id: str
    prompt: str
    completion: str | None = None

    @property
    def text(self) -> str:
        return self.prompt + (self.completion or "")


def start_token_id(tokenizer) -> int:
    """The token every probe and document starts with: BOS, or EOS for GPT-2-style tokenizers."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise InputError("The tokenizer has neither a BOS nor an EOS token; set one (tokenizer.bos_token = ...).")
    return tid


def adapter_name(probe_id: str, taken: set[str]) -> str:
    """A PEFT-safe adapter name (no dots) derived from a probe id, unique within ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", str(probe_id))[:64] or "probe"
    if base in ("default", "__base__"):
        base = f"probe_{base}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def load_probes(source: str | Path | Iterable[Probe | Mapping | str]) -> list[Probe]:
    """Read probes from a JSON-lines file or a list of ``Probe``/dicts/prompt strings; validate ids.

    A file's keys other than id, prompt and completion are named in a warning (a typo such as ``completon`` would
    otherwise mean a generated completion); records passed in memory may carry extra keys of the caller's.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise InputError(f"Probe file {path} does not exist; pass a JSON-lines file with id/prompt fields.")
        records: list = []
        if path.is_dir():
            raise InputError(f"Probe file {path} is a directory; pass a JSON-lines file with id/prompt fields.")
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{path}:{lineno} is not UTF-8 text (byte {e.start + 1} of the line); re-encode "
                                     "the file as UTF-8.") from None
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno} is not valid JSON ({e.msg}); write one object per line.") from e
        unread = sorted({str(k) for rec in records if isinstance(rec, Mapping) for k in rec} - set(PROBE_FIELDS))
        if unread:
            logger.warning("%s: probe field(s) %s are not read (a probe is %s); rename or drop them.", path,
                           ", ".join(map(repr, unread)), ", ".join(PROBE_FIELDS))
    else:
        records = list(source)
    probes = []
    for i, rec in enumerate(records):
        if isinstance(rec, Probe):
            probe = Probe(str(rec.id), rec.prompt, rec.completion)
        elif isinstance(rec, str):
            probe = Probe(str(i), rec, None)
        elif isinstance(rec, Mapping):
            if "prompt" not in rec:
                raise InputError(f"Probe #{i} has no 'prompt' field (fields: {sorted(rec)}); add one.")
            pid = rec.get("id", i)
            probe = Probe(str(pid), rec["prompt"], rec.get("completion"))
        else:
            raise InputError(f"Probe #{i} is a {type(rec).__name__}; use a dict with id/prompt/completion.")
        if not isinstance(probe.prompt, str):
            raise InputError(f"Probe {probe.id!r}: prompt must be a string, got {type(probe.prompt).__name__}.")
        if probe.completion is not None and not isinstance(probe.completion, str):
            raise InputError(f"Probe {probe.id!r}: completion must be a string or absent.")
        probes.append(probe)
    if not probes:
        raise InputError("No probes given; pass at least one {'id', 'prompt', 'completion'} record.")
    seen: set[str] = set()
    for p in probes:
        if p.id in seen:
            raise InputError(f"Duplicate probe id {p.id!r}; every probe needs a unique id.")
        seen.add(p.id)
    return probes


def save_probes(probes: Iterable[Probe], path: str | Path, extra: Mapping[str, Mapping] | None = None) -> None:
    """Write probes as JSON lines, with optional extra fields per probe id (atomically: a reader never sees a part)."""
    from hf_mirror.integrity import atomic_write

    rows = (json.dumps(asdict(p) | dict((extra or {}).get(p.id, {})), ensure_ascii=False) + "\n" for p in probes)
    atomic_write(Path(path), "".join(rows).encode("utf-8"))


def _start_and_prompt(tokenizer, probe: Probe) -> list[int]:
    return [start_token_id(tokenizer), *tokenizer(probe.prompt, add_special_tokens=False)["input_ids"]]


def probe_length(tokenizer, probe: Probe) -> int:
    """The probe's tokens as the mirror sees them: the start token, the prompt's and the completion's."""
    return len(_start_and_prompt(tokenizer, probe)) + len(tokenizer(probe.completion or "", add_special_tokens=False)
                                                            ["input_ids"])


def _model_context(model) -> int:
    from hf_mirror.modeling import context_length

    return context_length(model, None, cap=1 << 62)


def _round_trip_note(completion: str) -> str:
    if "\ufffd" not in completion:
        return ""
    return (" (the generation breaks multi-byte characters: their pieces decode as '\ufffd', which re-tokenises to "
            "several tokens each)")


@torch.no_grad()
def generate_completions(
    model, tokenizer, probes: list[Probe], max_new_tokens: int = 32, device: torch.device | None = None,
    max_length: int | None = None, **gen_kwargs
) -> list[Probe]:
    """Fill in missing completions with the model's own (greedy by default) generation.

    The probe, prompt and generation together, must fit ``max_length`` tokens (default: the model's context) as it
    is tokenised again from its text: fewer than ``max_new_tokens`` tokens are generated (with a warning) where the
    prompt leaves less room, and a probe whose prompt leaves none, or whose decoded generation re-tokenises to more
    tokens than fit (partial multi-byte characters decode as U+FFFD), is refused with an InputError that names the
    ``--max-new-tokens`` that fits. Nothing is cut silently, and the model is never run past its positions.
    """
    device = device or next(model.parameters()).device
    gen_kwargs.setdefault("do_sample", False)
    limit = min(max_length or _model_context(model), _model_context(model))
    out = []
    for p in probes:
        if p.completion is not None:
            out.append(p)
            continue
        prompt = _start_and_prompt(tokenizer, p)
        room = limit - len(prompt)
        if room < 1:
            raise InputError(
                f"Probe {p.id!r}: its prompt is {len(prompt)} tokens (with the start token), and the context window is "
                f"{limit} tokens: no room is left to generate a completion. Shorten the prompt, or give the probe its "
                "completion."
            )
        n_new = min(max_new_tokens, room)
        if n_new < max_new_tokens:
            logger.warning("Probe %r: generating at most %d tokens, not --max-new-tokens %d: its %d-token prompt "
                           "leaves only %d of the %d-token context window.", p.id, n_new, max_new_tokens, len(prompt),
                           room, limit)
        input_ids = torch.tensor([prompt], device=device)
        ids = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n_new,
            pad_token_id=tokenizer.pad_token_id,
            **gen_kwargs,
        )[0, len(prompt) :].tolist()
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        probe = Probe(p.id, p.prompt, completion)
        total = probe_length(tokenizer, probe)
        if total > limit:
            fits = next((k for k in range(len(ids) - 1, 0, -1)
                         if probe_length(tokenizer, Probe(p.id, p.prompt, tokenizer.decode(
                             ids[:k], skip_special_tokens=True))) <= limit), 0)
            fix = (f"Pass --max-new-tokens {fits} (the most that fits for this probe), or give the probe a completion"
                   if fits else "Give the probe a completion, or shorten its prompt")
            raise InputError(
                f"Probe {p.id!r}: the model's {len(ids)} generated tokens decode to text that re-tokenises to "
                f"{total - len(prompt)} tokens{_round_trip_note(completion)}; with its {len(prompt)}-token prompt the "
                f"probe is {total} tokens, more than the context window of {limit} tokens. {fix}."
            )
        out.append(probe)
    return out


def check_probe_lengths(tokenizer, probes: Iterable[Probe], max_length: int, context: int | None = None) -> None:
    """Refuse (InputError, naming the fix) a probe longer than the window before anything is fitted."""
    for p in probes:
        n = probe_length(tokenizer, p)
        if n > max_length:
            raise InputError(_too_long(p, n, max_length, context))


def _too_long(probe: Probe, n: int, max_length: int, context: int | None) -> str:
    raise_it = (f", or raise --max-length (the model's context is {context} tokens)"
                if context is not None and context > max_length else "")
    return (f"Probe {probe.id!r} has {n} tokens (start token, prompt and completion), more than the context window "
            f"of {max_length} tokens (--max-length): the mirror reads a probe whole, never cut. Shorten its prompt or "
            f"completion{raise_it}.")


def encode_probe(
    tokenizer, probe: Probe, include_prompt: bool = False, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Token ids and labels for a probe; labels are -100 on the prompt unless ``include_prompt``.

    The prompt and completion are tokenised separately so the boundary is exact; like corpus documents,
    the sequence starts with the tokenizer's start token (BOS, else EOS).
    """
    if not probe.completion or not probe.completion.strip():
        raise InputError(
            f"Probe {probe.id!r} has an empty completion: there is nothing to attribute. "
            "Give a completion or leave it out so the model generates one."
        )
    prompt_ids = _start_and_prompt(tokenizer, probe)
    completion_ids = tokenizer(probe.completion, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(completion_ids)
    labels = ([IGNORE_INDEX] * len(prompt_ids) if not include_prompt else list(prompt_ids)) + list(completion_ids)
    if max_length is not None and len(ids) > max_length:
        raise InputError(_too_long(probe, len(ids), max_length, None))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}


CONTROL_PREFIX = "__control_"


def control_probes(
    documents: Iterable[tuple[object, object]],
    tokenizer,
    n: int,
    seed: int = 0,
    pool: int = 200,
    span: int = 16,
    strict: bool = True,
) -> list[Probe]:
    """``n`` control probes cut from corpus snippets (seeded pick among the first ``pool`` documents).

    With ``strict=False`` a corpus with fewer usable documents gives fewer controls instead of an error.

    Controls are fitted and scanned like probes but never reported: they give per-document normalisation
    (z-scores across probes) a reference population when the user has few probes.
    """
    import random

    texts = []
    for _, text in documents:
        if isinstance(text, str):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= 4:
                texts.append(ids)
        if len(texts) >= pool:
            break
    if len(texts) < n and not strict:
        n = len(texts)
    if len(texts) < n:
        raise InputError(
            f"The corpus has only {len(texts)} documents of 4+ tokens, too few for {n} control probes; "
            "pass more probes, or use normalize='none'."
        )
    picks = random.Random(seed).sample(range(len(texts)), n)
    out = []
    for i, j in enumerate(sorted(picks)):
        ids = texts[j][: 2 * span]
        half = max(1, len(ids) // 2)
        out.append(Probe(f"{CONTROL_PREFIX}{i}", tokenizer.decode(ids[:half]), tokenizer.decode(ids[half:])))
    return out
