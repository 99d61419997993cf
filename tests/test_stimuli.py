"""2x2 stimulus sets: the shipped files validate, the demo files are reproducible, every malformed case gives
a one-line error, the length check catches a confound, and word buckets map to tokens with a full report."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import UserError
from common.stimuli import (StimulusError, StimulusWarning, WordBuckets, bucket_token_ids, demo_stimuli,
                            demo_word_buckets, length_warnings, load_stimuli, load_word_buckets,
                            validate_stimuli)

ROOT = Path(__file__).resolve().parent.parent
STIM = ROOT / "stimuli"
KEYS = ["formal|emotional", "formal|neutral", "casual|emotional", "casual|neutral"]
FACTORS = {"A": {"name": "formality", "levels": ["formal", "casual"]},
           "B": {"name": "emotion", "levels": ["emotional", "neutral"]}}


def _good() -> dict:
    return {"name": "t", "factors": copy.deepcopy(FACTORS),
            "cells": {k: [f"{k} sentence number {i} here." for i in range(3)] for k in KEYS}}


def _good_buckets() -> dict:
    return {"name": "b", "factors": copy.deepcopy(FACTORS),
            "buckets": {k: [f"w{j}{i}" for i in range(2)] for j, k in enumerate(KEYS)}}


@pytest.fixture(scope="module")
def demo_sets():
    return demo_stimuli(), demo_word_buckets()


# ---------------------------------------------------------------------------------------- shipped files

def test_english_set_validates_balanced_and_length_matched():
    st = load_stimuli(STIM / "formality_emotion_en.json")
    sizes = st.sizes()
    assert len(set(sizes.values())) == 1 and min(sizes.values()) >= 50
    assert list(sizes) == [("formal", "emotional"), ("formal", "neutral"), ("casual", "emotional"), ("casual", "neutral")]
    assert length_warnings(st) == []
    rows = st.rows()
    assert len(rows) == len(st) >= 200 and rows[0][1:] == ("formal", "emotional") and rows[-1][1:] == ("casual", "neutral")
    formal = [s for s, a, _ in rows if a == "formal"]
    assert not any("'" in s.replace("s' ", "").replace("'s ", "") for s in formal), "contraction in a formal sentence"


def test_english_buckets_validate():
    wb = load_word_buckets(STIM / "word_buckets_en.json")
    assert all(len(v) >= 8 for v in wb.buckets.values())
    words = [w for v in wb.buckets.values() for w in v]
    assert len(words) == len(set(words))


def test_demo_files_are_reproducible(demo_sets):
    st, wb = demo_sets
    assert json.loads((STIM / "demo_formality_emotion.json").read_text(encoding="utf-8")) == st
    assert json.loads((STIM / "demo_word_buckets.json").read_text(encoding="utf-8")) == wb
    s = load_stimuli(STIM / "demo_formality_emotion.json")
    assert set(s.sizes().values()) == {60}
    b = load_word_buckets(STIM / "demo_word_buckets.json")
    assert all(len(v) >= 8 for v in b.buckets.values())


def test_demo_sentences_carry_the_cell_constructions_and_are_unseen(demo_sets):
    from common import demo
    from common.stimuli import _demo_seen_sentences

    st, _ = demo_sets
    seen = _demo_seen_sentences()
    for (f, e), key in zip(demo.CELLS, KEYS):
        sents = st["cells"][key]
        assert not set(sents) & seen                         # none in the LM's training docs or the pipeline corpus
        if e == "neutral":
            assert not any("!" in s for s in sents)
        mine = set(demo.INTENSIFIERS[(f, e)])
        others = {w for c in demo.CELLS if c != (f, e) for w in demo.INTENSIFIERS[c]}
        words = [set(s.replace(",", " ").replace("!", " ").replace(".", " ").split()) for s in sents]
        assert any(w & mine for w in words) and not any(w & others for w in words)


# ------------------------------------------------------------------------------------ malformed files

def _mutate_cells(fn):
    obj = _good()
    fn(obj)
    return obj


CASES = [
    ("not an object", ["a", "b"], "the top level is a JSON array, not an object"),
    ("missing factors", {"cells": _good()["cells"]}, 'missing "factors"'),
    ("missing cells", {"factors": FACTORS}, 'missing "cells"'),
    ("three levels", _mutate_cells(lambda o: o["factors"]["A"].update(levels=["formal", "casual", "x"])),
     "exactly 2 distinct"),
    ("same level twice", _mutate_cells(lambda o: o["factors"]["B"].update(levels=["neutral", "neutral"])),
     "exactly 2 distinct"),
    ("non-string level", _mutate_cells(lambda o: o["factors"]["B"].update(levels=["neutral", 3])),
     "exactly 2 distinct"),
    ("missing cell", _mutate_cells(lambda o: o["cells"].pop("casual|neutral")), "missing cell 'casual|neutral'"),
    ("unknown cell", _mutate_cells(lambda o: o["cells"].update({"casual|happy": ["x y z"]})),
     "unknown cell key 'casual|happy'"),
    ("empty cell", _mutate_cells(lambda o: o["cells"].update({"formal|neutral": []})), "empty cell 'formal|neutral'"),
    ("non-string", _mutate_cells(lambda o: o["cells"]["casual|emotional"].insert(1, 42)),
     "cell 'casual|emotional' item 1 is a JSON number"),
    ("whitespace", _mutate_cells(lambda o: o["cells"]["formal|emotional"].__setitem__(2, "   ")),
     "cell 'formal|emotional' item 2 is an empty or whitespace-only"),
    ("dup within", _mutate_cells(lambda o: o["cells"]["formal|neutral"].__setitem__(2, "FORMAL|neutral  sentence number 0 here.")),
     "twice in cell 'formal|neutral' (items 0 and 2)"),
    ("dup across", _mutate_cells(lambda o: o["cells"]["casual|neutral"].__setitem__(1, "formal|emotional sentence number 0 here.")),
     "in cell 'formal|emotional' item 0 and in cell 'casual|neutral' item 1"),
    ("unbalanced", _mutate_cells(lambda o: o["cells"]["casual|neutral"].pop()), "unbalanced cells"),
]


@pytest.mark.parametrize("label,obj,phrase", CASES, ids=[c[0] for c in CASES])
def test_malformed_sets_give_one_line_errors(tmp_path, label, obj, phrase):
    p = tmp_path / "set.json"
    p.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(StimulusError) as ei:
        load_stimuli(p)
    msg = str(ei.value)
    assert phrase in msg, msg
    assert "\n" not in msg and str(p) in msg
    assert isinstance(ei.value, UserError)


def test_invalid_json_names_line_and_column(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"factors": {},\n  "cells": [1, 2,,]}', encoding="utf-8")
    with pytest.raises(StimulusError, match=r"not valid JSON \(.* at line 2, column \d+\)") as ei:
        load_stimuli(p)
    assert "\n" not in str(ei.value)


def test_unbalanced_allowed_is_a_warning(tmp_path):
    obj = _good()
    obj["cells"]["casual|neutral"].pop()
    with pytest.warns(StimulusWarning, match="unbalanced cells"):
        st = validate_stimuli(obj, "mem", allow_unbalanced=True)
    assert st.sizes()[("casual", "neutral")] == 2 and st.warnings
    msg = st.warnings[0]
    assert "casual|neutral: 2" in msg and "formal|emotional: 3" in msg


def test_length_warning_fires_on_a_confounded_set():
    obj = _good()
    obj["cells"]["casual|neutral"] = [f"ok {i}" for i in range(3)]                 # 2 words vs 5
    st = validate_stimuli(obj, "confounded.json")
    w = length_warnings(st)
    assert len(w) >= 1 and any("'casual|neutral'" in x and "length" in x for x in w)
    assert all("\n" not in x for x in w)
    assert length_warnings(validate_stimuli(_good(), "fine.json")) == []


@pytest.mark.parametrize("mutate,phrase", [
    (lambda b: b["buckets"].pop("formal|neutral"), "missing bucket 'formal|neutral'"),
    (lambda b: b["buckets"].update({"casual|neutral": []}), "empty bucket 'casual|neutral'"),
    (lambda b: b["buckets"]["casual|emotional"].append(None), "bucket 'casual|emotional' item 2 is a JSON null"),
    (lambda b: b["buckets"]["casual|emotional"].append("w00"), "duplicate word 'w00' in bucket 'formal|emotional' and in bucket 'casual|emotional'"),
    (lambda b: b["buckets"]["formal|emotional"].append(" w9"), "leading or trailing whitespace"),
    (lambda b: b.pop("buckets"), 'missing "buckets"'),
], ids=["missing", "empty", "non-string", "duplicate", "whitespace", "no-buckets"])
def test_malformed_buckets_give_one_line_errors(tmp_path, mutate, phrase):
    obj = _good_buckets()
    mutate(obj)
    p = tmp_path / "b.json"
    p.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(StimulusError) as ei:
        load_word_buckets(p)
    assert phrase in str(ei.value) and "\n" not in str(ei.value)


# ---------------------------------------------------------------------------------------- tokenizing

@pytest.fixture(scope="module")
def tiny_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "happy", "sad", "regarding", "okay", "well", "-", "known",
                                         "ugh", "stuff", "hence"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()       # "well-known" -> "well", "-", "known"
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


def _wb(buckets: dict) -> WordBuckets:
    from common.stimuli import validate_word_buckets
    return validate_word_buckets({"factors": FACTORS, "buckets": buckets}, "mem")


def test_bucket_token_ids_first_vs_exclude(tiny_tok):
    wb = _wb({"formal|emotional": ["happy", "well-known"], "formal|neutral": ["regarding", "hence"],
              "casual|emotional": ["ugh", "zzz"], "casual|neutral": ["okay", "stuff"]})
    v = tiny_tok.get_vocab()
    ids, rep = bucket_token_ids(wb, tiny_tok, "first")
    assert ids[("formal", "emotional")] == [v["happy"], v["well"]]
    assert ids[("casual", "emotional")] == [v["ugh"]]                      # unknown word dropped
    assert ids[("casual", "neutral")] == [v["okay"], v["stuff"]]
    by_word = {e["word"]: e for e in rep}
    assert len(rep) == 8                                                   # every word reported
    assert by_word["happy"]["action"] == "single" and by_word["happy"]["tokens"] == ["happy"]
    assert by_word["well-known"]["action"] == "first-token" and by_word["well-known"]["tokens"] == ["well", "-", "known"]
    assert by_word["well-known"]["id"] == v["well"]
    assert by_word["zzz"]["action"] == "excluded-unknown" and by_word["zzz"]["id"] is None
    ids2, rep2 = bucket_token_ids(wb, tiny_tok, "exclude")
    assert ids2[("formal", "emotional")] == [v["happy"]]
    assert {e["word"]: e["action"] for e in rep2}["well-known"] == "excluded-multi-token"


def test_bucket_token_ids_shared_ids_and_empty_bucket(tiny_tok):
    wb = _wb({"formal|emotional": ["happy", "well-known"], "formal|neutral": ["regarding", "well"],
              "casual|emotional": ["ugh"], "casual|neutral": ["okay"]})
    ids, rep = bucket_token_ids(wb, tiny_tok, "first")                    # " well" reached from two buckets
    v = tiny_tok.get_vocab()
    assert v["well"] not in ids[("formal", "emotional")] + ids[("formal", "neutral")]
    assert sum(e["action"] == "excluded-shared-id" for e in rep) == 2
    wb2 = _wb({"formal|emotional": ["happy"], "formal|neutral": ["regarding"],
               "casual|emotional": ["well-known"], "casual|neutral": ["okay"]})
    with pytest.raises(StimulusError, match="bucket 'casual|emotional' has no usable token") as ei:
        bucket_token_ids(wb2, tiny_tok, "exclude")
    assert "\n" not in str(ei.value)


def test_length_in_tokens(tiny_tok):
    obj = _good()
    st = validate_stimuli(obj, "mem")
    assert length_warnings(st, tiny_tok) == []       # every sentence tokenizes to the same length


# ----------------------------------------------------------------------------------------------- CLI

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "common.stimuli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_validate(tmp_path):
    bad = tmp_path / "bad.json"
    obj = _good()
    obj["cells"]["casual|neutral"] = []
    bad.write_text(json.dumps(obj), encoding="utf-8")
    r = _cli("validate", str(bad))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "empty cell" in lines[0]
    ok = _cli("validate", str(STIM / "formality_emotion_en.json"))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 50 sentences per cell") and "warning" not in ok.stdout
    okb = _cli("validate", "--buckets", str(STIM / "word_buckets_en.json"))
    assert okb.returncode == 0 and okb.stdout.startswith("ok: 4 buckets")


# ------------------------------------------------------------------------------- blocks and the two halves

def test_shipped_sets_declare_their_matched_topics():
    for name in ("formality_emotion_en.json", "demo_formality_emotion.json"):
        st = load_stimuli(ROOT / "stimuli" / name)
        assert st.block_name == "topic" and len(st.row_blocks()) == len(st)
        for k in st.cell_keys():                                      # position i is the same topic in every cell
            assert st.block_labels[k] == st.block_labels[st.cell_keys()[0]]


def test_halves_are_disjoint_deterministic_and_balanced_within_blocks():
    import numpy as np
    from common.stats import _balanced_within_blocks
    st = load_stimuli(ROOT / "stimuli" / "formality_emotion_en.json")
    sel, test, record = st.halves()
    assert st.halves()[2] == record                                   # deterministic
    assert len(sel) == len(test) == len(st) // 2
    for k in st.cell_keys():
        cell = "|".join(k)
        s, t = set(record["selection"][cell]), set(record["test"][cell])
        assert not s & t and s | t == set(range(len(st.cells[k])))
        assert sel.cells[k] == [st.cells[k][i] for i in record["selection"][cell]]
        assert set(sel.block_labels[k]) == set(test.block_labels[k]) == set(st.block_labels[k])
    for half in (sel, test):
        rows = half.rows()
        cell = np.array([2 * (r[1] == half.levels_a[1]) + (r[2] == half.levels_b[1]) for r in rows])
        assert _balanced_within_blocks(cell, np.array(half.row_blocks()))
    nob = validate_stimuli(_good(), "mem")                            # without blocks: alternate in each cell
    s, t, rec = nob.halves()
    assert rec["selection"]["|".join(KEYS[0].split("|"))] == [0, 2] and rec["test"][KEYS[0]] == [1]


@pytest.mark.parametrize("blocks,phrase", [
    ({"name": "topic"}, 'a "labels" list'),
    ({"name": "topic", "labels": ["a", "b"]}, "has 2 labels but every cell has 3"),
    ({"name": "topic", "labels": ["a", "", "c"]}, "non-empty string"),
    ("topic", 'must be an object'),
])
def test_malformed_blocks_give_one_line_errors(blocks, phrase):
    obj = _good()
    obj["blocks"] = blocks
    with pytest.raises(StimulusError, match=phrase) as e:
        validate_stimuli(obj, "mem")
    assert "\n" not in str(e.value)
