"""The embedded demo: corpus properties (determinism, coverage, the 2x2 integration constructions), the
tiny build (loads like any HF model, learned something, reused unless the config changes) and the shipped
default build (copied, not trained, by ensure_demo_model)."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import asdict, replace

import pytest
import torch

from common import demo
from common.demo import (CELLS, CLOSINGS, INTENSIFIERS, NON_XOR_MARKER, TOPICS, XOR_MARKER, DemoConfig,
                         ensure_demo_model, generate_documents, is_xor_cell, write_corpus)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z']+", text))


# ------------------------------------------------------------------------------------------ corpus

def test_corpus_deterministic_and_seed_dependent():
    a, b, c = generate_documents(100, 0), generate_documents(100, 0), generate_documents(100, 1)
    assert a == b
    assert [r["text"] for r in a] != [r["text"] for r in c]
    assert len(set(r["text"] for r in a)) == 100  # no repeated documents


def test_all_cells_and_topics_occur_with_3_to_8_sentences():
    docs = generate_documents(2 * len(CELLS) * len(TOPICS), 0)
    combos = Counter((r["formality"], r["emotion"], r["topic"]) for r in docs)
    assert set(combos) == {(f, e, t) for f, e in CELLS for t in TOPICS}
    assert len(TOPICS) >= 6
    for r in docs:
        n = len(re.findall(r"[.!?]+(?:\s|$)", r["text"]))
        assert 3 <= n <= 8, r["text"]
        assert "\n" not in r["text"]


def test_corpus_is_varied():
    text = " ".join(r["text"] for r in generate_documents(2000, 0))
    assert len(_words(text)) > 600  # slot fillers give BPE a real vocabulary to fill


def test_xor_marker_is_set_by_the_pair_not_by_either_factor():
    docs = generate_documents(800, 3)
    has = [XOR_MARKER in r["text"] for r in docs]
    for r, h in zip(docs, has):
        assert h == is_xor_cell(r["formality"], r["emotion"])             # the pair determines it ...
        assert (NON_XOR_MARKER in r["text"]) == (not h)                    # ... and the other marker
    for key, values in (("formality", ("formal", "casual")), ("emotion", ("emotional", "neutral"))):
        for v in values:                                                   # ... each factor alone: chance
            sel = [h for r, h in zip(docs, has) if r[key] == v]
            assert abs(sum(sel) / len(sel) - 0.5) < 0.05, (key, v)
    assert is_xor_cell("formal", "neutral") and is_xor_cell("casual", "emotional")
    assert not is_xor_cell("formal", "emotional") and not is_xor_cell("casual", "neutral")


def test_intensifiers_and_closings_are_specific_to_one_cell():
    docs = generate_documents(800, 4)
    for cell in CELLS:
        own = [r for r in docs if (r["formality"], r["emotion"]) == cell]
        other = [r for r in docs if (r["formality"], r["emotion"]) != cell]
        for w in INTENSIFIERS[cell]:
            assert any(w in _words(r["text"]) for r in own), (cell, w)
            assert not any(w in _words(r["text"]) for r in other), (cell, w)
        for c in CLOSINGS[cell]:
            assert any(r["text"].endswith(c) for r in own), (cell, c)
            assert not any(c in r["text"] for r in other), (cell, c)
    all_sets = [set(INTENSIFIERS[c]) for c in CELLS]
    assert sum(len(s) for s in all_sets) == len(set().union(*all_sets))


def test_write_corpus(tmp_path):
    txt, jsl = write_corpus(tmp_path, 50, 7)
    blocks = txt.read_text(encoding="utf-8").strip().split("\n\n")
    records = [json.loads(line) for line in jsl.read_text(encoding="utf-8").splitlines()]
    assert len(blocks) == len(records) == 50
    assert blocks == [r["text"] for r in records]
    assert set(records[0]) == {"text", "formality", "emotion", "topic"}


def test_default_dir_is_under_project_root():
    assert demo.DEFAULT_DEMO_DIR == demo.PROJECT_ROOT / "checkpoints" / "demo"
    assert (demo.PROJECT_ROOT / "common" / "demo.py").is_file()


# ------------------------------------------------------------------------------------------- build

@pytest.fixture(scope="module")
def tiny_dir(tiny_demo):
    """The session's tiny build (conftest.py: ensure_demo_model with DemoConfig.tiny())."""
    return tiny_demo


def test_tiny_build_loads_like_a_hub_model(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.vocab_size == len(tok)

    text = "Meanwhile, the tour was insanely miserable tbh! I am deeply moved."
    plain = tok(text, add_special_tokens=False)["input_ids"]
    with_bos = tok(text)["input_ids"]
    assert tok.bos_token_id not in plain and with_bos == [tok.bos_token_id] + plain  # Llama-style BOS
    assert tok.decode(plain) == text
    with torch.no_grad():
        logits = model(torch.tensor([with_bos])).logits
    assert logits.shape == (1, len(with_bos), len(tok)) and torch.isfinite(logits).all()

    assert (tiny_dir / "corpus.txt").is_file() and (tiny_dir / "corpus.jsonl").is_file()
    assert not list(tiny_dir.parent.glob(f".{tiny_dir.name}.*"))  # the temporary build folder is gone


def test_tiny_build_learned(tiny_dir):
    info = json.loads((tiny_dir / demo.BUILD_FILE).read_text())
    assert info["config"] == DemoConfig.tiny().__dict__
    assert info["ln_vocab"] == pytest.approx(math.log(info["vocab_size"]))
    assert info["final_loss"] < 0.75 * info["ln_vocab"]
    assert info["final_loss"] < info["first_loss"] - 1.5
    assert info["eval_loss"] < 0.8 * info["ln_vocab"]  # held-out pipeline corpus, never trained on


def test_ensure_reuses_and_rebuilds_on_config_change(tiny_dir, tmp_path):
    files = [tiny_dir / demo.BUILD_FILE, tiny_dir / "model.safetensors"]
    before = [f.stat().st_mtime_ns for f in files]
    assert ensure_demo_model(tiny_dir, DemoConfig.tiny(), quiet=True) == tiny_dir
    assert [f.stat().st_mtime_ns for f in files] == before  # reused, not rebuilt

    # A copy, so the module fixture stays the tiny build; a cheaper config to keep the test fast.
    copy = tmp_path / "demo"
    shutil.copytree(tiny_dir, copy)
    other = replace(DemoConfig.tiny(), steps=10, n_lm_docs=200, n_corpus_docs=40)
    old_weights = (copy / "model.safetensors").read_bytes()
    assert ensure_demo_model(copy, other, quiet=True) == copy.resolve()
    info = json.loads((copy / demo.BUILD_FILE).read_text())
    assert info["config"]["steps"] == 10 and info["steps_done"] == 10
    assert (copy / "model.safetensors").read_bytes() != old_weights
    assert len((copy / "corpus.txt").read_text().strip().split("\n\n")) == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # old folder and temp folder cleaned up


# ------------------------------------------------------------------------------- the shipped build

def _no_training(*args, **kwargs):
    raise AssertionError("ensure_demo_model trained a model instead of copying the shipped build")


def test_shipped_folder_holds_the_default_build():
    d = demo.SHIPPED_DIR
    info = demo.read_build_info(d)
    assert info is not None, f"{d} is missing; rebuild it with python -m common.demo --ship"
    assert info["config"] == asdict(DemoConfig())
    assert info["steps_done"] == info["config"]["steps"]
    assert info["final_loss"] < 0.5 * info["ln_vocab"] and info["eval_loss"] < 0.5 * info["ln_vocab"]
    names = set(demo.shipped_files())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", demo.BUILD_FILE} <= names
    assert not names & set(demo.CORPUS_FILES)                          # the corpus is regenerated, not shipped
    assert (d / "model.safetensors").stat().st_size < 20e6              # float32, ~4.2M parameters
    git = shutil.which("git")
    if git and (demo.PROJECT_ROOT / ".git").exists():                   # tracked, not ignored
        for name in names:
            rc = subprocess.run([git, "check-ignore", "-q", str(d / name)], cwd=demo.PROJECT_ROOT).returncode
            assert rc == 1, f"{d / name} is ignored by git"


def test_ensure_copies_the_shipped_build_without_training(tmp_path, monkeypatch):
    from common.models import load_model

    monkeypatch.setattr(demo, "build_demo_model", _no_training)
    out = ensure_demo_model(tmp_path / "demo", quiet=True)             # the default config
    assert out == (tmp_path / "demo").resolve()
    for name in demo.shipped_files():
        assert (out / name).read_bytes() == (demo.SHIPPED_DIR / name).read_bytes(), name
    cfg = DemoConfig()
    write_corpus(tmp_path / "corpus", cfg.n_corpus_docs, cfg.corpus_seed)
    for name in demo.CORPUS_FILES:
        assert (out / name).read_bytes() == (tmp_path / "corpus" / name).read_bytes(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "demo"]    # no temporary folder left

    ids = None
    logits = []
    for path in (out, demo.SHIPPED_DIR):
        model, tok, _ = load_model(str(path), "float32", "cpu")
        ids = ids if ids is not None else torch.tensor([tok("Meanwhile, the tour was insanely miserable tbh!")["input_ids"]])
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1])

    # Up to date: reused as it is. A local rebuild with other weights: replaced by the shipped files.
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(out, quiet=True) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    (out / "model.safetensors").write_bytes(b"other weights")
    ensure_demo_model(out, quiet=True)
    assert (out / "model.safetensors").read_bytes() == (demo.SHIPPED_DIR / "model.safetensors").read_bytes()


def test_ship_then_ensure_round_trip(tiny_dir, tmp_path, monkeypatch):
    """--ship's copy (without the corpus) materialises back to the very build, corpus included, untrained;
    a config the shipped folder was not built with is still trained."""
    shipped = demo.ship_build(tiny_dir, tmp_path / "shipped")
    assert sorted(p.name for p in shipped.iterdir()) == sorted(
        p.name for p in tiny_dir.iterdir() if p.name not in demo.CORPUS_FILES)
    monkeypatch.setattr(demo, "build_demo_model", _no_training)
    out = ensure_demo_model(tmp_path / "demo", DemoConfig.tiny(), quiet=True, shipped_dir=shipped)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in tiny_dir.iterdir())
    for p in tiny_dir.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    with pytest.raises(AssertionError, match="trained a model"):
        ensure_demo_model(tmp_path / "other", replace(DemoConfig.tiny(), steps=10), quiet=True, shipped_dir=shipped)


def test_ship_refuses_the_tiny_preset(capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(["--ship", "--tiny"])
    assert e.value.code == 2 and "--ship ships the default config" in capsys.readouterr().err
