"""Text sources, document split, BOS/pad handling, activation collection and activation files."""
import pytest
import torch

from common.cli import UserError
from common.data import (DataSpec, _wikitext_articles, batch_sequences, cached_activations, collect_activations,
                         iter_documents, iter_sequences, keep_mask, load_activation_file, save_activation_file,
                         split_rows)



def test_split_is_by_document_and_stable(tiny_demo):
    corpus = str(tiny_demo / "corpus.txt")
    train = list(iter_documents(corpus, "train", 0.2))
    val = list(iter_documents(corpus, "validation", 0.2))
    assert train and val
    assert not set(train) & set(val)
    assert list(iter_documents(corpus, "validation", 0.2)) == val       # deterministic
    n = len(train) + len(val)
    assert 0.1 < len(val) / n < 0.3


def test_folder_of_text_files_and_unknown_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("first doc line one\nline two\n\nsecond doc\n")
    (tmp_path / "b.txt").write_text("third doc\n")
    docs = list(iter_documents(str(tmp_path), "train", 0.0))
    assert docs == ["first doc line one\nline two", "second doc", "third doc"]
    with pytest.raises(UserError, match="unknown --dataset"):
        list(iter_documents("no-such-dataset", "train", 0.1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        list(iter_documents(str(tmp_path / "empty"), "train", 0.1))


def test_wikitext_rows_grouped_into_articles():
    rows = [" = Alpha = \n", "", " alpha text . \n", " = = Section = = \n", " more alpha \n",
            " = Beta = \n", " beta text \n"]
    arts = list(_wikitext_articles(iter(rows)))
    assert len(arts) == 2
    assert arts[0].startswith("= Alpha =") and "Section" in arts[0]
    assert arts[1].startswith("= Beta =")


def test_sequences_never_cross_documents_and_start_with_bos(tiny_lm):
    _, tok = tiny_lm
    docs = ["one two three four five six seven eight nine ten " * 3, "short doc here"]
    seqs = list(iter_sequences(tok, iter(docs), seq_len=8))
    assert all(s[0] == tok.bos_token_id and len(s) <= 8 for s, _ in seqs)
    doc_of = [d for _, d in seqs]
    assert doc_of == sorted(doc_of) and set(doc_of) == {0, 1}
    body = [t for s, d in seqs if d == 0 for t in s[1:]]
    assert body == tok(docs[0], add_special_tokens=False)["input_ids"][:len(body)]


def test_bos_and_pad_excluded_unless_asked(tiny_lm):
    _, tok = tiny_lm
    ids, mask = batch_sequences([[tok.bos_token_id, 5, 6, 7], [tok.bos_token_id, 8]], tok.pad_token_id)
    keep = keep_mask(tok, mask, keep_bos=False)
    assert keep.tolist() == [[False, True, True, True], [False, True, False, False]]
    assert keep_mask(tok, mask, keep_bos=True).tolist() == [[True, True, True, True], [True, True, False, False]]


def test_collected_rows_equal_hidden_states_at_kept_positions(tiny_lm, tiny_demo):
    model, tok = tiny_lm
    spec = DataSpec(model=str(tiny_demo), layer=1, dataset=str(tiny_demo / "corpus.txt"), seq_len=16)
    acts, docs = collect_activations(model, tok, spec, "validation", max_tokens=50, lm_batch_size=4)
    assert acts.shape == (50, model.config.hidden_size) and docs.shape == (50,)
    first = [s for s, _ in iter_sequences(tok, iter_documents(spec.dataset, "validation", 0.1), 16)][:4]
    ids, mask = batch_sequences(first, tok.pad_token_id)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    expected = hs[keep_mask(tok, mask, False)][:50]
    assert torch.allclose(acts[:len(expected)], expected, atol=1e-6)


def _spec(tiny_demo, layer=1):
    return DataSpec(model=str(tiny_demo), layer=layer, dataset=str(tiny_demo / "corpus.txt"), seq_len=16)


def _entries(cache_dir):
    return sorted(p for p in cache_dir.glob("acts-*") if p.is_dir())


def test_activation_cache_is_reused(tiny_demo, tmp_path):
    spec = _spec(tiny_demo)
    lm = {}
    a1, _ = cached_activations(spec, "train", 40, 4, str(tmp_path), "float32", "cpu", lm)
    assert "model" in lm and len(_entries(tmp_path)) == 1
    lm2 = {}
    a2, _ = cached_activations(spec, "train", 40, 4, str(tmp_path), "float32", "cpu", lm2)
    assert "model" not in lm2                    # served from the cache, no LM loaded
    assert torch.equal(a1, a2) and a1.dtype == torch.bfloat16      # default --cache-dtype
    other = DataSpec(**{**spec.__dict__, "layer": 2})
    cached_activations(other, "train", 40, 4, str(tmp_path), "float32", "cpu", lm)
    assert len(_entries(tmp_path)) == 2          # a different layer is a different cache entry
    cached_activations(spec, "train", 40, 4, str(tmp_path), "float32", "cpu", lm, cache_dtype="float16")
    assert len(_entries(tmp_path)) == 3          # ... and so is a different storage dtype


@pytest.mark.parametrize("cache_dtype", ["bfloat16", "float16", "float32"])
def test_cache_shards_and_manifest_reload_equal_the_collection(tiny_lm, tiny_demo, tmp_path, cache_dtype):
    import json

    from common.data import CACHE_DTYPES
    model, tok = tiny_lm
    spec = _spec(tiny_demo)
    want, want_docs = collect_activations(model, tok, spec, "train", 300, 4)       # float32 (the LM's dtype)
    lm = {"model": model, "tokenizer": tok}
    got, docs = cached_activations(spec, "train", 300, 4, str(tmp_path), "float32", "cpu", lm,
                                   cache_dtype=cache_dtype, shard_tokens=64)
    assert got.dtype == CACHE_DTYPES[cache_dtype] and torch.equal(got, want.to(got.dtype))
    assert torch.equal(docs, want_docs)
    (entry,) = _entries(tmp_path)
    man = json.loads((entry / "manifest.json").read_text())
    assert man["complete"] and man["rows"] == 300 and man["dtype"] == cache_dtype and man["d"] == got.shape[1]
    assert len(man["shards"]) >= 3 and all(s["rows"] >= 64 or s is man["shards"][-1] for s in man["shards"])
    assert sum(s["rows"] for s in man["shards"]) == 300
    assert sorted(p.name for p in entry.glob("*.safetensors")) == [s["file"] for s in man["shards"]]
    assert not list(entry.glob(".*"))                                            # no temporary files left
    lm2 = {}
    again, docs2 = cached_activations(spec, "train", 300, 4, str(tmp_path), "float32", "cpu", lm2,
                                      cache_dtype=cache_dtype, shard_tokens=64)
    assert "model" not in lm2 and torch.equal(again, got) and torch.equal(docs2, docs)
    # a complete entry is also an activation file for --activations
    acts, adocs = load_activation_file(entry, "--activations", width=got.shape[1])
    assert torch.equal(acts, got) and torch.equal(adocs, docs)


def test_interrupted_collection_resumes_to_the_same_result(tiny_lm, tiny_demo, tmp_path, monkeypatch):
    import json

    import common.data as data
    model, tok = tiny_lm
    spec = _spec(tiny_demo)
    lm = {"model": model, "tokenizer": tok}
    ref, ref_docs = cached_activations(spec, "train", 400, 4, str(tmp_path / "ref"), "float32", "cpu", lm,
                                       shard_tokens=50)

    # 1. the collection dies after its third shard (e.g. killed, out of memory)
    real_save, saved = data.atomic_save_tensors, []

    def dying_save(path, tensors, metadata=None):
        if len(saved) == 3:
            raise KeyboardInterrupt
        saved.append(path)
        real_save(path, tensors, metadata)

    monkeypatch.setattr(data, "atomic_save_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cached_activations(spec, "train", 400, 4, str(tmp_path / "c"), "float32", "cpu", lm, shard_tokens=50)
    monkeypatch.setattr(data, "atomic_save_tensors", real_save)
    (entry,) = _entries(tmp_path / "c")
    man = json.loads((entry / "manifest.json").read_text())
    assert not man["complete"] and len(man["shards"]) == 3 and 0 < man["rows"] < 400

    # the resumed run skips the sequences already consumed: fewer LM rows are collected than from scratch
    batches = []
    real_batches = data._collected_batches

    def counting(*a, **k):
        for b in real_batches(*a, **k):
            batches.append(b[0].shape[0])
            yield b

    monkeypatch.setattr(data, "_collected_batches", counting)
    got, docs = cached_activations(spec, "train", 400, 4, str(tmp_path / "c"), "float32", "cpu", lm, shard_tokens=50)
    assert sum(batches) == 400 - man["rows"]
    assert torch.equal(got, ref) and torch.equal(docs, ref_docs)
    assert json.loads((entry / "manifest.json").read_text())["complete"]

    # 2. a shard that went missing: the manifest is cut back to the shards before it, and collection resumes
    man = json.loads((entry / "manifest.json").read_text())
    (entry / man["shards"][2]["file"]).unlink()
    batches.clear()
    got, docs = cached_activations(spec, "train", 400, 4, str(tmp_path / "c"), "float32", "cpu", lm, shard_tokens=50)
    assert sum(batches) == 400 - sum(s["rows"] for s in man["shards"][:2])
    assert torch.equal(got, ref) and torch.equal(docs, ref_docs)

    # 3. a manifest truncated by hand to k shards resumes too; a different shard size still gives the same rows
    man = json.loads((entry / "manifest.json").read_text())
    k = 1
    man.update(shards=man["shards"][:k], rows=sum(s["rows"] for s in man["shards"][:k]),
               sequences=man["shards"][k - 1]["sequences"], complete=False)
    (entry / "manifest.json").write_text(json.dumps(man))
    got, docs = cached_activations(spec, "train", 400, 4, str(tmp_path / "c"), "float32", "cpu", lm, shard_tokens=120)
    assert torch.equal(got, ref) and torch.equal(docs, ref_docs)

    # 4. garbage in the manifest: the entry starts afresh
    (entry / "manifest.json").write_text("{not json")
    got, _ = cached_activations(spec, "train", 400, 4, str(tmp_path / "c"), "float32", "cpu", lm, shard_tokens=50)
    assert torch.equal(got, ref)


def test_float16_overflow_is_a_user_error(tiny_lm, tiny_demo, tmp_path, monkeypatch):
    import common.data as data
    model, tok = tiny_lm
    spec = _spec(tiny_demo)
    real = data._collected_batches

    def massive(*a, **k):                  # an LLM residual stream with a massive activation
        for acts, docs, n in real(*a, **k):
            acts = acts.clone()
            acts[0, 0] = 1e5
            yield acts, docs, n

    monkeypatch.setattr(data, "_collected_batches", massive)
    lm = {"model": model, "tokenizer": tok}
    for cache_dir in (str(tmp_path), ""):
        with pytest.raises(UserError, match=r"beyond the float16 range.*--cache-dtype bfloat16") as e:
            cached_activations(spec, "train", 40, 4, cache_dir, "float32", "cpu", lm, cache_dtype="float16")
        assert "\n" not in str(e.value)
    got, _ = cached_activations(spec, "train", 40, 4, str(tmp_path), "float32", "cpu", lm)   # bfloat16 holds it
    assert got.dtype == torch.bfloat16 and got[0, 0].item() == pytest.approx(1e5, rel=1e-2)


def test_uncached_collection_uses_the_cache_dtype_too(tiny_lm, tiny_demo, tmp_path):
    model, tok = tiny_lm
    spec = _spec(tiny_demo)
    lm = {"model": model, "tokenizer": tok}
    cached, _ = cached_activations(spec, "validation", 60, 4, str(tmp_path), "float32", "cpu", lm)
    uncached, _ = cached_activations(spec, "validation", 60, 4, "", "float32", "cpu", lm)
    assert not list(tmp_path.glob("*")) or len(_entries(tmp_path)) == 1
    assert torch.equal(cached, uncached) and uncached.dtype == torch.bfloat16


def test_normalizer_on_half_precision_activations_matches_float32():
    from common.normalize import Normalizer
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5000, 64, generator=g) * 3 + torch.randn(64, generator=g)).bfloat16()
    x[:, 3] *= 1000                                            # a massive-activation dimension
    for mode in ("scalar", "zscore"):
        half, full = Normalizer.fit(x, mode), Normalizer.fit(x.float(), mode)
        assert torch.equal(half.shift, full.shift) and torch.equal(half.scale, full.scale)
        enc = half.encode(x)
        assert enc.dtype == torch.float32 and torch.equal(enc, full.encode(x.float()))


def test_activation_file_validation(tmp_path):
    good = tmp_path / "good.safetensors"
    save_activation_file(good, torch.randn(10, 4).half())
    acts, docs = load_activation_file(good, "--activations", width=4)
    assert acts.dtype == torch.float16 and docs is None
    cases = {
        "width": (torch.randn(10, 3), "width 3"),
        "dtype": (torch.randint(0, 5, (10, 4)), "dtype"),
        "nan": (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), "NaN"),
        "shape": (torch.randn(10), "2-D"),
    }
    for name, (t, msg) in cases.items():
        p = tmp_path / f"{name}.safetensors"
        save_activation_file(p, t)
        with pytest.raises(UserError, match=msg):
            load_activation_file(p, "--activations", width=4 if name == "width" else None)
    from safetensors.torch import save_file
    save_file({"acts": torch.zeros(2, 2)}, str(tmp_path / "key.safetensors"))
    with pytest.raises(UserError, match="no tensor named 'activations'"):
        load_activation_file(tmp_path / "key.safetensors", "--activations")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_activation_file(tmp_path / "junk.safetensors", "--activations")
    with pytest.raises(UserError, match="no such file"):
        load_activation_file(tmp_path / "missing.safetensors", "--activations")


def test_split_rows_at_document_boundary():
    acts = torch.arange(100.0)[:, None]
    docs = torch.arange(100) // 7
    (tr, trd), (va, vad) = split_rows(acts, docs, 0.1)
    assert not set(trd.tolist()) & set(vad.tolist())
    assert tr.shape[0] + va.shape[0] == 100 and 10 <= va.shape[0] < 10 + 7   # moved back to a document start


def test_refuses_a_model_changed_since_the_parent_was_trained(tiny_demo, tmp_path):
    from argparse import Namespace

    from common.data import get_activations, model_fingerprint
    args = Namespace(activations=None, val_activations=None, train_tokens=30, val_tokens=30, lm_batch_size=4,
                     cache_dir=str(tmp_path), dtype="float32", device="cpu")
    spec = DataSpec(model=str(tiny_demo), layer=1, dataset=str(tiny_demo / "corpus.txt"), seq_len=16)
    acts = get_activations(args, spec, parent={"model_fingerprint": model_fingerprint(str(tiny_demo))})
    assert acts.description["model_fingerprint"] == model_fingerprint(str(tiny_demo))
    with pytest.raises(UserError, match="changed on disk"):
        get_activations(args, spec, parent={"model_fingerprint": "something-else"})



def test_per_sentence_codes_equal_the_dense_aggregation():
    from common.data import per_sentence, per_sentence_codes
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(20, generator=g)[:4] for _ in range(30)])
    val = torch.rand(30, 4, generator=g)
    val[::5, 0] = 0                                            # picked but not firing
    owner = torch.sort(torch.randint(0, 6, (30,), generator=g)).values
    dense = torch.zeros(30, 20).scatter_(1, idx, val)
    for how in ("mean", "max"):
        want = per_sentence(dense, owner, 7, how)
        want[torch.isinf(want)] = 0                             # sentence 6 has no tokens
        assert torch.allclose(per_sentence_codes(idx, val, owner, 7, 20, how), want.clamp_min(0), atol=1e-6), how
