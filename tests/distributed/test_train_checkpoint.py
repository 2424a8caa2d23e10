"""The training checkpoint (megatron_ral.checkpoint.training) with the real tiny Qwen25VLModel, megatron-core
DDP, (distributed) Adam and LR scheduler on gloo:

- same layout: a run saved after k steps and resumed in fresh objects takes step k+1 bit-identically to the
  uninterrupted run (weights, Adam moments, scheduler, RNG streams);
- another layout (TP=2 -> TP=1, PP=2, DP=2): weights and Adam moments arrive in the global layout
  unchanged, the scheduler resumes, the per-rank state is dropped, and the next step matches;
- a process killed while writing a checkpoint leaves the previous one loadable and chosen;
- the checkpoint directory converts to HF with tools/convert_megatron_to_hf.py as it is;
- keep_last pruning and the latest pointer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_fixture as fx
from megatron_ral.checkpoint.dist_ckpt_io import DistCheckpointReader
from megatron_ral.testing.spawn import run_distributed

pytestmark = pytest.mark.distributed

TRAIN_STATE = {"loader": [{"epoch": 0, "position": 7}, {"epoch": 0, "position": 9}], "reference": "hf:/tiny"}


def _draws() -> dict:
    """One draw from every generator a rank state covers (megatron's tracker stream included)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    with tensor_parallel.get_cuda_rng_tracker().fork():
        tracked = torch.rand(3)
    return {"python": random.random(), "numpy": float(np.random.rand()), "torch": torch.rand(3), "tracker": tracked}


# --- 1. same layout: bit-identical continuation ----------------------------------------------------------

def _round_trip(save_dir: str, tp: int, distributed_optimizer: bool) -> dict:
    from megatron_ral.checkpoint.rng_state import capture_rng_state, restore_rng_state
    from megatron_ral.checkpoint.training import TrainCheckpointer

    par = fx.parallel(tp=tp, distributed_optimizer=distributed_optimizer)
    fx.initialize(par)
    ckpt = TrainCheckpointer(save_dir)
    a = fx.build(par, seed=3)
    for step in (1, 2):
        fx.train_step(a, step)
    rank = torch.distributed.get_rank()
    torch.manual_seed(100 + rank)  # per-rank streams, so that a wrong rank's state would be noticed
    ckpt.save(2, a.model, a.optimizer, a.scheduler, state=TRAIN_STATE, rank_state=capture_rng_state())
    draws_a = _draws()
    fx.train_step(a, 3)
    w_a, adam_a, lr_a = fx.weights(a), fx.adam_state(a), a.optimizer.param_groups[0]["lr"]

    b = fx.build(par, seed=4)  # other weights: everything must come from the checkpoint
    torch.manual_seed(999)
    got = ckpt.load(ckpt.latest(), b.model, b.optimizer, b.scheduler)
    restore_rng_state(got.rank_state)
    draws_b = _draws()
    assert b.scheduler.num_steps == 2
    fx.train_step(b, 3)
    w_b, adam_b, lr_b = fx.weights(b), fx.adam_state(b), b.optimizer.param_groups[0]["lr"]
    return {"step": got.step, "state": got.state, "changed": got.layout_changed, "lr": (lr_a, lr_b),
            "weights": (w_a, w_b), "adam": (adam_a, adam_b), "draws": (draws_a, draws_b),
            "num_steps": b.scheduler.num_steps}


@pytest.mark.parametrize("tp,distributed_optimizer", [(1, True), (2, False)], ids=["dp2-distopt", "tp2-adam"])
def test_resume_same_layout_is_bit_identical(tmp_path, tp, distributed_optimizer):
    outs = run_distributed(_round_trip, 2, str(tmp_path / "ckpt"), tp, distributed_optimizer)
    for rank, o in enumerate(outs):
        assert o["step"] == 2 and o["state"] == TRAIN_STATE and o["changed"] is False
        assert o["num_steps"] == 3 and o["lr"][0] == o["lr"][1]
        w_a, w_b = o["weights"]
        assert w_a.keys() == w_b.keys() and len(w_a) > 10
        for k in w_a:
            assert torch.equal(w_a[k], w_b[k]), f"rank {rank} {k}"
        adam_a, adam_b = o["adam"]
        assert len(adam_a) == len(adam_b) > 0
        for i, (x, y) in enumerate(zip(adam_a, adam_b)):
            assert torch.equal(x, y), f"rank {rank} optimizer tensor {i}"
        d_a, d_b = o["draws"]
        assert d_a["python"] == d_b["python"] and d_a["numpy"] == d_b["numpy"]
        assert torch.equal(d_a["torch"], d_b["torch"]) and torch.equal(d_a["tracker"], d_b["tracker"])
    assert not torch.equal(outs[0]["draws"][0]["torch"], outs[1]["draws"][0]["torch"])


# --- 2. another layout -----------------------------------------------------------------------------------

def _train_and_save_tp2(save_dir: str, next_dir: str, weights_dir: str, hf_dir: str) -> float:
    """TP=2: two steps, checkpoint (step 2) and the model-only weights; then step 3, checkpointed apart."""
    from megatron_ral.checkpoint.model_io import save_model_weights
    from megatron_ral.checkpoint.rng_state import capture_rng_state
    from megatron_ral.checkpoint.training import TrainCheckpointer

    par = fx.parallel(tp=2)
    fx.initialize(par)
    t = fx.build(par, seed=3)
    for step in (1, 2):
        fx.train_step(t, step)
    TrainCheckpointer(save_dir, hf_dir=hf_dir).save(2, t.model, t.optimizer, t.scheduler, state=TRAIN_STATE,
                                                    rank_state=capture_rng_state())
    save_model_weights(t.model[0].module, weights_dir, hf_dir=hf_dir)
    lr = t.optimizer.param_groups[0]["lr"]
    fx.train_step(t, 3)
    TrainCheckpointer(next_dir).save(3, t.model, t.optimizer, t.scheduler)
    return lr


def _resume_elsewhere(save_dir: str, resaved_dir: str, next_dir: str, tp: int, pp: int) -> dict:
    """Load the TP=2 checkpoint at another layout, save it again unchanged, take step 3 and save that."""
    from megatron_ral.checkpoint.training import TrainCheckpointer

    par = fx.parallel(tp=tp, pp=pp)
    fx.initialize(par)
    t = fx.build(par, seed=4)
    got = TrainCheckpointer(save_dir).load(save_dir, t.model, t.optimizer, t.scheduler)
    out = {"step": got.step, "state": got.state, "rank_state": got.rank_state, "changed": got.layout_changed,
           "num_steps": t.scheduler.num_steps, "lr": t.optimizer.param_groups[0]["lr"]}
    TrainCheckpointer(resaved_dir).save(2, t.model, t.optimizer, t.scheduler)
    fx.train_step(t, 3)
    TrainCheckpointer(next_dir).save(3, t.model, t.optimizer, t.scheduler)
    return out


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """A TP=2 training checkpoint at step 2 (with HF side files), the same weights saved model-only, and the
    checkpoint of the uninterrupted step 3."""
    from megatron_ral.testing.models import tiny_hf_config

    root = tmp_path_factory.mktemp("tp2")
    hf = root / "hf"  # the model's HF config (what the converter needs; tokenizer files are copied alike)
    tiny_hf_config("tiny").save_pretrained(str(hf))
    dirs = {k: root / k for k in ("ckpt", "next", "weights")}
    lrs = run_distributed(_train_and_save_tp2, 2, str(dirs["ckpt"]), str(dirs["next"]), str(dirs["weights"]),
                          str(hf))
    return {"hf": hf, "lr": lrs[0], **dirs}


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    reader = DistCheckpointReader(directory)
    return {k: reader.read(k) for k in reader.tensor_keys()}


def _iter(save_dir: Path, step: int) -> Path:
    return save_dir / f"iter_{step:07d}"


@pytest.mark.parametrize("tp,pp,ranks", [(1, 1, 1), (1, 2, 2), (1, 1, 2)], ids=["tp1", "pp2", "dp2"])
def test_resume_at_another_layout(tp2_run, tmp_path, tp, pp, ranks):
    resaved, nxt = tmp_path / "resaved", tmp_path / "next"
    outs = run_distributed(_resume_elsewhere, ranks, str(tp2_run["ckpt"]), str(resaved), str(nxt), tp, pp)
    for o in outs:
        assert o["step"] == 2 and o["state"] == TRAIN_STATE
        assert o["changed"] is True and o["rank_state"] is None
        assert o["num_steps"] == 2 and o["lr"] == tp2_run["lr"] > 0

    # the state arrived unchanged, in the global layout: saving it again writes the same tensors
    original, again = _tensors(_iter(tp2_run["ckpt"], 2)), _tensors(_iter(resaved, 2))
    assert original.keys() == again.keys()
    moments = [k for k in original if k.startswith(("optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."))]
    assert len(moments) >= 20 and any(k.startswith("language_model.") for k in original)
    for k in original:
        assert torch.equal(original[k], again[k]), k

    # and the next step is the one the TP=2 run took, up to the float rounding of another layout: Adam
    # moments to 1e-5 relative; weights to 5% of the largest step (m / (sqrt(v) + eps) amplifies rounding in
    # near-zero gradients: single elements have been seen 2% of a step apart; frozen vision weights exactly)
    expected, got = _tensors(_iter(tp2_run["next"], 3)), _tensors(_iter(nxt, 3))
    moved = 0
    for k in expected:
        if k in moments:
            atol = 1e-5 * expected[k].abs().max().item()
        else:
            atol = 5e-2 * (expected[k] - original[k]).abs().max().item()
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")
        moved += not torch.equal(expected[k], original[k])
    assert moved >= len(moments)


# --- 3. a process killed while writing -------------------------------------------------------------------

HERE = Path(__file__).resolve().parent


def _kill_self(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_child(save_dir: str, weights_file: str, where: str) -> None:
    """One process: resume from save_dir (when it has a checkpoint) or train a step and save it; write the
    weights of that checkpoint to weights_file; then train on and get killed while saving the next one,
    either in the middle of the torch_dist write (before its .metadata) or after it, before the rename."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_ral.checkpoint import training
    from megatron_ral.checkpoint.training import TrainCheckpointer

    par = fx.parallel()
    fx.initialize(par)
    ckpt = TrainCheckpointer(save_dir)
    t = fx.build(par, seed=3)
    if ckpt.latest() is None:
        fx.train_step(t, 1)
        ckpt.save(1, t.model, t.optimizer, t.scheduler, state={"step": 1})
        step = 1
    else:
        step = ckpt.load(None, t.model, t.optimizer, t.scheduler).step
    torch.save(fx.weights(t), weights_file)
    fx.train_step(t, step + 1)
    if where == "dist_write":
        filesystem_async.FileSystemWriterAsync.finish = _kill_self
    else:
        training.commit = _kill_self
    ckpt.save(step + 1 + (where != "dist_write"), t.model, t.optimizer, t.scheduler, state={})
    raise AssertionError("the save should have been killed")


def _crash_entry(*args) -> None:
    os.setsid()  # its own session: whatever it starts can be found and ended after it is killed
    torch.set_num_threads(1)
    _crash_child(*args)


def _run_child(*args) -> int:
    """Run _crash_child in a process of its own session (forked from the preloaded fork server, like the
    ranks of run_distributed); once it is dead, end what it left behind in that session (megatron's
    checkpoint writer starts helper processes that a killed parent cannot stop). Returns its exit code."""
    from megatron_ral.testing.spawn import _context

    child = _context().Process(target=_crash_entry, args=tuple(map(str, args)))
    child.start()
    try:
        child.join(timeout=600)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.join()
    return child.exitcode


def _digest(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    from megatron_ral.checkpoint.run_dir import TRACKER_FILE, is_complete
    from megatron_ral.checkpoint.training import TrainCheckpointer

    save_dir = tmp_path / "ckpt"
    ckpt = TrainCheckpointer(save_dir)

    # killed in the middle of writing step 2: data files in the temporary directory, no .metadata
    assert _run_child(save_dir, tmp_path / "w1.pt", "dist_write") == -signal.SIGKILL
    tmp2 = save_dir / "iter_0000002.tmp"
    assert any(tmp2.glob("*.distcp")) and not (tmp2 / ".metadata").exists()
    assert ckpt.latest() == _iter(save_dir, 1) and (save_dir / TRACKER_FILE).read_text().strip() == "1"
    step1 = _digest(_iter(save_dir, 1))

    # the next process resumes from step 1 (the same weights), then is killed after writing step 3 completely,
    # before the rename; its save removed the stale directory of step 2 first
    assert _run_child(save_dir, tmp_path / "w2.pt", "commit") == -signal.SIGKILL
    w1, w2 = torch.load(tmp_path / "w1.pt"), torch.load(tmp_path / "w2.pt")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    tmp3 = save_dir / "iter_0000003.tmp"
    assert not tmp2.exists() and is_complete(tmp3)
    assert sorted(p.name for p in save_dir.iterdir()) == ["iter_0000001", "iter_0000003.tmp", TRACKER_FILE]
    assert ckpt.latest() == _iter(save_dir, 1) and (save_dir / TRACKER_FILE).read_text().strip() == "1"
    assert _digest(_iter(save_dir, 1)) == step1


# --- 4. the converter reads a training checkpoint as it is --------------------------------------------------

TOOL = HERE.parents[1] / "tools" / "convert_megatron_to_hf.py"


def test_training_checkpoint_converts_to_hf(tp2_run, tmp_path):
    from megatron_ral.checkpoint.convert import megatron_to_hf
    from megatron_ral.checkpoint.safetensors_io import HFCheckpointReader
    from megatron_ral.testing.models import hf_state_dict, tiny_hf_config

    iter_dir = _iter(tp2_run["ckpt"], 2)
    assert (iter_dir / "config.json").is_file()  # self-describing
    outs = {"run_dir": tmp_path / "from_run_dir", "iter_dir": tmp_path / "from_iter_dir"}
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(TOOL), "--ckpt", str(tp2_run["ckpt"]), "--out", str(outs["run_dir"]),
                          "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    from megatron_ral.cli.convert_megatron_to_hf import main as megatron_to_hf_main  # the same tool's command line, in-process

    assert megatron_to_hf_main(["--ckpt", str(iter_dir), "--out", str(outs["iter_dir"]), "--quiet"]) == 0
    assert all((out / "config.json").is_file() for out in outs.values())
    # the same weights saved model-only (model_io, the path the HF parity tests cover)
    megatron_to_hf(tp2_run["weights"], tmp_path / "weights", progress=False)
    ref = HFCheckpointReader(tmp_path / "weights")
    initial = hf_state_dict(tiny_hf_config("tiny"), seed=3)
    assert sorted(ref.names()) == sorted(initial)
    trained = [n for n in ref.names() if not torch.equal(ref.get(n), initial[n])]
    assert trained and all(not n.startswith("visual.") for n in trained)  # the LM trained, vision is frozen
    for name, out in outs.items():
        got = HFCheckpointReader(out)
        assert sorted(got.names()) == sorted(ref.names()), name
        for n in ref.names():
            assert torch.equal(got.get(n), ref.get(n)), f"{name}: {n}"


# --- 5. keep_last and the latest pointer -------------------------------------------------------------------

def _save_steps(save_dir: str) -> dict:
    from megatron_ral.checkpoint.training import TrainCheckpointer

    par = fx.parallel()
    fx.initialize(par)
    t = fx.build(par, seed=3)
    ckpt = TrainCheckpointer(save_dir, keep_last=2)
    seen = {}

    def listing():
        return sorted(p.name for p in Path(save_dir).iterdir())

    for step in (1, 2, 3):
        ckpt.save(step, t.model, t.optimizer, t.scheduler, state={"step": step})
        seen[step] = (listing(), ckpt.latest().name, ckpt.peek().step)
    # a run resumed from step 2 saves step 2 again, then step 3 (replacing the abandoned run's)
    ckpt.save(2, t.model, t.optimizer, t.scheduler, state={"step": 2, "again": True})
    seen["2 again"] = (listing(), ckpt.latest().name, ckpt.peek().state)
    ckpt.save(3, t.model, t.optimizer, t.scheduler, state={"step": 3, "again": True})
    seen["3 again"] = (listing(), ckpt.latest().name, ckpt.peek().state)

    # what a user can get wrong: a model-only checkpoint, a checkpoint of another model
    from megatron_ral.checkpoint.convert import CheckpointMismatchError
    from megatron_ral.checkpoint.model_io import save_model_weights
    from megatron_ral.checkpoint.safetensors_io import CheckpointFileError
    from megatron_ral.testing.models import seeded_megatron_model

    model_only = save_model_weights(t.model[0].module, Path(save_dir).parent / "model_only")
    errors = {}
    try:
        ckpt.load(model_only, t.model, t.optimizer)
    except CheckpointFileError as e:
        errors["model_only"] = str(e)
    try:
        ckpt.load(None, seeded_megatron_model("small", 0, par, last_layer_core_attention=None))
    except CheckpointMismatchError as e:
        errors["other_model"] = str(e)
    return seen, errors


def test_keep_last_and_latest_pointer(tmp_path):
    save_dir = tmp_path / "ckpt"
    ((seen, errors),) = run_distributed(_save_steps, 1, str(save_dir))
    tracker = "latest_checkpointed_iteration.txt"
    assert seen[1] == (["iter_0000001", tracker], "iter_0000001", 1)
    assert seen[2] == (["iter_0000001", "iter_0000002", tracker], "iter_0000002", 2)
    assert seen[3] == (["iter_0000002", "iter_0000003", tracker], "iter_0000003", 3)
    # step 3 of the abandoned run stays until this run saves step 3; the pointer names the newest save
    assert seen["2 again"] == (["iter_0000002", "iter_0000003", tracker], "iter_0000002", {"step": 2, "again": True})
    assert seen["3 again"] == (["iter_0000002", "iter_0000003", tracker], "iter_0000003", {"step": 3, "again": True})
    assert (save_dir / tracker).read_text() == "3\n"
    assert "not a training checkpoint" in errors["model_only"]
    assert "does not match this model" in errors["other_model"] and "\n" not in errors["other_model"]
