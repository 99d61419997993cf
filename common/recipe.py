"""The two training recipes: this tool's own ('default') and the original study's ('reference': Claflin 2025,
arXiv 2507.00269, as its code ran), so `reproduce_reference.py` can rebuild the paper's models and fix their
defects one at a time. The reference's every value is here, once, with the line of
`../shared/reference/original_study.md` it comes from; where the reference was ambiguous or self-contradictory,
the choice made is stated in AMBIGUITIES.

    python part1_train_topk_sae.py --recipe reference            # and part2, part3, part5

`--recipe reference` sets the defaults of a stage's flags (explicit flags still win, as with --preset) and the
model options the flags do not reach (SAE without b_dec or unit-norm decoder, the reference's inits, Adam with
eps 1e-5, clipping at 1.0 and LinearLR). The recipe is saved in every checkpoint; a later stage refuses a parent
of another recipe unless given --allow-recipe-mix.

Imports nothing of the project but errors (it sits at the bottom of common/).
"""
from __future__ import annotations

from .errors import UserError

RECIPES = ("default", "reference")
DEFAULT = "default"

# ----------------------------------------------------------------------------------------- the reference
# optimizer (part1c §2.3, part2d §3.3, part15 §6.2, part10 §4.1 step 6: the same in all four)
ADAM_BETAS = (0.9, 0.999)        # §2.3 "Adam lr 1e-4, betas (0.9, 0.999), eps 1e-5, weight decay 0"
ADAM_EPS = 1e-5                  # §2.3
LR = 1e-4                        # §2.3, §3.3 "lr 1e-4", §6.2, §4.1
GRAD_CLIP = 1.0                  # §2.3 "grad-norm clip 1.0"; §3.3, §6.2, §4.1
LR_END_FACTOR = 0.1              # §2.3 "LinearLR from factor 1.0 to 0.1 over 0.8 x 500,000 = 400,000 steps"
LR_DECAY_FRACTION = 0.8          # §2.3 (see AMBIGUITIES: part2d/part15's step estimate ended the decay early)

# SAE (part1c §2.2)
SAE_B_DEC = False                # §2.2 "Decoder: linear R^50000 -> R^3200 without bias ... no b_dec subtraction"
SAE_UNIT_NORM = False            # §2.2 "No decoder-norm constraint during training; no unit-norm projection"
SAE_INIT = "linear-default-tied" # §2.2 "decoder = PyTorch default Linear init ...; encoder weight := decoder
                                 # weight^T ...; encoder bias 0"
SAE_LOSS = "mse"                 # §2.3 "Loss: MSE(x_hat, x) only"; "MSE" = mean over batch and dims (conventions)
SAE_AUXK = False                 # §2.3 "no auxiliary dead-feature loss, no resampling"
NORMALIZE = "zscore"             # §1.4 "Per-dimension z-score"

# NFM (part2d §3.2-3.3; the same module in part15 §6.1)
NFM_EMBED_STD = 0.05             # §3.2 "V ~ N(0, 0.05^2)"
NFM_LINEAR_STD = 0.01            # §3.2 "W_lin ~ N(0, 0.01^2), b_lin = 0"
NFM_MLP_STD = 0.01               # §3.2 "both MLP Linear weights ~ N(0, 0.01^2), biases 0"
NFM_DROPOUT = 0.15               # §3.2 "Dropout(p=0.15)", §3.3 "dropout 0.15"

# the joint model's truncation of the code fed to both NFM paths (part15 §6.1)
TOP_N_AT_K1024 = 512             # §6.1 "f_N = f restricted to its top TOP_N = 512 entries (both NFM pathways)"

# batch sizes in tokens (per stage)
BATCH = {"part1": 1024,          # §2.3 "batch 1,024 tokens"
         "part2": 130,           # §3.3 "batch 130"
         "part3": 2048,          # §4.1 step 6 "batch 2,048"
         "part5": 64}            # §6.2 "batch 64"

AMBIGUITIES = {
    "lr_schedule": "LinearLR 1.0 -> 0.1 over 80% of the run's steps, then 0.1 (part1c as written, §2.3). part2d "
                   "and part15 meant the same but estimated their step count in sequences, not tokens, so their "
                   "decay ended after 2,400 and 4,000 steps (§3.3, §6.2, §14.9); the paper describes 80%.",
    "top_n": "TOP_N = round(K / 2): 512 at K = 1,024 (§6.1), scaled for other K; part2d's TOP_N 500 at inference "
             "K 500 (§3.3) was a no-op, so the sequential NFM gets none.",
    "sequential_inference_k": "the sequential NFM reads the SAE at its training K. part2d ran the K = 1,024 SAE at "
                              "K = 250/500 (§3.3, §14.6), which tripled its error; that is not reproduced.",
    "precision": "float32 parameters. The reference trained in float16 without loss scaling and zeroed non-finite "
                 "gradients silently (§2.3, §14.15); here a non-finite loss stops the run.",
    "steps": "the tool's step budget (--epochs / --steps). The reference ran ~200k SAE steps (~228 epochs over "
             "0.9M tokens, §2.3) and 10 epochs per streamed chunk for the NFMs (§3.3, §6.2).",
    "final_decoder_normalisation": "none: part1c normalises decoder columns only at the end of a 500k-step run "
                                   "that was stopped at ~200k (§2.1), so the analysed SAE had free norms.",
    "normalisation_statistics": "z-score statistics from the training tokens, saved with the checkpoint. The "
                                "reference recomputed them per chunk and never saved them (§1.4); feeding raw "
                                "activations downstream is an evaluation defect switch, not part of the recipe.",
    "secondary_input": "part3 reads the post-MLP1 vector of the true bi-interaction at the SAE's training K, "
                       "z-scored per dimension (§4.1 steps 4-5); the reference's part10 ran SAE1 without TopK on "
                       "differently normalised text (§4.1, §14.4), not reproduced.",
}

# the flags --recipe reference sets (explicit flags still win)
_COMMON = {"normalize": NORMALIZE, "lr": LR, "optimizer": "adam-reference"}
FLAG_DEFAULTS = {
    "part1": {**_COMMON, "batch_size": BATCH["part1"], "auxk_alpha": 0.0},
    "part2": {"lr": LR, "optimizer": "adam-reference", "batch_size": BATCH["part2"], "dropout": NFM_DROPOUT},
    "part3": {**_COMMON, "batch_size": BATCH["part3"], "auxk_alpha": 0.0},
    "part5": {**_COMMON, "batch_size": BATCH["part5"], "auxk_alpha": 0.0, "dropout": NFM_DROPOUT},
}


# The reference's evaluation defects, each a switch (`--defects a,b` on the stages it applies to), off by default
# and announced loudly (common/cli.py) and recorded in metrics.json whenever on: name -> (what it does, stages).
DEFECTS = {
    "splice-offset": ("splice one block downstream of the training layer: the models read and write the residual "
                      "after L+1 blocks (the reference trained on hidden_states[16] and hooked model.layers[16], "
                      "§1.2, §14.2); the 'identity' variant then writes the training layer's own activation there",
                      ("part6",)),
    "raw-activations": ("feed un-normalised activations to models trained on normalised ones and write their output "
                        "back un-normalised (§1.4, §14.1)", ("part6",)),
    "token-split": ("hold out a random 10% of the training tokens (same documents and chunks as the trained-on "
                    "ones) instead of whole held-out documents; selection and test halves are the first and second "
                    "half of those rows, and bootstrap CIs run over tokens (§2.3, §14.8)",
                    ("part1", "part2", "part5")),
    "pseudo-replicated-anova": ("test the clamping experiment as the reference did: every (prompt, word) value "
                                "an independent observation, one-way ANOVAs of pooled values and an interaction F "
                                "of position-paired differences (§10.3, §14.10; common/stats.py "
                                "reference_clamping_anova), reported as the headline beside this tool's tests",
                                ("part9",)),
    "zero-ablation": ("remove an NFM path by deleting it (zero) rather than by its training mean: the headline "
                      "figures, comparisons and random baselines use the '[zero_ablation]' variants, the mean-ablated "
                      "ones become the labelled second figures (§7.1, the reference's 'SAE + linear' etc.)",
                      ("part6",)),
    "latest-as-best": ("keep the latest training step as 'best' instead of the best on the selection half (§2.1, "
                       "§14.13)", ("part1", "part2", "part3", "part5")),
}


def parse_defects(spec: str, stage: str) -> tuple[str, ...]:
    """'' or a comma-separated list of DEFECTS that apply to `stage`, in DEFECTS' order."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    bad = [n for n in names if n not in DEFECTS or stage not in DEFECTS[n][1]]
    if bad:
        ok = [n for n, (_, stages) in DEFECTS.items() if stage in stages]
        raise UserError(f"--defects: {', '.join(bad)} does not apply to {stage}; choose from {', '.join(ok) or 'none'}")
    return tuple(n for n in DEFECTS if n in names)


def defects_record(names) -> list[dict]:
    """What metrics.json records of the switches that are on."""
    return [{"name": n, "what": DEFECTS[n][0]} for n in names]


def lr_factor(step: int, total: int) -> float:
    """torch's LinearLR(start_factor=1.0, end_factor=0.1, total_iters=int(0.8 * total)) at 0-based `step`."""
    span = max(1, int(LR_DECAY_FRACTION * total))
    return 1.0 + (LR_END_FACTOR - 1.0) * min(step, span) / span


def top_n(k: int) -> int:
    """The joint model's TOP_N for a code of k active latents: 512 at k = 1,024 (§6.1), round(k / 2) otherwise."""
    return max(1, round(k * TOP_N_AT_K1024 / 1024))


def describe(name: str) -> dict:
    """What is saved in checkpoints and metrics: the recipe's name and, for the reference, its ambiguities."""
    if name not in RECIPES:
        raise UserError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return {"name": name} if name == DEFAULT else {"name": name, "source": "Claflin 2025 (arXiv 2507.00269) as its "
                                                   "code ran; common/recipe.py", "ambiguities": AMBIGUITIES}


def of(cfg: dict) -> str:
    """The recipe a checkpoint's config was trained with (checkpoints from before recipes: the default)."""
    return (cfg.get("recipe") or {}).get("name", DEFAULT)


def check_parent(child: str, parent_cfg: dict, parent_flag: str, allow_mix: bool) -> None:
    """Refuse a parent trained with another recipe, unless the user allows the mix (--allow-recipe-mix)."""
    theirs = of(parent_cfg)
    if theirs != child and not allow_mix:
        raise UserError(f"{parent_flag} {parent_cfg.get('path', '')} was trained with --recipe {theirs}, this run "
                        f"uses --recipe {child}; pass a parent of the same recipe, or --allow-recipe-mix to mix them")
