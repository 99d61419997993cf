"""The small training loop shared by every trained model (SAE, NFM, secondary SAE).

- fixed step budget computed from the real data size (the reference's LR schedule confused tokens with
  sequences and spent 99% of training at the floor LR);
- linear warm-up over the first 5% of steps, constant, then linear decay to 0 over the last 20%;
- Adam in float32 (fused where torch has it: 5-7x faster on CPU at paper scale);
- evaluation every `eval_every` steps on the *selection* half of the held-out data, keeping a true copy of
  the best state (the reference's "best" checkpoint was simply the latest);
- the other held-out half ("test") is never used for selection and is what the stages report;
- lossless resume (`TrainCheckpoints`): the whole training state is saved every N steps, at SIGINT/SIGTERM and
  at the end, so a killed run continues exactly where it stopped (bitwise on CPU: tests/test_resume.py);
- a NaN or inf loss stops training at once, naming the step, with the last good state kept on disk.
"""
from __future__ import annotations

import copy
import json
import math
import random
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import dist, recipe
from .cli import STATE_DIR, Interrupted, UserError, run_args
from .sparse import release_table_buffers
from .rows import epoch_order


def lr_factor(step: int, total: int, warmup_frac: float = 0.05, decay_frac: float = 0.2) -> float:
    warm = max(1, int(total * warmup_frac))
    decay_start = int(total * (1 - decay_frac))
    f = min(1.0, (step + 1) / warm)
    if step >= decay_start and total > decay_start:
        f *= max(0.0, (total - step) / (total - decay_start))
    return f


def make_adam(params, lr: float, **kw) -> torch.optim.Optimizer:
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, **kw)


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)   # one row per evaluation
    best_step: int = -1
    best_val: float = math.inf
    best_state: dict | None = None                        # during fit only (loaded into the model at the end)
    steps: int = 0


class TrainCheckpoints:
    """The training state of a run on disk, for --resume: OUT/train_state/<tag>/step-XXXXXXXX.{safetensors,json}.

    One tag per trained model of a stage (part2: "nfm" and "residual_sae"). Each state holds the model (with
    buffers: the SAE's AuxK tokens-since-fired counters), the optimizer state and hyperparameters (Adam moments,
    schedule-free z and weight sum), the step (which fixes the LR-schedule position), the torch/CUDA/numpy/
    Python RNG states, the data position (this epoch's permutation, the row reached, the shuffling generator),
    the training logs since the last evaluation, the evaluation history and the best-so-far state and metric.
    Writes are atomic (safetensors first, then the JSON that marks the pair complete) and the last two states are
    kept, so a kill during a write loses at most N steps. OUT/train_state/run.json records the flags (compared on
    --resume). Nothing is written before the first save, and `finish()` deletes it all once the stage's results
    are written. Only rank 0 writes under torchrun."""

    def __init__(self, out: str | Path, args):
        self.root = Path(out) / STATE_DIR
        self.every = getattr(args, "checkpoint_every", None)
        self.resume = bool(getattr(args, "resume", False))
        self.args = run_args(args)
        self._started = self.resume            # a fresh run clears a stale train_state/ at its first save

    def folder(self, tag: str) -> Path:
        return self.root / tag

    def save(self, tag: str, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from .checkpoint import atomic_save_tensors, atomic_write_bytes
        if not dist.is_main():
            return
        if not self._started:
            shutil.rmtree(self.root, ignore_errors=True)
            self._started = True
        run_file = self.root / "run.json"
        if not run_file.exists():
            atomic_write_bytes(run_file, (json.dumps({"args": self.args}, indent=1, default=str) + "\n").encode())
        d = self.folder(tag)
        name = f"step-{step:08d}"
        atomic_save_tensors(d / f"{name}.safetensors", tensors)
        atomic_write_bytes(d / f"{name}.json", json.dumps(meta).encode())
        for old in sorted(d.glob("step-*.json"))[:-2]:          # keep the last two
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)

    def latest(self, tag: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The newest complete, readable state of `tag` (an unreadable newest one falls back to the previous)."""
        if not self.resume:
            return None
        for meta_file in sorted(self.folder(tag).glob("step-*.json"), reverse=True):
            try:
                meta = json.loads(meta_file.read_text())
                return load_file(str(meta_file.with_suffix(".safetensors"))), meta
            except (json.JSONDecodeError, SafetensorError, OSError, ValueError):
                print(f"warning: skipping unreadable training state {meta_file}")
        return None

    def finish(self) -> None:
        if dist.is_main():
            shutil.rmtree(self.root, ignore_errors=True)


def _state_tensors(prefix: str, state: dict) -> dict[str, torch.Tensor]:
    # written at once (common/checkpoint.write_safetensors streams each tensor), so no copy of CPU tensors
    return {f"{prefix}{k}": v.detach().cpu() for k, v in state.items()}


def _unprefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{name}"] = v.detach().cpu()
            else:
                scalars[f"{pid}.{name}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            pid, name = key[4:].split(".", 1)
            state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state(gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state(), "rng.shuffle": gen.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    return tensors, {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _load_rng_state(gen: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.shuffle"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = meta["numpy"]
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))


class _StopSignals:
    """SIGINT/SIGTERM set a flag that the loop checks after each step (so the state saved is a consistent one);
    a second signal stops at once. Only installed when there is somewhere to save to."""

    def __init__(self, active: bool):
        self.signum = None
        self.old = {}
        if active and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


class _StepLoss(torch.nn.Module):
    """The model with step_loss as its forward, so DistributedDataParallel can wrap a training step."""

    def __init__(self, model: torch.nn.Module, step_loss):
        super().__init__()
        self.model, self.step_loss = model, step_loss

    def forward(self, idx: torch.Tensor):
        return self.step_loss(idx)


def _ddp(model: torch.nn.Module, step_loss, seed: int):
    """Under torchrun: DDP around the step (gradients averaged over ranks). Each rank gets its own dropout RNG
    stream (rank 0 keeps the one-process stream), else every rank would drop the same units of its rows."""
    if not dist.initialized():
        return step_loss
    from torch.nn.parallel import DistributedDataParallel
    dev = next(model.parameters()).device
    kw = dict(device_ids=[dev.index] if dev.type == "cuda" else None)
    try:        # buffers (the AuxK counters) are kept in sync by all-reduce, not re-broadcast at every forward
        ddp = DistributedDataParallel(_StepLoss(model, step_loss), forward_sync_buffers=False, **kw)
    except TypeError:                                   # torch without forward_sync_buffers
        ddp = DistributedDataParallel(_StepLoss(model, step_loss), broadcast_buffers=False, **kw)
    if dist.rank() > 0:
        torch.manual_seed(seed + 7919 * dist.rank())
    return ddp


def fit(model: torch.nn.Module, n_train: int, batch_size: int, steps: int, lr: float,
        step_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
        evaluate: Callable[[], dict], eval_every: int, seed: int, desc: str,
        before_step: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None,
        select_key: str = "val_loss", optimizer: str = "adam",
        eval_transform: Callable[[], None] | None = None,
        ckpt: TrainCheckpoints | None = None, tag: str = "model",
        shuffle: tuple[int, int] | None = None, keep_latest: bool = False) -> FitResult:
    """Train `model` for `steps` minibatches of row indices; step_loss(idx) returns (loss, logs).

    optimizer "adam": Adam with the warm-up/decay schedule above; "signsgd-sf": schedule-free SignSGD
    (common/optim.py) at a constant lr, evaluated and saved at its averaged iterate.
    eval_transform: applied in place to the weights that are evaluated and kept (e.g. the SAE's projection of
    decoder rows back to unit norm); training continues from the untransformed weights.
    ckpt/tag: save the training state under ckpt.folder(tag) and, with --resume, start from the latest one.
    shuffle: (block_rows, mix) of rows read from disk (`Rows.shuffle`): each epoch's order is windowed so a
    batch touches few blocks (common/rows.py epoch_order); None: a plain permutation of rows in memory.
    keep_latest: the reference's defect (--defects latest-as-best): every evaluation replaces the kept state, so
    the model returned is the last step's, whatever the selection half says."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "signsgd-sf":
        from .optim import ScheduleFreeSignSGD
        opt = ScheduleFreeSignSGD(params, lr)
    elif optimizer == "adam":
        opt = make_adam(params, lr)
    elif optimizer == "adam-reference":
        opt = make_adam(params, lr, betas=recipe.ADAM_BETAS, eps=recipe.ADAM_EPS)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    schedule_free = optimizer == "signsgd-sf"
    factor = recipe.lr_factor if optimizer == "adam-reference" else lr_factor   # the reference's LinearLR
    clip = recipe.GRAD_CLIP if optimizer == "adam-reference" else None          # and its gradient clipping
    gen = torch.Generator().manual_seed(seed)
    perm, pos = epoch_order(n_train, gen, shuffle), 0
    res = FitResult(steps=steps)
    running: dict[str, float] = {}
    start, last_saved = 0, None
    every = (ckpt.every or max(1, steps // 10)) if ckpt is not None else None

    def save_state(step_done: int) -> None:
        nonlocal last_saved
        if dist.is_main():          # rank 0 writes; the state is the same on every rank
            _save_state(step_done)
        last_saved = step_done

    def _save_state(step_done: int) -> None:
        rng_t, rng_meta = _rng_state(gen)
        opt_t, opt_meta = _optimizer_state(opt)
        tensors = {**_state_tensors("model.", model.state_dict()), **opt_t, **rng_t, "data.perm": perm}
        if res.best_state is not None:
            tensors.update(_state_tensors("best.", res.best_state))
        meta = {"step": step_done, "steps": steps, "pos": pos, "running": running, "history": res.history,
                "best_step": res.best_step, "best_val": res.best_val, "optimizer": opt_meta, "rng": rng_meta}
        ckpt.save(tag, step_done, tensors, meta)

    state = ckpt.latest(tag) if ckpt is not None else None
    if state is not None:
        tensors, meta = state
        try:
            model.load_state_dict(_unprefix(tensors, "model."))
            _load_optimizer_state(opt, tensors, meta["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"--resume: the saved training state in {ckpt.folder(tag)} does not fit this model "
                            f"({str(e).splitlines()[0][:160]}); rerun with the original flags") from None
        _load_rng_state(gen, tensors, meta["rng"])
        perm, pos, start, last_saved = tensors["data.perm"], meta["pos"], meta["step"], meta["step"]
        running, res.history = meta["running"], meta["history"]
        res.best_step, res.best_val = meta["best_step"], meta["best_val"]
        best = _unprefix(tensors, "best.")
        res.best_state = best or None
        if start > steps:
            raise UserError(f"--resume: the saved state is at step {start}, past this run's {steps} steps; "
                            f"rerun with the original --steps/--epochs")
        print(f"resuming {desc} at step {start} of {steps} from {ckpt.folder(tag)}")
    stop = _StopSignals(ckpt is not None)
    run_step = _ddp(model, step_loss, seed + start)
    world, rank = dist.world(), dist.rank()
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} does not split over {world} processes; use a multiple of {world}")
    bar = tqdm(range(start, steps), desc=desc, unit="step", initial=start, total=steps,
               **({} if dist.is_main() else {"disable": True}))
    try:
        for step in bar:
            if pos + batch_size > n_train:
                perm, pos = epoch_order(n_train, gen, shuffle), 0
            idx = perm[pos:pos + batch_size]            # the global batch, the same on every rank
            pos += batch_size
            if world > 1:
                idx = idx[rank::world]                  # this rank's share of it
            for g in opt.param_groups:
                g["lr"] = lr if schedule_free else lr * factor(step, steps)
            model.train()
            loss, logs = run_step(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if before_step is not None:
                before_step()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if after_step is not None:
                after_step()
            # checked after the step, where the logs sync anyway (no extra host sync before backward); the
            # non-finite step is never saved, so the state on disk is the last good one
            loss_value = float(loss.detach())
            if world > 1:       # every rank must take the same decision to stop (NaN anywhere, or a signal)
                flags = dist.all_reduce_(torch.tensor([float(not math.isfinite(loss_value)),
                                                       float(stop.signum is not None)]), "max")
                if flags[0] and math.isfinite(loss_value):
                    loss_value = float("nan")
                if flags[1] and stop.signum is None:
                    stop.signum = signal.SIGTERM
            if not math.isfinite(loss_value):
                kept = (f"the last good training state (step {last_saved}) is kept in {ckpt.folder(tag)}"
                        if last_saved is not None else "nothing was saved")
                raise UserError(f"{desc}: the loss became {loss_value} at step {step + 1} of {steps}; training "
                                f"stopped and {kept}; lower --lr or check the activations for extreme values")
            for k, v in logs.items():
                running[k] = running.get(k, 0.0) + float(v)
            running["_n"] = running.get("_n", 0) + 1
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                model.eval()
                if schedule_free:
                    opt.eval()                      # evaluate (and keep) the averaged iterate x
                live = None
                if eval_transform is not None:
                    live = copy.deepcopy(model.state_dict())
                    with torch.no_grad():
                        eval_transform()
                with torch.no_grad():
                    ev = evaluate()
                if world > 1:                           # training logs: the mean over ranks
                    keys = sorted(running)
                    vals = dist.all_reduce_(torch.tensor([running[k] for k in keys], dtype=torch.float64))
                    running = {k: (float(v) / world if k != "_n" else running["_n"]) for k, v in zip(keys, vals)}
                n = running.pop("_n")
                row = {"step": step + 1, "lr": opt.param_groups[0]["lr"], **{f"train_{k}": v / n for k, v in running.items()},
                       **ev}
                running = {}
                res.history.append(row)
                if ev[select_key] < res.best_val or keep_latest:
                    res.best_val, res.best_step = ev[select_key], step + 1
                    res.best_state = copy.deepcopy(model.state_dict())
                bar.set_postfix({select_key: f"{ev[select_key]:.4f}", "best@": res.best_step})
                if live is not None and step + 1 < steps:
                    model.load_state_dict(live)     # in place: the optimizer keeps its parameter references
                if schedule_free and step + 1 < steps:
                    opt.train()
            if ckpt is not None and ((step + 1) % every == 0 or step + 1 == steps or stop.signum is not None):
                save_state(step + 1)
            if stop.signum is not None:
                raise Interrupted(f"{signal.Signals(stop.signum).name} at step {step + 1} of {steps} ({desc}); the "
                                  f"training state is saved in {ckpt.folder(tag)}; rerun the same command with --resume "
                                  f"to continue")
    finally:
        stop.restore()
        bar.close()
    if res.best_state is not None:
        model.load_state_dict(res.best_state)
        res.best_state = None       # now the model's own weights: a second copy of a model is GBs at the preset
    model.zero_grad(set_to_none=True)   # the last step's gradients: another model-sized buffer (part5's baseline
    release_table_buffers(model)        # trains while the joint model is held), and the sparse tables' reused
    model.eval()                        # gradient buffers (part6's KL adapter kept 640 MB of them)
    return res


@torch.no_grad()
def batched(fn, *tensors: torch.Tensor, batch: int = 4096, device=None):
    """Apply fn to row slices of CPU tensors on `device` (default: fn's module's device), results on CPU.

    Datasets stay in CPU memory (at paper scale they do not fit on the GPU); each slice is moved over."""
    if device is None:
        device = next(fn.__self__.parameters()).device if hasattr(fn, "__self__") else torch.device("cpu")
    outs = []
    for s in range(0, tensors[0].shape[0], batch):
        o = fn(*(t[s:s + batch].to(device, non_blocking=True) for t in tensors))
        outs.append(tuple(x.cpu() for x in o) if isinstance(o, tuple) else o.cpu())
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def module_device(m: torch.nn.Module) -> torch.device:
    return next(m.parameters()).device
