"""part9 on the demo: how often the old per-observation ANOVA and the words x prompts test call null features
significant. The null features are the ones a part9 run clamped (same firing frequency as the target); each
is clamped again at multiplier 8 on the same test-half prompts, and both tests are run on its logit changes.

    .venv/bin/python bench/part9_null_calibration.py checkpoints/seeds/seed0 checkpoints/seeds/seed1 checkpoints/seeds/seed2

Each argument is a folder holding part1_sae, part2_nfm, part3_secondary_sae and part9_clamp (as
bench/demo_seeds.py writes them; `checkpoints` for `make demo`'s). Prints, per folder, the share of null
features with p < 0.05 for A, B and A x B under each test. The old test is the two-way ANOVA over every
(prompt, word) pair with the prompt as a block (what part9 ran before issue 12); its simulated false-positive
rate in this design is 65-69% (tests/test_stats_design.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import part9_clamping_intervention as p9  # noqa: E402
from common.loading import load_model_path  # noqa: E402
from common.models import load_model  # noqa: E402
from common.stats import permutation_anova_many  # noqa: E402
from common.stimuli import bucket_token_ids, load_stimuli, load_word_buckets  # noqa: E402

EFFECTS = ("A", "B", "A:B")


def shares(folder: Path, mult: float = 8.0) -> tuple[int, dict, dict]:
    m9 = json.loads((folder / "part9_clamp" / "metrics.json").read_text())
    mp = load_model_path("bench", sae=str(folder / "part1_sae"), nfm=str(folder / "part2_nfm"),
                         secondary=str(folder / "part3_secondary_sae"))
    model, tok, _ = load_model(mp.spec.model, "auto", "cpu")
    buckets = load_word_buckets(ROOT / "stimuli" / "demo_word_buckets.json")
    ids, _ = bucket_token_ids(buckets, tok, "first")
    words = [(c, t) for c, ts in ids.items() for t in ts]
    a, b = np.array([c[0] for c, _ in words]), np.array([c[1] for c, _ in words])
    tids = torch.tensor([t for _, t in words])
    _, test, _ = load_stimuli(m9["prompts"]["stimuli"]).halves()
    prompts = [s for k in test.cell_keys() for s in test.cells[k][:m9["prompts"]["per_cell"]]]
    levels = (list(buckets.levels_a), list(buckets.levels_b))
    base = p9.run_prompts(model, tok, mp.spec.layer, prompts, None, mp.spec.keep_bos)[:, tids]
    old, new, n = dict.fromkeys(EFFECTS, 0), dict.fromkeys(EFFECTS, 0), 0
    for f in m9["null_features"]["features"]:
        clamp = p9.Clamp(mp.sae, mp.norm, mp.nfm, mp.sec, mp.unorm, "secondary", f, mult=mult)
        changes = (p9.run_prompts(model, tok, mp.spec.layer, prompts, clamp, mp.spec.keep_bos)[:, tids] - base).numpy()
        if np.allclose(changes, 0):
            continue
        n += 1
        P, W = changes.shape
        pooled = permutation_anova_many(changes.reshape(-1, 1), np.tile(a, P), np.tile(b, P), *levels,
                                        block=np.repeat(np.arange(P), W), n_perm=0)
        crossed = p9.word_tests(changes, a, b, *levels)
        for e in EFFECTS:
            old[e] += bool(pooled[e]["p_F"][0] < 0.05)
            new[e] += bool(crossed[e]["p"] < 0.05)
    return n, {e: v / max(n, 1) for e, v in old.items()}, {e: v / max(n, 1) for e, v in new.items()}


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", default=["checkpoints"],
                   help="folders holding part1_sae, part2_nfm, part3_secondary_sae and part9_clamp (default: checkpoints)")
    p.add_argument("--mult", type=float, default=8.0, help="the multiplier each null feature is clamped at (default: 8)")
    a = p.parse_args()
    for folder in a.folders:
        n, old, new = shares(Path(folder), a.mult)
        print(f"{folder}: {n} null features clamped x{a.mult:g}; p < 0.05 under the per-observation ANOVA "
              + ", ".join(f"{e} {v:.0%}" for e, v in old.items()) + "; under words x prompts "
              + ", ".join(f"{e} {v:.0%}" for e, v in new.items()), flush=True)


if __name__ == "__main__":
    main()
