"""SAELens interop (common/saelens.py): export folds our normalisation in, import folds SAELens's run-time
options, later stages accept a SAELens folder as --sae, and unrepresentable SAEs are refused.

The SAELens forward is re-implemented here in plain torch from sae_lens/saes/topk_sae.py (6.x), so these tests
run without sae-lens; `test_real_saelens_*` run the real library where it is installed
(bench/.venv-peers; `python bench/check_saelens.py`)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, run_script
from common import checkpoint
from common.cli import UserError
from common.data import DataSpec
from common.normalize import Normalizer
from common.loading import load_sae_checkpoint
from common.sae import SAEConfig, TopKSAE
from common.saelens import export_saelens, is_saelens_dir, load_saelens

D, N, K = 16, 64, 8
DESC = {"source": "model", "model": "org/some-model", "layer": 3, "dataset": "demo", "seq_len": 48,
        "keep_bos": True, "val_fraction": 0.2, "split": "by document", "train_tokens": 5000, "val_tokens": 1000}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def our_sae_folder(path, seed: int = 0):
    """A part1-style folder (saved as part1 saves it) with random weights and a zscore-like normaliser."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SAEConfig(d=D, n_latents=N, k=K))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(N, D, generator=g))
        sae.b_enc.copy_(torch.randn(N, generator=g) * 0.5)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1))
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.3)
    norm = Normalizer(torch.randn(D, generator=g) * 2, torch.rand(D, generator=g) * 3 + 0.3, "zscore")
    checkpoint.save(path, "sae", {**sae.tensors(), **norm.tensors(), "init.sq_norm": torch.ones(N)}, {
        "hparams": sae.hparams(), "normalize": "zscore", "data": DESC, "seed": 0, "parents": {}})
    return sae.eval(), norm


def raw_x(norm: Normalizer, n: int = 256, seed: int = 1) -> torch.Tensor:
    """Raw activations in the range the normaliser was fitted to."""
    return norm.decode(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)))


def ours(sae: TopKSAE, norm: Normalizer, x: torch.Tensor):
    """(raw reconstruction, active latent sets) of our SAE."""
    with torch.no_grad():
        x_hat, idx, val = sae(norm.encode(x))
    return norm.decode(x_hat), [set(i[v > 0].tolist()) for i, v in zip(idx, val)]


def saelens_forward(w: dict, cfg: dict, x: torch.Tensor):
    """SAELens 6.x TopKSAE.encode/decode on raw x, from its source, in float64: (x_hat, active sets, pre)."""
    w = {k: v.double() for k, v in w.items()}
    sae_in = x.double() - w["b_dec"] * cfg["apply_b_dec_to_input"]      # process_sae_in
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    n = w["W_dec"].norm(dim=-1)
    if cfg["rescale_acts_by_decoder_norm"]:
        pre = pre * n
    vals, idx = pre.topk(cfg["k"], dim=-1)                                # TopK: top k, then ReLU
    f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    x_hat = (f / n if cfg["rescale_acts_by_decoder_norm"] else f) @ w["W_dec"] + w["b_dec"]   # act_times_W_dec
    return x_hat, [set(r.nonzero().squeeze(1).tolist()) for r in f], pre


def assert_clear_topk(pre: torch.Tensor, k: int):
    """Guard: the k-th and (k+1)-th pre-activations are well apart, so equal index sets are a fair demand."""
    top = pre.topk(k + 1, dim=-1).values
    assert float((top[:, k - 1] - top[:, k]).min()) > 1e-4


def saelens_folder(path, cfg_over: dict | None = None, seed: int = 2, weights_over: dict | None = None):
    """A SAELens-format TopK folder with random weights and non-unit decoder rows."""
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D, N, generator=g), "b_enc": torch.randn(N, generator=g) * 0.5,
         "W_dec": torch.randn(N, D, generator=g) * (torch.rand(N, 1, generator=g) + 0.5),
         "b_dec": torch.randn(D, generator=g)}
    w.update(weights_over or {})
    cfg = {"architecture": "topk", "d_in": D, "d_sae": N, "k": K, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": False,
           "metadata": {"sae_lens_version": "6.54.12", "model_name": "org/some-model",
                        "hook_name": "blocks.5.hook_resid_post", "context_size": 128, "prepend_bos": True,
                        "dataset_path": "wikitext-103"}}
    cfg.update(cfg_over or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w, cfg


# ------------------------------------------------------------------------------------------------ export

def test_export_format_and_saelens_forward_on_raw_x(tmp_path):
    sae, norm = our_sae_folder(tmp_path / "ours")
    export_saelens(tmp_path / "ours", tmp_path / "sl")
    assert sorted(p.name for p in (tmp_path / "sl").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    w = load_file(str(tmp_path / "sl" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D), "b_dec": (D,)}
    assert all(v.dtype == torch.float32 for v in w.values())
    assert {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input", "normalize_activations",
                                "rescale_acts_by_decoder_norm", "dtype", "device")} == {
        "architecture": "topk", "d_in": D, "d_sae": N, "k": K, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "rescale_acts_by_decoder_norm": False, "dtype": "float32", "device": "cpu"}
    m = cfg["metadata"]
    assert m["model_name"] == "org/some-model" and m["hook_name"] == "blocks.2.hook_resid_post"   # layer 3
    assert m["context_size"] == 48 and m["prepend_bos"] is True and m["dataset_path"] == "demo"
    assert int(m["sae_lens_version"].split(".")[0]) >= 6      # else SAELens re-reads it as a pre-6 config

    x = raw_x(norm)
    x_hat, active = ours(sae, norm, x)
    sl_hat, sl_active, pre = saelens_forward(w, cfg, x)
    assert_clear_topk(pre, K)
    assert rel(sl_hat, x_hat) < 1e-5
    assert sl_active == active
    assert rel(x_hat, x) > 1e-2            # a real map (not an identity that any folding would reproduce)


def test_export_cli_and_bad_input_is_one_line(tmp_path):
    our_sae_folder(tmp_path / "ours")
    cmd = [sys.executable, "-m", "common.saelens", "export", "--sae", str(tmp_path / "ours"), "--out", str(tmp_path / "sl")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert str(tmp_path / "sl" / "cfg.json") in p.stdout and str(tmp_path / "sl" / "sae_weights.safetensors") in p.stdout
    bad = subprocess.run(cmd[:5] + [str(tmp_path / "missing"), "--out", str(tmp_path / "sl2")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --sae") and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sl2").exists()


# ------------------------------------------------------------------------------------------------ import

def test_import_of_our_export_reproduces_the_original(tmp_path):
    sae, norm = our_sae_folder(tmp_path / "ours")
    export_saelens(tmp_path / "ours", tmp_path / "sl")
    assert is_saelens_dir(tmp_path / "sl") and not is_saelens_dir(tmp_path / "ours")
    sae2, norm2, cfg = load_sae_checkpoint(tmp_path / "sl")          # the hook: dispatches to load_saelens
    x = raw_x(norm)
    x_hat, active = ours(sae, norm, x)
    x_hat2, active2 = ours(sae2, norm2, x)
    assert rel(x_hat2, x_hat) < 1e-5 and active2 == active
    assert norm2.mode == "none" and bool((norm2.scale == 1).all() and (norm2.shift == 0).all())
    assert cfg["kind"] == "sae" and cfg["format"] == "saelens" and cfg["normalize"] == "none" and cfg["parents"] == {}
    assert cfg["hparams"] == {**SAEConfig(d=D, n_latents=N, k=K).__dict__}
    assert cfg["content_hash"] == checkpoint.file_hash(tmp_path / "sl" / "sae_weights.safetensors")
    assert cfg["path"] == str((tmp_path / "sl").resolve())
    # our description survives the round trip (keep_bos, val_fraction are not SAELens fields)
    assert DataSpec.from_description(cfg["data"]) == DataSpec.from_description(DESC)


def test_import_derives_the_data_description_from_saelens_fields(tmp_path):
    w, _ = saelens_folder(tmp_path / "sl")
    _, _, cfg = load_saelens(tmp_path / "sl")
    assert DataSpec.from_description(cfg["data"]) == DataSpec(model="org/some-model", layer=6, dataset="wikitext-103",
                                                             seq_len=128, keep_bos=False, val_fraction=0.1)
    assert cfg["data"]["train_tokens"] > 0                # part6 reads it
    for hook, layer in (("blocks.0.hook_resid_post", 1), ("blocks.4.hook_resid_pre", 4)):
        saelens_folder(tmp_path / hook, {"metadata": {"sae_lens_version": "6.1.0", "model_name": "m/x", "hook_name": hook,
                                                       "context_size": 64, "dataset_path": "demo"}})
        assert load_saelens(tmp_path / hook)[2]["data"]["layer"] == layer
    # no usable dataset: not a model source, so a stage that reads activations asks for --activations
    saelens_folder(tmp_path / "owt", {"metadata": {"sae_lens_version": "6.1.0", "model_name": "gpt2",
                                                    "hook_name": "blocks.6.hook_resid_pre", "context_size": 128,
                                                    "dataset_path": "Skylion007/openwebtext"}})
    desc = load_saelens(tmp_path / "owt")[2]["data"]
    assert DataSpec.from_description(desc) is None and "--activations" in desc["note"]


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("rescale", [False, True])
def test_import_folds_saelens_options_exactly(tmp_path, apply_b_dec, rescale):
    w, cfg = saelens_folder(tmp_path / "sl", {"apply_b_dec_to_input": apply_b_dec, "rescale_acts_by_decoder_norm": rescale})
    sae, norm, _ = load_saelens(tmp_path / "sl")
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(3)) * 2 + 1
    sl_hat, sl_active, pre = saelens_forward(w, cfg, x)
    assert_clear_topk(pre, K)
    x_hat, active = ours(sae, norm, x)
    assert rel(x_hat, sl_hat) < 1e-5 and active == sl_active
    # ours always subtracts b_dec first, so the apply_b_dec_to_input=false case only matches through the fold
    assert apply_b_dec or float(w["b_dec"].norm()) > 1


def test_pre6_topk_config_is_read(tmp_path):
    """SAELens < 6 wrote activation_fn_str "topk" + activation_fn_kwargs and the metadata at the top level."""
    w, _ = saelens_folder(tmp_path / "sl")
    old = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": False, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
           "model_name": "org/some-model", "hook_point": "blocks.1.hook_resid_post", "context_size": 32,
           "dataset_path": "wikitext-2"}
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(old))
    sae, _, cfg = load_saelens(tmp_path / "sl")
    assert sae.cfg.k == K and cfg["data"]["layer"] == 2 and cfg["data"]["seq_len"] == 32


# ------------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("over, message", [
    ({"architecture": "standard"}, "SAELens architecture 'standard' is not supported; only 'topk' SAEs map onto"),
    ({"architecture": "jumprelu"}, "SAELens architecture 'jumprelu' is not supported; only 'topk' SAEs map onto"),
    ({"normalize_activations": "expected_average_only_in"},
     "normalize_activations is 'expected_average_only_in'; fold it into the weights in SAELens first"),
    ({"metadata": {"sae_lens_version": "6.1.0", "hook_name": "blocks.3.hook_mlp_out"}},
     "hook_name 'blocks.3.hook_mlp_out' is not a residual-stream hook; only blocks.N.hook_resid_post"),
    ({"metadata": {"sae_lens_version": "6.1.0", "hook_name": "blocks.0.hook_resid_pre"}}, "is the embedding output"),
    ({"d_in": D + 1}, "W_enc has shape [16, 64], but cfg.json (d_in=17, d_sae=64) implies [17, 64]"),
    ({"k": N + 1}, "need positive sizes and k <= d_sae"),
])
def test_refusals_are_one_line_user_errors(tmp_path, over, message):
    saelens_folder(tmp_path / "sl", over)
    with pytest.raises(UserError) as e:
        load_sae_checkpoint(tmp_path / "sl")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(f"--sae {tmp_path / 'sl'}")


def test_refuses_missing_files_nonfinite_and_extra_tensors(tmp_path):
    saelens_folder(tmp_path / "a")
    (tmp_path / "a" / "sae_weights.safetensors").unlink()
    with pytest.raises(UserError, match=r"no sae_weights\.safetensors there; a SAELens SAE folder holds"):
        load_sae_checkpoint(tmp_path / "a")
    saelens_folder(tmp_path / "b")
    (tmp_path / "b" / "cfg.json").unlink()
    with pytest.raises(UserError, match=r"no cfg\.json there"):
        load_saelens(tmp_path / "b")
    bad = torch.zeros(D)
    bad[3] = float("nan")
    saelens_folder(tmp_path / "c", weights_over={"b_dec": bad})
    with pytest.raises(UserError, match="b_dec contains NaN or inf"):
        load_saelens(tmp_path / "c")
    saelens_folder(tmp_path / "d", weights_over={"threshold": torch.ones(N)})
    with pytest.raises(UserError, match=r"extra tensors \['threshold'\]"):
        load_saelens(tmp_path / "d")


# ------------------------------------------------------------------------------------------------ pipeline

def test_part2_and_part3_run_on_an_exported_saelens_folder(pipeline, tmp_path):
    sl = tmp_path / "p1_saelens"
    p = subprocess.run([sys.executable, "-m", "common.saelens", "export", "--sae", str(pipeline / "p1"), "--out", str(sl)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    data = ["--train-tokens", "2000", "--val-tokens", "1000", "--cache-dir", str(pipeline / "cache")]
    run_script("part2_train_residual_nfm.py", "--sae", str(sl), "--nfm-dim", "8", "--steps", "5", "--controls", "none",
               "--out", str(tmp_path / "p2"), *data)
    nfm_cfg = json.loads((tmp_path / "p2" / "config.json").read_text())
    assert nfm_cfg["parents"]["sae"] == {"path": str(sl.resolve()), "kind": "sae",
                                         "content_hash": checkpoint.file_hash(sl / "sae_weights.safetensors")}
    p1_data = json.loads((pipeline / "p1" / "config.json").read_text())["data"]
    assert nfm_cfg["data"]["source"] == "model" and nfm_cfg["data"]["model"] == p1_data["model"]
    assert nfm_cfg["data"]["layer"] == p1_data["layer"] and nfm_cfg["data"]["dataset"] == p1_data["dataset"]
    m = json.loads((tmp_path / "p2" / "metrics.json").read_text())["held_out_test"]
    p1_fvu = json.loads((pipeline / "p1" / "metrics.json").read_text())["held_out_test"]["fvu"]
    assert 0 < m["sae_fvu"] < max(1.5 * p1_fvu, p1_fvu + 0.05)   # the imported SAE reconstructs like the original
    # part3 finds the SAE through the NFM's parent record and checks its hash (common.checkpoint.check_parent)
    run_script("part3_train_secondary_sae.py", "--nfm", str(tmp_path / "p2"), "--expansion", "2", "--k", "2",
               "--steps", "5", "--out", str(tmp_path / "p3"), *data)
    assert (tmp_path / "p3" / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ real SAELens

def test_real_saelens_loads_our_export(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae, norm = our_sae_folder(tmp_path / "ours")
    export_saelens(tmp_path / "ours", tmp_path / "sl")
    sl = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"), device="cpu")
    assert type(sl).__name__ == "TopKSAE" and sl.cfg.k == K and sl.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    x = raw_x(norm)
    x_hat, active = ours(sae, norm, x)
    with torch.no_grad():
        f = sl.encode(x)
        assert rel(sl.decode(f), x_hat) < 1e-5 and rel(sl(x), x_hat) < 1e-5
    assert [set(r.nonzero().squeeze(1).tolist()) for r in f] == active


def test_real_saelens_saved_sae_imports_exactly(tmp_path):
    """A TopK SAE saved by SAELens itself, with both run-time options our encoder lacks."""
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata
    cfg = sae_lens.TopKSAEConfig(d_in=D, d_sae=N, k=K, apply_b_dec_to_input=False, rescale_acts_by_decoder_norm=True,
                                 metadata=SAEMetadata(model_name="org/some-model", hook_name="blocks.0.hook_resid_post",
                                                      context_size=64, dataset_path="demo"))
    sl = sae_lens.TopKSAE(cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p_ in (sl.W_enc, sl.b_enc, sl.W_dec, sl.b_dec):
            p_.copy_(torch.randn(p_.shape, generator=g))
    sl.save_model(tmp_path / "sl")
    sae, norm, cfg_ours = load_sae_checkpoint(tmp_path / "sl")
    assert cfg_ours["data"]["layer"] == 1
    x = torch.randn(256, D, generator=g) * 2
    x_hat, active = ours(sae, norm, x)
    with torch.no_grad():
        f = sl.encode(x)
        assert rel(x_hat, sl(x)) < 1e-5
    assert [set(r.nonzero().squeeze(1).tolist()) for r in f] == active
