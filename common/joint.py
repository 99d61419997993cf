"""Joint SAE + NFM: one TopK encoder feeding three additive paths, trained together (Claflin 2025, part15).

    idx, val = TopK(ReLU(W_enc (x - b_dec) + b_enc))                    # the shared sparse code f
    x_hat    = [W_dec f + b_dec]  +  [W_lin f + b_lin]  +  [MLP(BiInteraction(f))]
                 SAE path            NFM linear path       NFM interaction path
Loss: FVU of x_hat (as the SAE's) + AuxK on the dead latents (common/sae.py). Gradients reach the encoder
through the values of the selected latents from all three paths. The SAE recipe (tied init, unit-norm W_dec
with parallel-gradient removal, b_dec from the data) is kept for the SAE path; W_lin is unconstrained and
starts at zero, so training starts from a plain TopK SAE.

Note the design the study chose: W_dec f + W_lin f is a second linear decoder of the same code, so the
"SAE path alone" is not a standalone SAE. part5 therefore also compares against a standalone TopK SAE with
the same parameter count and token budget.
"""
from __future__ import annotations

import torch
from torch import nn

from . import dist
from .errors import UserError
from .nfm import NFM, NFMConfig, require_path_means
from .sae import SAEConfig, SharedCodePaths, TopKSAE
from .sparse import TransposedCode

# the additive paths and the variants reported for them
VARIANTS = {"sae": ("sae",), "sae+linear": ("sae", "linear"), "sae+interaction": ("sae", "interaction"),
            "full": ("sae", "linear", "interaction")}


class JointModel(SharedCodePaths, nn.Module):
    PATHS = ("sae", "linear", "interaction")
    KIND = "nfm"

    def __init__(self, sae_cfg: SAEConfig, nfm_cfg: NFMConfig):
        super().__init__()
        self.sae = TopKSAE(sae_cfg)
        self.nfm = NFM(nfm_cfg)         # nfm_cfg.top_n: the reference's TOP_N truncation of both NFM paths' code

    @property
    def interaction_model(self) -> NFM:
        """The module behind the non-SAE paths (PolyJointModel: its polynomial decoder)."""
        return self.nfm

    def paths_from(self, idx: torch.Tensor, val: torch.Tensor) -> dict[str, torch.Tensor]:
        sae = self.sae.decode(idx, val)
        idx, val = self.nfm.truncate(idx, val)                        # the reference's f_N, or the whole code
        code_t = TransposedCode(idx, val, self.sae.cfg.n_latents)     # one sort for both NFM backwards
        return {"sae": sae, "linear": self.nfm.linear(idx, val, code_t),
                "interaction": self.nfm.interaction(idx, val, code_t)}

    def loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        out, idx, val, picks = self.paths(x, aux=True)
        x_hat = out["sae"] + out["linear"] + out["interaction"]
        total_var = dist.total_variance(x).clamp_min(1e-12)     # of the global batch under torchrun
        sse = (x - x_hat).pow(2).sum()
        fvu = sse / total_var
        aux = self.sae.auxk_loss(picks, x, x_hat)
        self.sae.track_firing(idx, val, x.shape[0])
        main = fvu if self.sae.cfg.loss == "fvu" else sse / (x.numel() * dist.world())   # mse: the reference's
        return dist.scaled_loss(main + self.sae.cfg.auxk_alpha * aux, {"fvu": fvu.detach(), "auxk": aux.detach()})

    def param_counts(self) -> dict:
        sae = sum(p.numel() for p in self.sae.parameters())
        nfm = self.nfm.param_counts()
        return {"sae": sae, "nfm_linear": nfm["linear"], "nfm_interaction": nfm["interaction"],
                "total": sae + nfm["total"]}

    def hparams(self) -> dict:
        return {"sae": self.sae.hparams(), "nfm": self.nfm.hparams()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], hp: dict) -> "JointModel":
        m = cls(SAEConfig(**hp["sae"]), NFMConfig(**hp["nfm"]))
        require_path_means(t, "nfm.")
        m.load_state_dict({k: v for k, v in t.items() if not k.startswith(("norm.", "init."))})
        return m.eval()


def load_joint_checkpoint(path, flag: str = "--joint", allow_poly: bool = False):
    """(joint model, normalizer, config) from a part5 checkpoint folder: a JointModel, or, for a folder written
    by part5 --decoder poly, a common.poly.PolyJointModel when the caller reads one (allow_poly); otherwise
    that is a one-line UserError."""
    from .checkpoint import load
    from .normalize import Normalizer

    tensors, cfg = load(path, "joint", flag)
    decoder = cfg["hparams"].get("decoder", "nfm")
    if decoder == "poly":
        if not allow_poly:
            raise UserError(f"{flag} {path} is a PolySAE joint model (part5 --decoder poly), which this stage cannot "
                            f"read (it needs the NFM's linear path and MLP); pass a part5 folder trained with "
                            f"--decoder nfm")
        from .poly import PolyJointModel
        model = PolyJointModel.from_tensors(tensors, cfg["hparams"])
    elif decoder == "nfm":
        model = JointModel.from_tensors(tensors, cfg["hparams"])
    else:
        raise UserError(f"{flag} {path} has an unknown joint decoder {decoder!r}; pass a part5 folder")
    return model, Normalizer.from_tensors(tensors, cfg["normalize"]), cfg


def variants(model) -> dict:
    """The variants part5 reports for this joint model: name -> the paths kept."""
    if getattr(model, "KIND", "nfm") == "poly":
        from .poly import VARIANTS as POLY_VARIANTS
        return POLY_VARIANTS
    return VARIANTS


@torch.no_grad()
def path_outputs(model: JointModel, x: torch.Tensor, batch: int = 4096) -> dict[str, torch.Tensor]:
    """Each path's output for many normalised rows, on the CPU (model.PATHS: a PolyJointModel has no "linear")."""
    from .train import batched, module_device

    model.eval()
    names = model.PATHS
    outs = batched(lambda xb: tuple(model.paths(xb.float())[0][n] for n in names), x, batch=batch,
                   device=module_device(model))
    return dict(zip(names, outs))
