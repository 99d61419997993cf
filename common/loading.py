"""Loading a trained SAE for any stage, whatever wrote it: this project's checkpoint folders (part1, part3)
or a SAELens TopK folder (common/saelens.py). Kept apart from sae.py because the SAELens reader builds on
sae.py: a module imports only modules below it.

    load_sae_checkpoint(path)        (TopKSAE, Normalizer, config) of a part1 folder or a SAELens folder
    load_secondary_checkpoint(path)  (TopKSAE, Normalizer of its input u, config) of a part3 folder
    load_model_path(...)             the sequential SAE + NFM or the joint model, and the secondary SAE on it,
                                     with their content hashes (part8, part9, interpret_features)
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .sae import load_topk_sae
from .saelens import is_saelens_dir, load_saelens


def load_sae_checkpoint(path, flag: str = "--sae", kind: str = "sae"):
    """(sae, normalizer, config) from a part1-style checkpoint folder, or a SAELens TopK folder."""
    if kind == "sae" and is_saelens_dir(path):
        return load_saelens(path, flag)
    return load_topk_sae(path, flag, kind)


def load_secondary_checkpoint(path, flag: str = "--secondary"):
    """(secondary SAE, the normaliser of its input u, config) from a part3 checkpoint folder."""
    return load_topk_sae(path, flag, kind="secondary_sae")


@dataclass
class ModelPath:
    """What a behavioural stage (part8, part9, interpret_features) reads: the sequential SAE + NFM, or the joint
    model's SAE and NFM paths; the secondary SAE trained on that NFM; the data spec of their LM; and the
    content hash of each model (`refs`, recorded by part8 and checked by part9)."""
    sae: object
    norm: object
    nfm: object | None
    sec: object | None
    unorm: object | None
    spec: object
    refs: dict


def load_model_path(stage: str, sae: str | None = None, nfm: str | None = None, joint: str | None = None,
                    secondary: str | None = None) -> ModelPath:
    """Load --joint, or --sae (and --nfm when given); then --secondary when given, refusing one trained on
    another model path or another parent. `None` skips a model. Every problem is a one-line UserError."""
    from .checkpoint import check_parent, parent_ref
    from .data import DataSpec
    from .joint import load_joint_checkpoint
    from .nfm import load_nfm_checkpoint

    nfm_model = parent_cfg = None
    if joint:
        # a PolySAE joint model (part5 --decoder poly) stands in for the NFM where only its pairwise factors and
        # interaction representation are read (part8, interpretation); part9's linear-path control needs an NFM
        joint_model, norm, parent_cfg = load_joint_checkpoint(joint, allow_poly=stage in ("part8", "interpretation"))
        sae_model, nfm_model, role, flag, source = (joint_model.sae, joint_model.interaction_model, "joint", "--joint",
                                                    joint)
        spec = DataSpec.from_description(parent_cfg["data"])
        refs = {"path": "joint", "joint": parent_ref(parent_cfg)}
    else:
        sae_model, norm, sae_cfg = load_sae_checkpoint(sae)
        role, flag, source = "nfm", "--nfm", sae
        spec = DataSpec.from_description(sae_cfg["data"])
        refs = {"path": "sequential", "sae": parent_ref(sae_cfg)}
        if nfm:
            nfm_model, parent_cfg = load_nfm_checkpoint(nfm, sae_cfg)
            refs["nfm"] = parent_ref(parent_cfg)
    if spec is None:
        raise UserError(f"{'--joint' if joint else '--sae'} {source} was trained on an activation file; {stage} "
                        f"needs the LM it was trained on")
    sec = unorm = None
    if secondary:
        if parent_cfg is None:
            raise UserError("--secondary needs the NFM it was trained on; pass --nfm (or --joint)")
        sec, unorm, sec_cfg = load_secondary_checkpoint(secondary)
        if role not in sec_cfg["parents"]:
            raise UserError(f"--secondary {secondary} was not trained on a {role} model; pass the part3 run made "
                            f"{'with --joint' if joint else 'on --nfm'}")
        check_parent(sec_cfg, role, parent_cfg, "--secondary", flag)
        refs["secondary"] = parent_ref(sec_cfg)
    return ModelPath(sae_model, norm, nfm_model, sec, unorm, spec, refs)
