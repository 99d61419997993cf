"""Feature interpretation through the real anthropic SDK over a fake HTTP transport (no network)."""
import json

import pytest

from conftest import ROOT, run_script


def _frequent_features(pipeline, n=2):
    import torch
    from common.data import load_activation_file
    from common.loading import load_sae_checkpoint
    from common.sae import encode_all
    sae, norm, _ = load_sae_checkpoint(pipeline / "p1")
    val = next(p for p in (pipeline / "cache").glob("acts-*-validation") if p.is_dir())
    idx, v = encode_all(sae, norm.encode(load_activation_file(val, "x")[0]))
    rate = torch.bincount(idx[v > 0], minlength=sae.cfg.n_latents).float() / idx.shape[0]
    rate[(rate < 0.05) | (rate > 0.5)] = 0                  # fires often, but not everywhere: both kinds of context exist
    return [int(i) for i in rate.topk(n).indices]


def test_explain_and_score_with_a_fake_transport(pipeline, tmp_path, monkeypatch):
    import interpret_features as itf
    from common.claude import HTTPX

    seen = []

    def handler(request):
        body = json.loads(request.content)
        prompt = body["messages"][0]["content"]
        prompt = prompt if isinstance(prompt, str) else prompt[0]["text"]
        seen.append(prompt)
        if "what does this feature detect" in prompt:
            text = "Fires on sentence-initial tokens."
        else:                                                   # the scorer says "fires" for every excerpt
            n = sum(1 for line in prompt.splitlines() if line[:1].isdigit())
            text = "\n".join(f"{i + 1}: 1" for i in range(n))
        return HTTPX.Response(200, json={"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                                         "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                                         "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 5}})

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-SECRET123")
    feats = _frequent_features(pipeline)
    out = tmp_path / "interp"
    client = HTTPX.Client(transport=HTTPX.MockTransport(handler))
    itf.main(["--sae", str(pipeline / "p1"), "--features", *map(str, feats), "--docs", "60", "--n-examples", "8",
              "--n-score", "5", "--out", str(out)], http_client=client)
    expl = json.loads((out / "explanations.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    assert set(expl) == set(scores) == {str(f) for f in feats}
    for f in feats:
        assert expl[str(f)]["explanation"] == "Fires on sentence-initial tokens."
        assert all("<<" in e["context"] for e in expl[str(f)]["examples"])
        s = scores[str(f)]
        # an all-"fires" scorer: recall 1, precision = share of activating excerpts, accuracy the same
        share = s["n_activating"] / (s["n_activating"] + s["n_non_activating"])
        assert s["recall"] == 1.0 and abs(s["precision"] - share) < 1e-12 and abs(s["accuracy"] - share) < 1e-12
    assert len(seen) == 2 * len(feats)
    # every context came from test-half held-out documents (part1 records both halves of what it held out)
    docs = json.loads((out / "metrics.json").read_text())["documents"]
    halves = json.loads((pipeline / "p1" / "metrics.json").read_text())["held_out_documents"]
    used = docs["explain"] + docs["score"]
    assert used and not set(used) & set(halves["selection"]) and not set(docs["explain"]) & set(docs["score"])
    known = [d for d in used if d <= max(halves["selection"] + halves["test"])]
    assert known and set(known) <= set(halves["test"])
    for p in out.rglob("*"):
        if p.is_file():
            assert b"SECRET123" not in p.read_bytes(), p
    # a rerun is served from the cache: no new request
    itf.main(["--sae", str(pipeline / "p1"), "--features", *map(str, feats), "--docs", "60", "--n-examples", "8",
              "--n-score", "5", "--out", str(out), "--overwrite"], http_client=client)
    assert len(seen) == 2 * len(feats)
    assert json.loads((out / "metrics.json").read_text())["claude_cache_hits"] == 2 * len(feats)
    # the explained examples come from the shared quantile sampler: bins in order, strongest bin's values highest
    for f in feats:
        ex = expl[str(f)]["examples"]
        assert [e["bin"] for e in ex] == sorted(e["bin"] for e in ex)
        assert min(e["activation"] for e in ex if e["bin"] == 1) >= max(e["activation"] for e in ex if e["bin"] == 4)
    # the feature browser shows the explanation, its score and the examples Claude saw, beside its own contexts
    import browse_features as bf
    site = tmp_path / "site"
    bf.main(["--sae", str(pipeline / "p1"), "--nfm", "", "--secondary", "", "--features", *map(str, feats),
             "--interpret", str(out), "--val-tokens", "3000", "--cache-dir", str(pipeline / "cache"), "--out", str(site)])
    index = (site / "index.html").read_text()
    assert index.count(">Fires on sentence-initial tokens.</td>") == len(feats) and "detection accuracy" in index
    page = (site / "features" / "primary" / f"{feats[0]}.html").read_text()
    assert "The examples Claude saw" in page and page.count("&lt;&lt;") >= len(expl[str(feats[0])]["examples"])


def test_missing_key_is_one_line_and_writes_nothing(pipeline, tmp_path):
    env_out = tmp_path / "never"
    proc = run_script("interpret_features.py", "--sae", str(pipeline / "p1"), "--features", "0", "--out", str(env_out),
                      check=False, env_remove=("ANTHROPIC_API_KEY",))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "ANTHROPIC_API_KEY" in lines[0]
    assert not env_out.exists()


def _fake(reply_text):
    from common.claude import HTTPX

    def handler(request):
        body = json.loads(request.content)
        return HTTPX.Response(200, json={"id": "m", "type": "message", "role": "assistant", "model": body["model"],
                                         "content": [{"type": "text", "text": reply_text}], "stop_reason": "end_turn",
                                         "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}})
    return HTTPX.Client(transport=HTTPX.MockTransport(handler))


def test_generate_stimuli_validates_and_saves(pipeline, tmp_path, monkeypatch):
    import part8_stimulus_response as p8
    from common.cli import UserError
    from common.stimuli import load_stimuli
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-SECRET123")
    good = json.loads((ROOT / "stimuli" / "formality_emotion_en.json").read_text())
    target = tmp_path / "generated.json"

    def argv(stim, out="p8"):
        return ["--sae", str(pipeline / "p1"), "--nfm", str(pipeline / "p2"), "--secondary", "", "--stimuli", str(stim),
                "--generate-stimuli", "formality x emotion in everyday English", "--out", str(tmp_path / out)]

    p8.main(argv(target), http_client=_fake("Here it is:\n" + json.dumps(good)))
    assert load_stimuli(target).sizes() == load_stimuli(ROOT / "stimuli" / "formality_emotion_en.json").sizes()
    assert (tmp_path / "p8" / "metrics.json").is_file()
    with pytest.raises(UserError, match="exists"):                        # never overwrites a set
        p8.main(argv(target), http_client=_fake(json.dumps(good)))
    bad = dict(good, cells={**good["cells"], "casual|neutral": []})       # an empty cell is refused
    other = tmp_path / "bad.json"
    with pytest.raises(UserError, match="empty") as e:
        p8.main(argv(other, "p8b"), http_client=_fake(json.dumps(bad)))   # own cache: the prompt is the same
    assert "\n" not in str(e.value) and not other.exists()


def test_answers_are_matched_by_number_and_missing_ones_are_not_shifted():
    from interpret_features import detection_scores, parse_answers
    import numpy as np
    # answer 3 of 5 is missing: the later answers keep their numbers
    assert parse_answers("1: 1\n2: 0\n4: 1\n5: 0", 5) == [1, 0, None, 1, 0]
    # the old reading took bare 0/1 tokens in order, the excerpt numbers included
    assert parse_answers("1. 1\n2) 0\n3 - 1\nthe rest: unsure", 4) == [1, 0, 1, None]
    assert parse_answers("2: 1\n1: 0", 2) == [0, 1]                     # order of the lines does not matter
    assert parse_answers("1: 1\n1: 0\n2: 1", 2) == [None, 1]           # contradictory answers: missing
    assert parse_answers("1: yes\n2: 7\n9: 1", 2) == [None, None]      # unparseable and out of range
    assert parse_answers("1\n0\n1", 3) == [1, 0, 1]                    # bare lines, exactly one per excerpt
    assert parse_answers("1\n0", 3) == [None, None, None]
    s = detection_scores(np.array([1, 0, 1, 0, 1]), [1, 0, None, 1, 1])
    assert s["n_missing"] == 1 and s["n_answered"] == 4 and s["accuracy"] == 0.75
    assert s["precision"] == 2 / 3 and s["recall"] == 1.0
