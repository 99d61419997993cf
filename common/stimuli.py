"""2x2 stimulus sets for behavioural experiments: load, validate, check lengths, map word buckets to tokens.

A *stimulus set* is a JSON file that crosses two factors with two levels each, e.g. formality x emotion:

    {"name": "formality_emotion_en",
     "description": "free text: where the sentences come from, how they were written",
     "factors": {"A": {"name": "formality", "levels": ["formal", "casual"]},
                 "B": {"name": "emotion",   "levels": ["emotional", "neutral"]}},
     "cells": {"formal|emotional": ["sentence", ...], "formal|neutral": [...],
               "casual|emotional": [...], "casual|neutral": [...]}}

An optional blocking factor says which positions are matched across cells (e.g. the topic of sentence i is the
same in every cell); it needs balanced cells and gives one label per position:

     "blocks": {"name": "topic", "labels": ["work", "work", ..., "technology"]}

part8 then permutes labels within blocks and adds the block to its ANOVA. `StimulusSet.halves()` splits the set
by sentence within each cell into a *selection* half (part8 picks features on it) and a *test* half (part8's
confirmation and part9's prompts), deterministically: the positions of each block (or of the whole cell) in
file order alternate selection, test, selection, ... (every other block starting with test, so the halves are
of equal size), so both halves keep every block in every cell and stay balanced within blocks.

Cell keys are "<levelA>|<levelB>"; all four must be present and no other. Every cell is a non-empty list of
non-empty strings; no sentence may occur twice (within or across cells; compared ignoring case and runs of
whitespace); every cell has the same number of sentences (unbalanced cells are an error unless
`allow_unbalanced=True` / `--allow-unbalanced`, which turns it into a warning). "name" (default: the file
name) and "description" are optional; other top-level keys are ignored.

A *word-bucket* file has the same "factors" block and, instead of "cells", one bucket of words per cell:

    {"name": "...", "factors": {...}, "buckets": {"formal|emotional": ["devastated", ...], ...}}

Every bucket has at least one word; no word is in two buckets or twice in one (exact comparison: case changes
the tokens); words have no leading or trailing whitespace. Buckets may differ in size.

Every malformed file raises `StimulusError` (a `common.cli.UserError`) with ONE line naming the file, the
problem and the fix, so the command line prints `error: ...` and exits with status 2.

    python -m common.stimuli validate FILE [--buckets] [--allow-unbalanced] [--tokenizer DIR_OR_ID]
    python -m common.stimuli make-demo [--out stimuli/]

`validate` prints "ok: N sentences per cell" and any length warnings (cell mean lengths, in words, or in
tokens with --tokenizer, more than 20% from the grand mean: a confound for any per-sentence measure); with
--buckets it validates a word-bucket file and, with --tokenizer, reports how each word tokenizes. `make-demo`
writes the two demo files (demo_formality_emotion.json, demo_word_buckets.json) built from the grammar of the
embedded demo corpus (`common.demo`), so they are reproducible: `demo_stimuli()` and `demo_word_buckets()`.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .cli import UserError, run_main

CELL_SEP = "|"
DEMO_STIMULI_FILE = "demo_formality_emotion.json"
DEMO_BUCKETS_FILE = "demo_word_buckets.json"


class StimulusError(UserError):
    """A malformed stimulus or word-bucket file. One line: the file, the problem, the fix."""


class StimulusWarning(UserWarning):
    """A stimulus set that is usable but questionable (e.g. unbalanced cells, when allowed)."""


# ---------------------------------------------------------------------------------------- data types

@dataclass
class StimulusSet:
    name: str
    factor_a: str
    factor_b: str
    levels_a: tuple[str, str]
    levels_b: tuple[str, str]
    cells: dict[tuple[str, str], list[str]]       # in cell_keys() order
    description: str = ""
    source: str = ""
    warnings: list[str] = field(default_factory=list)   # e.g. unbalanced cells when allowed
    block_name: str | None = None                       # the blocking factor, e.g. "topic" (None: no blocks)
    block_labels: dict[tuple[str, str], list[str]] | None = None   # per cell, one label per sentence

    def cell_keys(self) -> list[tuple[str, str]]:
        """(level_a, level_b) for every cell, A-major: (a0, b0), (a0, b1), (a1, b0), (a1, b1)."""
        return [(a, b) for a in self.levels_a for b in self.levels_b]

    def rows(self) -> list[tuple[str, str, str]]:
        """(sentence, level_a, level_b) for every sentence: cells in cell_keys() order, file order within a cell."""
        return [(s, a, b) for a, b in self.cell_keys() for s in self.cells[(a, b)]]

    def row_blocks(self) -> list[str] | None:
        """The block label of every row of rows() (None when the set has no blocking factor)."""
        if self.block_labels is None:
            return None
        return [lab for k in self.cell_keys() for lab in self.block_labels[k]]

    def halves(self) -> tuple["StimulusSet", "StimulusSet", dict]:
        """(selection half, test half, a record of the split for metrics.json), split by sentence within each
        cell: the positions of each block (the whole cell without blocks) alternate selection, test, ... (the
        first, third, ... block starting with selection, the others with test, so odd-sized blocks even out)."""
        parts: dict[str, dict] = {"selection": {}, "test": {}}
        for k in self.cell_keys():
            labels = self.block_labels[k] if self.block_labels is not None else [""] * len(self.cells[k])
            order = list(dict.fromkeys(labels))            # blocks in order of first appearance
            rank = {lab: j % 2 for j, lab in enumerate(order)}  # odd blocks start with test: halves of equal size
            for i, lab in enumerate(labels):
                half = "selection" if rank[lab] % 2 == 0 else "test"
                rank[lab] += 1
                parts[half].setdefault(k, []).append(i)
        sets = []
        for half in ("selection", "test"):
            pos = parts[half]
            if any(not pos.get(k) for k in self.cell_keys()):
                raise StimulusError(f"{self.source}: a cell has too few sentences to split into a selection and a "
                                    f"test half; give every cell at least 2 sentences")
            sets.append(StimulusSet(
                name=f"{self.name} ({half} half)", factor_a=self.factor_a, factor_b=self.factor_b,
                levels_a=self.levels_a, levels_b=self.levels_b,
                cells={k: [self.cells[k][i] for i in pos[k]] for k in self.cell_keys()},
                description=self.description, source=self.source, warnings=list(self.warnings),
                block_name=self.block_name,
                block_labels=None if self.block_labels is None else
                {k: [self.block_labels[k][i] for i in pos[k]] for k in self.cell_keys()}))
        record = {"rule": "by sentence within each cell: the positions of each block (of the whole cell when the "
                          "set has no blocks) alternate selection, test, selection, ... in file order, the 1st, "
                          "3rd, ... block (in order of first appearance) starting with selection, the others with test",
                  "blocking_factor": self.block_name,
                  **{half: {cell_key_str(k): parts[half][k] for k in self.cell_keys()} for half in parts}}
        return sets[0], sets[1], record

    def sizes(self) -> dict[tuple[str, str], int]:
        return {k: len(self.cells[k]) for k in self.cell_keys()}

    def __len__(self) -> int:
        return sum(self.sizes().values())


@dataclass
class WordBuckets:
    name: str
    factor_a: str
    factor_b: str
    levels_a: tuple[str, str]
    levels_b: tuple[str, str]
    buckets: dict[tuple[str, str], list[str]]     # in cell_keys() order
    description: str = ""
    source: str = ""

    def cell_keys(self) -> list[tuple[str, str]]:
        return [(a, b) for a in self.levels_a for b in self.levels_b]


def cell_key_str(key: tuple[str, str]) -> str:
    return f"{key[0]}{CELL_SEP}{key[1]}"


# ------------------------------------------------------------------------------------------ validation

def _read_json(path: str | Path, what: str):
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StimulusError(f"{p}: no such file; check the path") from None
    except IsADirectoryError:
        raise StimulusError(f"{p}: is a folder, not a {what} file; give the path of the .json file") from None
    except UnicodeDecodeError as e:
        raise StimulusError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise StimulusError(f"{p}: cannot read it ({e.strerror}); check the path and permissions") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StimulusError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); fix the syntax "
                            f"there (python -m json.tool {p} shows it)") from None


def _jtype(v) -> str:
    """The JSON name of a parsed value's type."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(v), type(v).__name__)


def _short(s, n: int = 60) -> str:
    r = repr(s)
    return r if len(r) <= n else r[:n - 4] + "...'"


def _validate_factors(obj, source: str, body_key: str):
    """The common part: a top-level object with "factors" and `body_key`. Returns (name, description,
    factor_a, factor_b, levels_a, levels_b)."""
    example = ('{"A": {"name": "formality", "levels": ["formal", "casual"]}, '
               '"B": {"name": "emotion", "levels": ["emotional", "neutral"]}}')
    if not isinstance(obj, dict):
        raise StimulusError(f"{source}: the top level is a JSON {_jtype(obj)}, "
                            f"not an object; write {{\"name\": ..., \"factors\": ..., \"{body_key}\": ...}}")
    for key in ("factors", body_key):
        if key not in obj:
            raise StimulusError(f"{source}: missing \"{key}\"; add it at the top level (see the format in "
                                f"stimuli/README.md)")
    name = obj.get("name", Path(source).stem)
    if not isinstance(name, str) or not name.strip():
        raise StimulusError(f"{source}: \"name\" must be a non-empty string, got {_short(name)}; fix it or remove it")
    desc = obj.get("description", "")
    if not isinstance(desc, str):
        raise StimulusError(f"{source}: \"description\" must be a string, got a JSON {_jtype(desc)}; fix it or remove it")
    factors = obj["factors"]
    if not isinstance(factors, dict) or set(factors) != {"A", "B"}:
        got = sorted(factors) if isinstance(factors, dict) else f"a JSON {_jtype(factors)}"
        raise StimulusError(f"{source}: \"factors\" must be an object with exactly the keys \"A\" and \"B\", got {got}; "
                            f"write e.g. {example}")
    out = []
    for fk in ("A", "B"):
        f = factors[fk]
        if not isinstance(f, dict):
            raise StimulusError(f"{source}: factor {fk} must be an object with \"name\" and \"levels\"; "
                                f"write e.g. {example}")
        fname = f.get("name")
        if not isinstance(fname, str) or not fname.strip():
            raise StimulusError(f"{source}: factor {fk} needs a non-empty string \"name\", got {_short(fname)}; "
                                f"name it, e.g. \"formality\"")
        levels = f.get("levels")
        if (not isinstance(levels, list) or len(levels) != 2
                or not all(isinstance(v, str) and v.strip() for v in levels) or levels[0] == levels[1]):
            raise StimulusError(f"{source}: factor {fk} ({fname}) must have exactly 2 distinct non-empty string "
                                f"levels, got {_short(levels, 80)}; write e.g. \"levels\": [\"formal\", \"casual\"]")
        for v in levels:
            if CELL_SEP in v or v != v.strip():
                raise StimulusError(f"{source}: factor {fk} level {v!r} contains '{CELL_SEP}' or surrounding spaces; "
                                    f"rename it (cell keys are \"<levelA>{CELL_SEP}<levelB>\")")
        out.append((fname, tuple(levels)))
    (fa, la), (fb, lb) = out
    if set(la) & set(lb):
        raise StimulusError(f"{source}: factors A and B share the level name(s) {sorted(set(la) & set(lb))}; "
                            f"give every level a distinct name")
    return name, desc, fa, fb, la, lb


def _validate_keys(body, source: str, body_key: str, la, lb, unit: str) -> list[tuple[str, str]]:
    keys = [(a, b) for a in la for b in lb]
    expected = [cell_key_str(k) for k in keys]
    if not isinstance(body, dict):
        raise StimulusError(f"{source}: \"{body_key}\" must be an object mapping the cell keys {expected} to lists "
                            f"of {unit}s, got a JSON {_jtype(body)}; fix it")
    missing = [k for k in expected if k not in body]
    if missing:
        raise StimulusError(f"{source}: missing {body_key[:-1]} {missing[0]!r}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; \"{body_key}\" needs "
                            f"exactly the keys {expected} (\"<levelA>{CELL_SEP}<levelB>\" with the levels of \"factors\")")
    extra = [k for k in body if k not in expected]
    if extra:
        raise StimulusError(f"{source}: unknown {body_key[:-1]} key {extra[0]!r} in \"{body_key}\"; the only keys "
                            f"allowed are {expected} (\"<levelA>{CELL_SEP}<levelB>\"); rename or remove it")
    for k in expected:
        v = body[k]
        if not isinstance(v, list):
            raise StimulusError(f"{source}: {body_key[:-1]} {k!r} must be a list of {unit}s, got a JSON "
                                f"{_jtype(v)}; write [\"...\", \"...\"]")
        if not v:
            raise StimulusError(f"{source}: empty {body_key[:-1]} {k!r}; add {unit}s to it (every "
                                f"{body_key[:-1]} needs at least one)")
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise StimulusError(f"{source}: {body_key[:-1]} {k!r} item {i} is a JSON {_jtype(s)} "
                                    f"({_short(s)}), not a string; quote it or remove it")
            if not s.strip():
                raise StimulusError(f"{source}: {body_key[:-1]} {k!r} item {i} is an empty or whitespace-only "
                                    f"{unit}; write the {unit} or remove the item")
    return keys


def _norm_sentence(s: str) -> str:
    return " ".join(s.split()).casefold()


def validate_stimuli(obj, source: str, allow_unbalanced: bool = False) -> StimulusSet:
    """Check a parsed stimulus-set object (see the module docstring); `source` names it in errors."""
    name, desc, fa, fb, la, lb = _validate_factors(obj, source, "cells")
    keys = _validate_keys(obj["cells"], source, "cells", la, lb, "sentence")
    cells = {k: list(obj["cells"][cell_key_str(k)]) for k in keys}
    seen: dict[str, tuple[str, int]] = {}
    for k in keys:
        for i, s in enumerate(cells[k]):
            n = _norm_sentence(s)
            if n in seen:
                ck, ci = seen[n]
                where = f"twice in cell {ck!r} (items {ci} and {i})" if ck == cell_key_str(k) else \
                    f"in cell {ck!r} item {ci} and in cell {cell_key_str(k)!r} item {i}"
                raise StimulusError(f"{source}: duplicate sentence {_short(s)} {where} (compared ignoring case and "
                                    f"spacing); remove or rewrite one")
            seen[n] = (cell_key_str(k), i)
    sizes = {k: len(cells[k]) for k in keys}
    found: list[str] = []
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{cell_key_str(k)}: {n}" for k, n in sizes.items())
        if not allow_unbalanced:
            raise StimulusError(f"{source}: unbalanced cells ({listing}); give every cell the same number of "
                                f"sentences, or pass allow_unbalanced=True (--allow-unbalanced) to accept it with a warning")
        msg = f"{source}: unbalanced cells ({listing}); effects and interactions are estimated with unequal weights"
        found.append(msg)
        warnings.warn(msg, StimulusWarning, stacklevel=2)
    block_name, block_labels = _validate_blocks(obj.get("blocks"), source, sizes)
    return StimulusSet(name=name, factor_a=fa, factor_b=fb, levels_a=la, levels_b=lb, cells=cells,
                       description=desc, source=source, warnings=found, block_name=block_name,
                       block_labels=None if block_labels is None else {k: list(block_labels) for k in keys})


def _validate_blocks(blocks, source: str, sizes: dict) -> tuple[str | None, list[str] | None]:
    """The optional "blocks": {"name": str, "labels": [one string per position]}, positions matched across cells."""
    if blocks is None:
        return None, None
    example = '"blocks": {"name": "topic", "labels": ["work", "work", ...]} (one label per sentence position)'
    if not isinstance(blocks, dict) or not isinstance(blocks.get("name"), str) or not blocks["name"].strip() \
            or not isinstance(blocks.get("labels"), list):
        raise StimulusError(f"{source}: \"blocks\" must be an object with a \"name\" and a \"labels\" list; write {example}")
    labels = blocks["labels"]
    if any(not isinstance(x, str) or not x.strip() for x in labels):
        raise StimulusError(f"{source}: every block label must be a non-empty string; fix \"blocks\".\"labels\"")
    if len(set(sizes.values())) > 1:
        raise StimulusError(f"{source}: \"blocks\" needs balanced cells (position i is matched across cells); "
                            f"balance the cells or remove \"blocks\"")
    n = next(iter(sizes.values()))
    if len(labels) != n:
        raise StimulusError(f"{source}: \"blocks\" has {len(labels)} labels but every cell has {n} sentences; give "
                            f"one label per sentence position")
    return blocks["name"], labels


def load_stimuli(path: str | Path, allow_unbalanced: bool = False) -> StimulusSet:
    """Read and validate a stimulus-set JSON file; StimulusError (one line) if it is malformed."""
    return validate_stimuli(_read_json(path, "stimulus-set"), str(path), allow_unbalanced=allow_unbalanced)


def validate_word_buckets(obj, source: str) -> WordBuckets:
    """Check a parsed word-bucket object (see the module docstring); `source` names it in errors."""
    name, desc, fa, fb, la, lb = _validate_factors(obj, source, "buckets")
    keys = _validate_keys(obj["buckets"], source, "buckets", la, lb, "word")
    buckets = {k: list(obj["buckets"][cell_key_str(k)]) for k in keys}
    seen: dict[str, tuple[str, int]] = {}
    for k in keys:
        for i, w in enumerate(buckets[k]):
            if w != w.strip():
                raise StimulusError(f"{source}: bucket {cell_key_str(k)!r} word {w!r} has leading or trailing "
                                    f"whitespace; remove it (a single space is put before each word when tokenizing)")
            if w in seen:
                ck, ci = seen[w]
                where = f"twice in bucket {ck!r} (items {ci} and {i})" if ck == cell_key_str(k) else \
                    f"in bucket {ck!r} and in bucket {cell_key_str(k)!r}"
                raise StimulusError(f"{source}: duplicate word {w!r} {where}; every word must be in exactly one "
                                    f"bucket, remove one")
            seen[w] = (cell_key_str(k), i)
    return WordBuckets(name=name, factor_a=fa, factor_b=fb, levels_a=la, levels_b=lb, buckets=buckets,
                       description=desc, source=source)


def load_word_buckets(path: str | Path) -> WordBuckets:
    """Read and validate a word-bucket JSON file; StimulusError (one line) if it is malformed."""
    return validate_word_buckets(_read_json(path, "word-bucket"), str(path))


# -------------------------------------------------------------------------------------- length check

def sentence_lengths(stimset: StimulusSet, tokenizer=None) -> dict[tuple[str, str], list[int]]:
    """Length of every sentence per cell: tokens (no special tokens) with a tokenizer, else words."""
    out = {}
    for k in stimset.cell_keys():
        sents = stimset.cells[k]
        if tokenizer is None:
            out[k] = [len(s.split()) for s in sents]
        else:
            out[k] = [len(ids) for ids in tokenizer(list(sents), add_special_tokens=False)["input_ids"]]
    return out


def length_warnings(stimset: StimulusSet, tokenizer=None, threshold: float = 0.2) -> list[str]:
    """One printable line per cell whose mean length is more than `threshold` (relative) away from the grand
    mean of the cell means: sentence length is a confound for any per-sentence measure (activation norms,
    feature counts, losses summed over tokens). Empty when the cells are comparable."""
    lengths = sentence_lengths(stimset, tokenizer)
    unit = "tokens" if tokenizer is not None else "words"
    means = {k: sum(v) / len(v) for k, v in lengths.items()}
    grand = sum(means.values()) / len(means)
    out = []
    for k, m in means.items():
        rel = (m - grand) / grand if grand else 0.0
        if abs(rel) > threshold:
            out.append(f"length confound in {stimset.source or stimset.name}: cell {cell_key_str(k)!r} has mean "
                       f"length {m:.1f} {unit} vs grand mean {grand:.1f} ({rel:+.0%}, threshold ±{threshold:.0%}); "
                       f"make lengths similar across cells or control for length in the analysis")
    return out


# ------------------------------------------------------------------------------------ bucket -> tokens

def bucket_token_ids(buckets: WordBuckets, tokenizer, multi_token: str = "first"
                     ) -> tuple[dict[tuple[str, str], list[int]], list[dict]]:
    """Token ids per bucket, as each word appears after a space: tokenizer(" " + word, add_special_tokens=False).

    Single-token words map to their id. Multi-token words map to their first token (multi_token="first") or
    are dropped ("exclude"). Words containing the tokenizer's unknown token, or giving no tokens, are dropped.
    An id already taken by an earlier word of the same bucket is kept once; an id reached from two different
    buckets is dropped from both (it cannot tell the cells apart). The report has one dict per word:
    {"bucket", "word", "tokens", "ids", "action", "id"} with action one of "single", "first-token",
    "excluded-multi-token", "excluded-unknown", "excluded-no-tokens", "duplicate-id", "excluded-shared-id";
    "id" is the id used, or None. StimulusError if a bucket ends up empty."""
    if multi_token not in ("first", "exclude"):
        raise StimulusError(f"multi_token must be 'first' or 'exclude', got {multi_token!r}")
    unk = getattr(tokenizer, "unk_token_id", None)
    report: list[dict] = []
    ids: dict[tuple[str, str], list[int]] = {}
    for k in buckets.cell_keys():
        ids[k] = []
        for w in buckets.buckets[k]:
            tids = list(tokenizer(" " + w, add_special_tokens=False)["input_ids"])
            toks = tokenizer.convert_ids_to_tokens(tids) if tids else []
            entry = {"bucket": cell_key_str(k), "word": w, "tokens": list(toks), "ids": tids, "action": "", "id": None}
            if not tids:
                entry["action"] = "excluded-no-tokens"
            elif unk is not None and unk in tids:
                entry["action"] = "excluded-unknown"
            elif len(tids) == 1:
                entry["action"], entry["id"] = "single", tids[0]
            elif multi_token == "first":
                entry["action"], entry["id"] = "first-token", tids[0]
            else:
                entry["action"] = "excluded-multi-token"
            if entry["id"] is not None:
                if entry["id"] in ids[k]:
                    entry["action"] = "duplicate-id"
                else:
                    ids[k].append(entry["id"])
            report.append(entry)
    # ids reached from more than one bucket carry no cell information: drop them everywhere.
    owners: dict[int, set] = {}
    for k, v in ids.items():
        for i in v:
            owners.setdefault(i, set()).add(k)
    shared = {i for i, o in owners.items() if len(o) > 1}
    if shared:
        for k in ids:
            ids[k] = [i for i in ids[k] if i not in shared]
        for e in report:
            if e["id"] in shared:
                e["action"], e["id"] = "excluded-shared-id", None
    for k, v in ids.items():
        if not v:
            words = [e["word"] for e in report if e["bucket"] == cell_key_str(k)]
            raise StimulusError(f"{buckets.source or buckets.name}: bucket {cell_key_str(k)!r} has no usable token "
                                f"left (words {words[:5]}{'...' if len(words) > 5 else ''}: multi-token, unknown or "
                                f"shared with another bucket); add single-token words or use multi_token='first' (--multi-token first)")
    return ids, report


def token_report_lines(report: list[dict]) -> list[str]:
    """Human-readable lines for a bucket_token_ids report: a summary per bucket, then every non-single word."""
    lines, by_bucket = [], {}
    for e in report:
        by_bucket.setdefault(e["bucket"], []).append(e)
    for b, es in by_bucket.items():
        counts: dict[str, int] = {}
        for e in es:
            counts[e["action"]] = counts.get(e["action"], 0) + 1
        lines.append(f"{b}: {len([e for e in es if e['id'] is not None])} ids from {len(es)} words ("
                     + ", ".join(f"{a} {n}" for a, n in counts.items()) + ")")
    for e in report:
        if e["action"] != "single":
            lines.append(f"  {e['bucket']} {e['word']!r} -> {e['tokens']}: {e['action']}")
    return lines


# --------------------------------------------------------------------------------------------- demo

def _grammar_words(s: str) -> list[str]:
    """Literal words of a demo template (slots like {n1} removed)."""
    return re.findall(r"[A-Za-z][A-Za-z']*", re.sub(r"\{[a-z0-9]+\}", " ", s))


def _demo_signal_words() -> tuple[dict, dict, dict]:
    """From the demo grammar: (cell_words, formality_words, emotion_words).

    cell_words[(f, e)]: words (in grammar order: intensifiers, closings, emotion-specific shapes) that the demo
    corpus uses only in that cell. formality_words[f] / emotion_words[e]: lower-cased words that occur in
    sentences of that level only (a sentence containing one carries that level's signal)."""
    from . import demo as D

    shared: list[str] = []
    for tw in D.TOPIC_WORDS.values():
        for x in tw["nouns"] + tw["adjs"] + [p for v in tw["verbs"] for p in v]:
            shared += _grammar_words(x)
    for lst in (D.NAMES, D.PLACES, D.DAYS, D.TIMES, D.RELATIONS, [D.XOR_MARKER, D.NON_XOR_MARKER],
                ["five ten twenty forty"]):
        for x in lst:
            shared += _grammar_words(x)

    def cell_src(c):
        out = list(D.INTENSIFIERS[c])
        for s in D.CLOSINGS[c] + D.EMOTION_TEMPLATES[c]:
            out += _grammar_words(s)
        return out

    def reg_src(f):
        return [w for s in D.REGISTER_TEMPLATES[f] + D.OPENERS[f] + D.TAILS[f] for w in _grammar_words(s)]

    def emo_src(e):
        return [w for w in (D.EMOTIONAL_ADJECTIVES if e == "emotional" else D.NEUTRAL_ADJECTIVES)]

    low = lambda ws: {w.lower() for w in ws}  # noqa: E731
    cell_words = {}
    for c in D.CELLS:
        other = low(shared) | low(w for f in D.FORMALITIES for w in reg_src(f)) \
            | low(w for e in D.EMOTIONS for w in emo_src(e)) \
            | low(w for c2 in D.CELLS if c2 != c for w in cell_src(c2))
        words, seen = [], set()
        for w in cell_src(c):
            if w.lower() not in other and w.lower() not in seen:
                words.append(w)
                seen.add(w.lower())
        cell_words[c] = words

    form_src = {f: low(reg_src(f)) | low(w for c in D.CELLS if c[0] == f for w in cell_src(c)) for f in D.FORMALITIES}
    emo_all = {e: low(emo_src(e)) | low(w for c in D.CELLS if c[1] == e for w in cell_src(c)) for e in D.EMOTIONS}
    formality_words = {f: form_src[f] - set().union(*(form_src[g] for g in D.FORMALITIES if g != f)) - low(shared)
                       for f in D.FORMALITIES}
    # An emotion signal must not also be a formality-shared register word (those occur in both emotions).
    reg_all = low(w for f in D.FORMALITIES for w in reg_src(f))
    emotion_words = {e: emo_all[e] - set().union(*(emo_all[g] for g in D.EMOTIONS if g != e)) - low(shared) - reg_all
                     for e in D.EMOTIONS}
    return cell_words, formality_words, emotion_words


def _demo_factors() -> dict:
    from . import demo as D
    return {"A": {"name": "formality", "levels": list(D.FORMALITIES)},
            "B": {"name": "emotion", "levels": list(D.EMOTIONS)}}


def _demo_seen_sentences() -> set[str]:
    """Every sentence of the demo LM's training documents (lm_seed) and of the pipeline corpus (corpus_seed)."""
    from . import demo as D

    cfg = D.DemoConfig()
    seen: set[str] = set()
    for n, seed in ((cfg.n_lm_docs, cfg.lm_seed), (cfg.n_corpus_docs, cfg.corpus_seed)):
        for r in D.generate_documents(n, seed):
            seen.update(re.split(r"(?<=[.!]) ", r["text"]))   # demo sentences end in . or ! and are space-joined
    return seen


def demo_stimuli(n_per_cell: int = 60, seed: int = 12345) -> dict:
    """A balanced stimulus set (the JSON dict) from the demo grammar: `n_per_cell` single sentences per cell made by
    common.demo.make_sentence, topics cycling through common.demo.TOPICS, with a seed different from the demo
    LM's (DemoConfig.lm_seed = 0) and the pipeline corpus' (corpus_seed = 1).

    A sentence is kept only if (1) it carries its cell's signal on both factors, i.e. it contains a word the
    demo grammar uses only for its formality level and one used only for its emotion level (a register-only
    shape such as "Please be advised that the {n1} will be {tadj} {day}" says nothing about emotion, and is
    skipped); (2) it is new: not already in the set (ignoring case) and not a sentence of the documents the
    demo LM trained on or of the pipeline corpus. Deterministic for (n_per_cell, seed)."""
    from . import demo as D

    if seed in (D.DemoConfig().lm_seed, D.DemoConfig().corpus_seed):
        raise StimulusError(f"seed {seed} is the demo LM's or the pipeline corpus' seed; use another (default 12345)")
    if n_per_cell < 1:
        raise StimulusError(f"n_per_cell must be at least 1, got {n_per_cell}")
    _, fwords, ewords = _demo_signal_words()
    seen_corpus = _demo_seen_sentences()
    rng = random.Random(seed)
    used: set[str] = set()
    cells: dict[str, list[str]] = {}
    for f, e in D.CELLS:
        out: list[str] = []
        tries = 0
        while len(out) < n_per_cell:
            topic = D.TOPICS[len(out) % len(D.TOPICS)]
            s = D.make_sentence(rng, f, e, topic)
            tries += 1
            if tries > 200 * n_per_cell:
                raise StimulusError(f"could only make {len(out)} new sentences for cell {f}|{e} from the demo "
                                    f"grammar; ask for fewer (n_per_cell)")
            words = {w.lower() for w in re.findall(r"[A-Za-z][A-Za-z']*", s)}
            if not (words & fwords[f] and words & ewords[e]):
                continue
            if s.casefold() in used or s in seen_corpus:
                continue
            used.add(s.casefold())
            out.append(s)
        cells[f"{f}{CELL_SEP}{e}"] = out
    return {
        "name": "demo_formality_emotion",
        "description": (f"Single sentences from the embedded demo grammar (common.demo.make_sentence), {n_per_cell} "
                        f"per cell, topics cycling through the demo's {len(D.TOPICS)} topics, seed {seed} (the demo LM "
                        f"trains on seed-0 documents, the pipeline corpus is seed 1). Each sentence contains a word "
                        f"the grammar uses only for its formality level and one only for its emotion level; none "
                        f"occurs in the LM's training documents or the pipeline corpus. Document-level constructions "
                        f"(the XOR marker, closings) are not included; see demo_word_buckets.json. \"blocks\" gives "
                        f"each position's topic (the same in every cell). Rebuild with: "
                        f"python -m common.stimuli make-demo --out stimuli/"),
        "factors": _demo_factors(),
        "cells": cells,
        "blocks": {"name": "topic", "labels": [D.TOPICS[i % len(D.TOPICS)] for i in range(n_per_cell)]},
    }


def demo_word_buckets(n_per_bucket: int | None = None) -> dict:
    """Word buckets (the JSON dict) from the demo grammar's cell-specific words: for each (formality, emotion)
    cell the words the demo corpus uses only in that cell, in the order intensifiers (INTENSIFIERS), closing
    phrases (CLOSINGS), then the cell's emotion-specific sentence shapes (EMOTION_TEMPLATES); case-insensitive
    duplicates and words with an apostrophe removed. Every bucket is cut to `n_per_bucket` words (default: the
    smallest bucket's size, so the buckets are balanced; the demo grammar has 19 to 24 such words per cell, so
    19). All of them are single tokens of the demo tokenizer."""
    # Words with an apostrophe ("we're") are left out: their first token (" we") is not cell-specific.
    cell_words = {c: [w for w in ws if "'" not in w] for c, ws in _demo_signal_words()[0].items()}
    n = n_per_bucket or min(len(v) for v in cell_words.values())
    return {
        "name": "demo_word_buckets",
        "description": (f"Words the embedded demo grammar (common.demo) uses in only one formality x emotion cell: "
                        f"intensifiers, closing phrases, then words of the cell's emotion-specific sentence shapes; "
                        f"{n} per bucket (the smallest cell has {min(len(v) for v in cell_words.values())}). Some "
                        f"are ordinary words ('how', 'or', 'during') that only this cell's shapes use. Rebuild with: "
                        f"python -m common.stimuli make-demo --out stimuli/"),
        "factors": _demo_factors(),
        "buckets": {f"{f}{CELL_SEP}{e}": words[:n] for (f, e), words in cell_words.items()},
    }


GENERATE_SYSTEM = "You write balanced stimulus sets for 2x2 psycholinguistic experiments. Reply with JSON only."


def generate_stimuli(client, description: str, factor_a: str, levels_a: list[str], factor_b: str,
                     levels_b: list[str], n_per_cell: int = 50) -> dict:
    """Ask Claude (a common.claude.ClaudeClient) for a new 2x2 set in this module's format; the reply is
    validated like any file (StimulusError on anything malformed) before it is returned."""
    cells = {f"{a}{CELL_SEP}{b}": [] for a in levels_a for b in levels_b}
    skeleton = {"name": "generated", "description": description,
                "factors": {"A": {"name": factor_a, "levels": list(levels_a)}, "B": {"name": factor_b, "levels": list(levels_b)}},
                "cells": cells}
    prompt = (f"Write a 2x2 stimulus set: {description}\n\nFill every cell with exactly {n_per_cell} distinct, natural, "
              f"single English sentences that express that cell's combination of levels, varied in topic and with "
              f"similar lengths across cells. Reply with this JSON object, cells filled, and nothing else:\n"
              f"{json.dumps(skeleton, indent=1)}")
    text = client.complete(prompt, system=GENERATE_SYSTEM, max_tokens=16000)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise StimulusError("Claude's reply holds no JSON object; rerun, or write the set by hand (format: stimuli/README.md)")
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        raise StimulusError(f"Claude's reply is not valid JSON ({e.msg}, line {e.lineno}); rerun, or write the set by hand") from None
    validate_stimuli(obj, "the generated set")
    return obj


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- CLI

def _load_tokenizer(name: str):
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any load failure is the user's path/id
        first = str(e).splitlines()[0] if str(e) else ""
        raise StimulusError(f"cannot load tokenizer {name!r} ({type(e).__name__}: {first}); "
                            f"give a local model folder or a Hugging Face id") from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m common.stimuli", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="check a stimulus-set (or, with --buckets, a word-bucket) JSON file")
    v.add_argument("file", help="the JSON file")
    v.add_argument("--buckets", action="store_true", help="the file is a word-bucket file, not a stimulus set")
    v.add_argument("--allow-unbalanced", action="store_true",
                   help="accept cells of different sizes with a warning instead of an error")
    v.add_argument("--tokenizer", default=None, metavar="DIR_OR_ID",
                   help="measure lengths in tokens of this tokenizer (default: words); with --buckets, report how "
                        "each word tokenizes")
    v.add_argument("--threshold", type=float, default=0.2,
                   help="relative deviation of a cell's mean length from the grand mean that warns (default: 0.2)")
    m = sub.add_parser("make-demo", help="write the demo stimulus set and word buckets built from common.demo")
    m.add_argument("--out", default="stimuli", help="folder to write them to (default: stimuli)")
    m.add_argument("--n-per-cell", type=int, default=60, help="sentences per cell (default: 60)")
    m.add_argument("--seed", type=int, default=12345,
                   help="generation seed; not 0 or 1, the demo LM's and corpus' seeds (default: 12345)")
    a = ap.parse_args(argv)

    if a.cmd == "validate":
        tok = _load_tokenizer(a.tokenizer) if a.tokenizer else None
        if a.buckets:
            wb = load_word_buckets(a.file)
            sizes = ", ".join(f"{cell_key_str(k)} {len(wb.buckets[k])}" for k in wb.cell_keys())
            print(f"ok: {len(wb.buckets)} buckets, words per bucket: {sizes}")
            if tok is not None:
                _, rep = bucket_token_ids(wb, tok, "first")
                print("\n".join(token_report_lines(rep)))
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StimulusWarning)   # printed below instead
            st = load_stimuli(a.file, allow_unbalanced=a.allow_unbalanced)
        sizes = st.sizes()
        if len(set(sizes.values())) == 1:
            print(f"ok: {next(iter(sizes.values()))} sentences per cell ({len(sizes)} cells, {len(st)} sentences)")
        else:
            print("ok: sentences per cell: " + ", ".join(f"{cell_key_str(k)} {n}" for k, n in sizes.items()))
        for w in st.warnings + length_warnings(st, tok, a.threshold):
            print(f"warning: {w}")
    else:
        if a.n_per_cell < 1:
            raise StimulusError(f"--n-per-cell must be at least 1, got {a.n_per_cell}")
        out = Path(a.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StimulusError(f"cannot create {out} ({e.strerror}); choose another --out") from None
        st = demo_stimuli(a.n_per_cell, a.seed)
        _write_json(out / DEMO_STIMULI_FILE, st)
        _write_json(out / DEMO_BUCKETS_FILE, demo_word_buckets())
        print(f"wrote {out / DEMO_STIMULI_FILE} ({a.n_per_cell} sentences per cell) and {out / DEMO_BUCKETS_FILE}")


if __name__ == "__main__":
    run_main(main)
