"""Feature interpretation with Claude: explain a primary or secondary (integration) feature from its
activating contexts in held-out text, then score the explanation by detection on other held-out contexts.

  explain  contexts of +-8 tokens around tokens where the feature fires, the firing token marked <<so>>,
           sampled evenly from --quantiles activation bins (strongest to weakest; common/contexts.py
           quantile_rows, the feature browser's sampler, seeded with --seed + the feature), from the first
           half of the documents read; Claude returns a one-sentence explanation
  score    --n-score activating and --n-score non-activating contexts from the *other* half of those
           documents, shuffled; Claude, given only the explanation, answers 1/0 per context, matched to the
           excerpts by number (a missing or unparseable answer is counted as missing, never shifted);
           accuracy, precision, recall and F1 over the answered excerpts, and the number missing
The documents are the first --docs documents of the *test half* of the held-out split (common/data.py
heldout_half), never the selection half that picked the models' best steps; their indices are recorded.
Features come through the same code path as the stages (SAE code of the normalised activation, then the
NFM hidden layer and the secondary SAE for --kind secondary; --joint for the joint model's features).
The key is read from ANTHROPIC_API_KEY only; without it the script stops with one line before loading any
model and writes nothing. Responses are cached on disk (common/claude.py), so a rerun is free.

Demo (after part1-part3; needs a key and network):
    python interpret_features.py --features 1035 785 --out checkpoints/interpret
    python interpret_features.py --kind secondary --features 806 --out checkpoints/interpret_secondary
    python interpret_features.py --joint checkpoints/part5_joint --kind secondary --secondary checkpoints/part3_secondary_sae_joint --features 12 --out checkpoints/interpret_joint
Paper setup:
    python interpret_features.py --preset paper --sae checkpoints/paper/part1_sae --features 21781 21607 --out checkpoints/paper/interpret

Writes to --out: explanations.json, scores.json, metrics.json, prompts/<feature>_{explain,score}.txt.
"""
from __future__ import annotations

import random
import re
import time

import numpy as np
import torch

from common import cli
from common.claude import DEFAULT_MODEL, ClaudeClient, require_api_key
from common.contexts import quantile_rows
from common.data import batch_sequences, iter_test_half_sequences, keep_mask
from common.hooks import collect
from common.models import load_model
from common.loading import load_model_path

SYSTEM = ("You interpret features of a sparse autoencoder trained on a language model's activations. "
          "Be concrete and brief.")
WINDOW = 8


def build_parser():
    p = cli.parser(__doc__)
    cli.add_common_args(p, "checkpoints/interpret")
    p.add_argument("--sae", default="checkpoints/part1_sae", help="part1 output folder (default: checkpoints/part1_sae)")
    p.add_argument("--kind", choices=["primary", "secondary"], default="primary", help="feature space (default: primary)")
    p.add_argument("--joint", default=None,
                   help="part5 output folder: interpret the joint model's features instead (its SAE replaces --sae; "
                        "for --kind secondary, --secondary must be a part3 --joint run)")
    p.add_argument("--nfm", default="checkpoints/part2_nfm", help="part2 folder, for --kind secondary (default: checkpoints/part2_nfm)")
    p.add_argument("--secondary", default="checkpoints/part3_secondary_sae",
                   help="part3 folder, for --kind secondary (default: checkpoints/part3_secondary_sae)")
    p.add_argument("--features", type=int, nargs="+", required=True, help="feature indices to interpret")
    p.add_argument("--claude-model", default=DEFAULT_MODEL, help=f"Claude model id (default: {DEFAULT_MODEL})")
    p.add_argument("--docs", type=int, default=400,
                   help="held-out documents to mine, all from the test half (default: 400)")
    p.add_argument("--n-examples", type=int, default=20, help="contexts shown to explain a feature (default: 20)")
    p.add_argument("--quantiles", type=int, default=4, help="activation bins the examples are drawn from (default: 4)")
    p.add_argument("--n-score", type=int, default=10, help="activating and non-activating contexts each for scoring (default: 10)")
    p.add_argument("--lm-batch-size", type=int, default=32, help="sequences per LM forward pass (default: 32)")
    p.add_argument("--cache-dir", default=None, help="Claude response cache (default: OUT/claude_cache)")
    p.add_argument("--max-concurrency", type=int, default=4, help="Claude requests at once (default: 4)")
    return p


def context(tok, ids: list[int], pos: int) -> str:
    lo, hi = max(0, pos - WINDOW), min(len(ids), pos + WINDOW + 1)
    left = tok.decode(ids[lo:pos])
    return f"{left}<<{tok.decode(ids[pos:pos + 1]).strip()}>>{tok.decode(ids[pos + 1:hi])}".replace("\n", " ")


@torch.no_grad()
def mine(model, tok, spec, encode_feature, n_docs, batch_size):
    """For every token of the first n_docs test-half held-out documents: (slot, seq index, pos, activation of
    each feature); slot numbers those documents 0..n_docs-1. Also returns the documents' held-out indices."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs, doc_ids = [], {}
    for s, slot, di in iter_test_half_sequences(tok, spec, n_docs):
        seqs.append((s, slot))
        doc_ids[slot] = di
    records = []                                                          # (slot, seq index, pos, acts[len(features)])
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b:b + batch_size]
        ids, mask = batch_sequences([c[0] for c in chunk], pad)
        h = collect(model, spec.layer, ids.to(device), mask.to(device))
        keep = keep_mask(tok, mask, spec.keep_bos).to(device)
        acts = encode_feature(h[keep].float())                            # [n_kept, n_features]
        where = keep.nonzero().cpu()
        for (r, pos), a in zip(where.tolist(), acts.cpu().numpy()):
            records.append((chunk[r][1], b + r, pos, a))
    return seqs, records, [doc_ids[s] for s in sorted(doc_ids)]


def parse_answers(text: str, n: int) -> list[int | None]:
    """The scorer's 1/0 answer for each of the n numbered excerpts, matched by the excerpt's number ('3: 1',
    '3. 0', '3) 1', '3 - 0'); None where an answer is missing, unparseable, out of range or given twice with
    different values. A reply with no numbered answer at all is read by position only if it is exactly n
    lines of a bare 0 or 1. Never positional otherwise: one missing line must not shift the later answers."""
    found: dict[int, set[int]] = {}
    for i, v in re.findall(r"(?m)^\s*(\d+)\s*[:.)-]\s*([01])\b", text):
        found.setdefault(int(i), set()).add(int(v))
    if not found:
        bare = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        if len(bare) == n and all(b in ("0", "1") for b in bare):
            return [int(b) for b in bare]
    return [next(iter(found[i + 1])) if len(found.get(i + 1, ())) == 1 else None for i in range(n)]


def detection_scores(truth: np.ndarray, answers: list[int | None]) -> dict:
    """Accuracy, precision, recall and F1 over the answered excerpts; missing answers are counted, not guessed."""
    ok = np.array([a is not None for a in answers])
    pred = np.array([a if a is not None else -1 for a in answers])
    t, p = truth[ok], pred[ok]
    tp, fp, fn = int(((p == 1) & (t == 1)).sum()), int(((p == 1) & (t == 0)).sum()), int(((p == 0) & (t == 1)).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": float((p == t).mean()) if ok.any() else float("nan"), "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "n_activating": int(truth.sum()),
            "n_non_activating": int((1 - truth).sum()), "n_answered": int(ok.sum()), "n_missing": int((~ok).sum())}


def main(argv=None, http_client=None):
    args = cli.parse(build_parser(), argv, stage="interpret")
    require_api_key()                                     # before any model work; nothing written without it
    cli.seed_everything(args.seed)
    t0 = time.time()
    secondary = args.kind == "secondary"
    mp = load_model_path("interpretation", sae=args.sae, joint=args.joint, nfm=args.nfm if secondary else None,
                         secondary=args.secondary if secondary else None)
    sae, norm, nfm, sec, unorm, spec = mp.sae, mp.norm, mp.nfm, mp.sec, mp.unorm, mp.spec
    n_feat = (sec if args.kind == "secondary" else sae).cfg.n_latents
    bad = [f for f in args.features if not 0 <= f < n_feat]
    if bad:
        raise cli.UserError(f"--features {bad} out of range: the {args.kind} SAE has {n_feat} latents (0..{n_feat - 1}); "
                            f"pass features in that range")
    out = cli.prepare_out(args.out, args)
    client = ClaudeClient(args.claude_model, args.cache_dir or out / "claude_cache",
                          max_concurrency=args.max_concurrency, http_client=http_client)
    model, tok, _ = load_model(spec.model, args.dtype, args.device)
    feats = torch.tensor(args.features)

    def encode_feature(h):
        idx, val = sae.encode(norm.encode(h.cpu()))                   # the same per-batch code path as the stages
        if args.kind == "secondary":
            idx, val = sec.encode(unorm.encode(nfm.hidden(idx, val)))
        dense = torch.zeros(idx.shape[0], n_feat).scatter_(1, idx, val)
        return dense[:, feats]

    seqs, records, doc_ids = mine(model, tok, spec, encode_feature, args.docs, args.lm_batch_size)
    rng = random.Random(args.seed)
    n_found = 1 + max((r[0] for r in records), default=-1)
    if n_found < 2:
        raise cli.UserError(f"the held-out test half of {spec.dataset} gave {n_found} documents; need at least 2 "
                            f"(explain / score)")
    half = n_found // 2                                   # explain on the first half of the documents, score on the rest
    explain_prompts, plan = [], []
    explain_rows = np.array([r[0] < half for r in records])
    for j, f in enumerate(args.features):
        # the explained examples: common/contexts.py's quantile sampler, seeded as the feature browser's pages
        acts = np.where(explain_rows, np.array([r[3][j] for r in records], dtype=np.float32), 0.0)
        if (acts > 0).sum() < args.quantiles:
            raise cli.UserError(f"feature {f} fires on only {int((acts > 0).sum())} tokens of the first {half} held-out "
                                f"documents; use more --docs or another feature")
        per_bin = max(1, args.n_examples // args.quantiles)
        shown = [{"bin": b, "activation": float(acts[i]), "context": context(tok, seqs[records[i][1]][0], records[i][2])}
                 for b, rows in quantile_rows(acts, args.quantiles, per_bin, args.seed + f) for i in rows]
        lines = "\n".join(f"{i + 1}. [bin {e['bin']} of {args.quantiles}, 1 = strongest] {e['context']}" for i, e in enumerate(shown))
        explain_prompts.append(f"Below are text excerpts where feature {f} is active; the token it fires on is "
                               f"marked <<like this>>.\n\n{lines}\n\nIn one sentence: what does this feature detect? "
                               f"Answer with the sentence only.")
        pos = [r for r in records if r[0] >= half and r[3][j] > 0]
        neg = [r for r in records if r[0] >= half and r[3][j] == 0]
        if len(pos) < 1 or len(neg) < 1:
            raise cli.UserError(f"feature {f}: no activating or no non-activating tokens in the held-out scoring half")
        chosen = [(1, r) for r in rng.sample(pos, min(args.n_score, len(pos)))] + \
                 [(0, r) for r in rng.sample(neg, min(args.n_score, len(neg)))]
        rng.shuffle(chosen)
        plan.append({"feature": f, "examples": shown, "score_truth": [c[0] for c in chosen],
                     "score_contexts": [context(tok, seqs[r[1]][0], r[2]) for _, r in chosen]})
    explanations = client.complete_many(explain_prompts, system=SYSTEM, max_tokens=200)
    score_prompts = []
    for p, e in zip(plan, explanations):
        lines = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(p["score_contexts"]))
        score_prompts.append(f"A feature is described as: {e.strip()}\n\nFor each excerpt, does the feature fire on "
                             f"the token marked <<like this>>? Answer one line per excerpt as 'N: 1' or 'N: 0'.\n\n{lines}")
    answers = client.complete_many(score_prompts, system=SYSTEM, max_tokens=400)
    scores, expl = {}, {}
    (out / "prompts").mkdir(exist_ok=True)
    for p, e, ep, sp, ans in zip(plan, explanations, explain_prompts, score_prompts, answers):
        truth = np.array(p["score_truth"])
        scores[str(p["feature"])] = detection_scores(truth, parse_answers(ans, len(truth)))
        expl[str(p["feature"])] = {"explanation": e.strip(), "examples": p["examples"]}
        (out / "prompts" / f"{p['feature']}_explain.txt").write_text(ep + "\n\n--- response ---\n" + e + "\n")
        (out / "prompts" / f"{p['feature']}_score.txt").write_text(sp + "\n\n--- response ---\n" + ans + "\n")
    cli.write_json(out / "explanations.json", expl)
    cli.write_json(out / "scores.json", scores)
    cli.write_json(out / "metrics.json", {
        "stage": "interpret_features", "kind": args.kind, "model_path": "joint" if args.joint else "sequential",
        "claude_model": args.claude_model, "scores": scores,
        "documents": {"half": "test (common/data.py heldout_half)", "explain": doc_ids[:half], "score": doc_ids[half:n_found]},
        "claude_requests": client.n_requests, "claude_cache_hits": client.n_cache_hits, "claude_retries": client.n_retries,
        "definitions": __doc__.split("Demo")[0].strip(), "seconds": time.time() - t0})
    for f, s in scores.items():
        print(f"feature {f}: {expl[f]['explanation'][:100]} | detection accuracy {s['accuracy']:.2f}, F1 {s['f1']:.2f}")
    cli.report(out, out / "metrics.json", [out / "explanations.json", out / "scores.json"])


if __name__ == "__main__":
    cli.run_main(main)
