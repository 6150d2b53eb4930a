"""FSDP2 on CPU: real sharding over two gloo processes (torchrun), sharded (torch.distributed.checkpoint)
checkpoints that resume across world sizes (2 processes -> 1 plain process and 1 -> 2) with the same weights,
losses and EMA as an uninterrupted run, equivalence with the DDP / single-process path (in fp32, and under bf16
autocast, where FSDP and DDP on two processes and one process see the same fp32 timesteps), loading sharded
checkpoints for inference, and unit tests of mardini.training.parallel.

The 1 -> 2 resume also turns activation checkpointing on (a checkpoint written without it must resume with it,
with the same math). Cost: one torchrun launch (five training jobs run one after another in the same two worker
processes, to pay the start-up once), plus a few tiny in-process runs. Every run uses the tiny model of helpers_training,
single-threaded, so that in-process and subprocess runs are comparable.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from helpers_training import single_thread, torchrun  # noqa: F401 (single_thread: autouse fixture)
from helpers_training import (SCRIPT_PRELUDE, record_times, assert_state_equal, checkpoint, checkpoint_names, cfg_to_yaml,
                              max_abs_diff, read_metrics, run_script, tiny_config, trainer_state,
                              two_stage_curriculum)
from mardini.training.trainer import Trainer

# DCP's note when a plain process (no process group) saves or loads a sharded checkpoint: expected here
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

N = 3  # interrupted runs stop (SIGTERM) after N steps and are resumed to 2N; the curriculum switches at SWITCH
SWITCH = 4
B = 2  # micro-batch per process in the 2-process runs; the 1-process runs use 2 * B (same global batch)
TOL = 1e-5


def run_config(out, world: int, parallel: str = "fsdp", **train):
    """2N steps, grad_accum 2 (exercises FSDP's no-sync micro-steps), checkpoints every N steps, warm-up + cosine LR,
    a curriculum stage change inside the resumed half; the same global batch for 1 or 2 processes. The planner has its
    own loss (as the default job), so its read-out, called outside the planner's forward, is sharded and resumed too."""
    kw = dict(max_steps=2 * N, grad_accum=2, batch_size=B * 2 // world, warmup_steps=2, checkpoint_every=N,
              keep_last=2, parallel=parallel)
    kw.update(train)
    cfg = tiny_config(out, curriculum=two_stage_curriculum(SWITCH, 2 * N), **kw)
    cfg.model.planner.loss_weight = 0.5
    return cfg


def bf16_config(out, world: int, parallel: str = "fsdp"):
    """A short bf16 run (autocast on CPU) with the same global batch for 1 or 2 processes."""
    return run_config(out, world=world, parallel=parallel, max_steps=3, mixed_precision="bf16")


def stop_at(trainer: Trainer, step: int) -> None:
    """A real SIGTERM right after `step` is logged; fit() then checkpoints and returns."""
    original = trainer._append_metrics

    def append(record):
        original(record)
        if record["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer._append_metrics = append




# Runs several training jobs one after another in the same torchrun workers (one start-up for all). Each job:
# {"config": yaml, "stop_at": step (SIGTERM to rank 0 only) or 0, "report": path prefix or None}. The report
# records, per rank, how the parameters and EMA shadows are laid out right after the Trainer is built.
WORKER = SCRIPT_PRELUDE + """
import json, os, signal
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from helpers_training import record_times
from mardini.training.trainer import Trainer

jobs = json.loads(open(sys.argv[1]).read())
end_training = Accelerator.end_training
Accelerator.end_training = lambda self: None  # fit() would destroy the process group the next job needs

def layout(t):
    if isinstance(t, DTensor):
        return {"dtensor": True, "local": t.to_local().numel(), "full": t.numel(),
                "shard0": [pl.is_shard(dim=0) for pl in t.placements], "mesh": t.device_mesh.size()}
    return {"dtensor": False, "local": t.numel(), "full": t.numel()}

for job in jobs:
    trainer = Trainer(load_cfg(job["config"]))
    rank = trainer.accelerator.process_index
    if job.get("report"):
        report = {"rank": rank, "world": dist.get_world_size(),
                  "params": {n: layout(p) for n, p in trainer.model.named_parameters()},
                  "ema": {n: layout(t) for n, t in trainer.ema.shadow.items()}}
        with open(f"{job['report']}.rank{rank}.json", "w") as f:
            json.dump(report, f)
    if job.get("stop_at") and rank == 0:  # the signal reaches one rank: the trainer must stop all of them
        original = trainer._append_metrics

        def append(record, original=original, step=job["stop_at"]):
            original(record)
            if record["step"] == step:
                os.kill(os.getpid(), signal.SIGTERM)

        trainer._append_metrics = append
    times = record_times(trainer) if job.get("times") else None
    result = trainer.fit()
    with open(job["result"] + f".rank{rank}", "w") as f:
        f.write(str(result))
    if times is not None:
        with open(f"{job['times']}.rank{rank}.json", "w") as f:
            json.dump(times, f)
    dist.barrier()

Accelerator.end_training = end_training
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """reference: 2 processes, 2N steps uninterrupted. two_then_one: 2 processes stopped at N (resumed in a single
    process by test_resume_two_processes_in_one). one_then_two: a plain process stopped at N, resumed to 2N by
    2 processes."""
    root = tmp_path_factory.mktemp("fsdp")
    r = SimpleNamespace(root=root, reference=root / "reference", two_then_one=root / "two_then_one",
                        one_then_two=root / "one_then_two", bf16=root / "bf16", bf16_ddp=root / "bf16_ddp")

    # 1 -> 2, first half: no torchrun, no process group, parallel=fsdp (whole model, sharded checkpoint format)
    first = Trainer(run_config(r.one_then_two, world=1))
    stop_at(first, N)
    assert first.fit() == first.checkpoint_dir
    r.one_then_two_first_metrics = read_metrics(r.one_then_two)
    r.one_then_two_names = checkpoint_names(r.one_then_two)

    jobs = []
    for name, cfg, extra in [
        ("reference", run_config(r.reference, world=2), {"report": str(root / "layout_reference")}),
        ("two_then_one", run_config(r.two_then_one, world=2), {"stop_at": N}),
        # resumed with activation checkpointing on: it composes with fully_shard, keeps the parameter names (the
        # checkpoint was written without it) and must not change the math
        ("one_then_two", run_config(r.one_then_two, world=2, resume="auto", activation_checkpointing=True),
         {"report": str(root / "layout_resumed")}),
        # bf16 under FSDP and under DDP: the timesteps the generator sees are recorded (compared with a DDP run in
        # one process)
        ("bf16", bf16_config(r.bf16, world=2), {"times": str(root / "times_bf16")}),
        ("bf16_ddp", bf16_config(r.bf16_ddp, world=2, parallel="ddp"), {"times": str(root / "times_bf16_ddp")}),
    ]:
        (root / f"{name}.yaml").write_text(cfg_to_yaml(cfg))
        jobs.append({"config": str(root / f"{name}.yaml"), "result": str(root / f"result_{name}"), **extra})
    (root / "jobs.json").write_text(json.dumps(jobs))
    proc = run_script(root, "fsdp_worker.py", WORKER, [root / "jobs.json"], launcher=torchrun(2), timeout=300)
    r.output = proc.stdout + proc.stderr
    r.results = {name: [(root / f"result_{name}.rank{k}").read_text() for k in range(2)]
                 for name in ("reference", "two_then_one", "one_then_two", "bf16", "bf16_ddp")}
    return r


def layouts(prefix: Path) -> list[dict]:
    return [json.loads(Path(f"{prefix}.rank{k}.json").read_text()) for k in range(2)]


def export_of(run_dir, which: str = "ema") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "export" / ("model.safetensors" if which == "ema" else
                                                       "raw_model.safetensors")))


def assert_close_state(a, b, what: str) -> None:
    diff = max_abs_diff(a, b)
    assert diff < TOL, f"{what} differ by {diff}"


def assert_same_losses(reference, other, steps=range(1, 2 * N + 1)) -> None:
    ref = {m["step"]: m for m in read_metrics(reference)}
    metrics = read_metrics(other)
    assert [m["step"] for m in metrics] == list(steps), "metrics.jsonl must hold each step exactly once"
    for m in metrics:
        assert m["loss"] == pytest.approx(ref[m["step"]]["loss"], rel=TOL, abs=TOL), f"loss at step {m['step']}"
        assert m["lr"] == pytest.approx(ref[m["step"]]["lr"], rel=1e-12), f"lr at step {m['step']}"
        assert m["skipped"] is False


def assert_same_final_state(reference, other) -> None:
    """Raw weights and EMA of the exports, and the trainer state of the last checkpoints, match."""
    assert_close_state(export_of(reference, "raw"), export_of(other, "raw"), "final raw weights")
    assert_close_state(export_of(reference, "ema"), export_of(other, "ema"), "final EMA weights")
    s_ref, s = trainer_state(checkpoint(reference, 2 * N)), trainer_state(checkpoint(other, 2 * N))
    for key in ("step", "ema_updates", "samples_seen", "nonfinite_total"):
        assert s_ref[key] == s[key], f"trainer_state[{key!r}]: {s_ref[key]} vs {s[key]}"


def sharded_files(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in (ckpt_dir / "sharded").iterdir())


# ================================================================================= 1. real sharding, files
@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_processes_shard_parameters_and_write_sharded_checkpoints(runs):
    reports = layouts(runs.root / "layout_reference")
    assert sorted(rep["rank"] for rep in reports) == [0, 1] and all(rep["world"] == 2 for rep in reports)
    for rep in reports:
        for kind in ("params", "ema"):
            entries = rep[kind]
            assert entries and all(e["dtensor"] for e in entries.values()), f"rank {rep['rank']}: plain {kind}"
            assert all(e["mesh"] == 2 and e["shard0"] == [True] for e in entries.values())
            local, full = sum(e["local"] for e in entries.values()), sum(e["full"] for e in entries.values())
            assert local < full, f"rank {rep['rank']} holds all {full} {kind} elements: nothing is sharded"
        big = [n for n, e in rep["params"].items() if e["full"] >= 1000]
        assert big and all(rep["params"][n]["local"] < rep["params"][n]["full"] for n in big)
    # together the two ranks hold every element exactly once
    for name, e0 in reports[0]["params"].items():
        assert e0["local"] + reports[1]["params"][name]["local"] == e0["full"], name
    assert reports[0]["params"].keys() == reports[1]["params"].keys()
    # the run that resumed a 1-process checkpoint on 2 processes is sharded as well
    assert all(e["local"] < e["full"] for rep in layouts(runs.root / "layout_resumed")
               for n, e in rep["params"].items() if e["full"] >= 1000)

    ref = runs.reference
    assert runs.results["reference"] == [str(ref / "export")] * 2
    assert checkpoint_names(ref) == [f"step_{N:06d}", f"step_{2 * N:06d}"]
    for step in (N, 2 * N):
        folder = checkpoint(ref, step)
        assert sharded_files(folder) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert (folder / "rng_state_0.pt").exists() and (folder / "rng_state_1.pt").exists()
        assert not (folder / "rng_state_2.pt").exists()
        for name in ("scheduler.pt", "trainer_state.json", "config.yaml", "COMPLETE"):
            assert (folder / name).exists(), name
        assert not (folder / "model.safetensors").exists() and not (folder / "ema.safetensors").exists()
        state = trainer_state(folder)
        assert state["world_size"] == 2 and state["step"] == step and state["samples_seen"] == step * 2 * B * 2
    assert [m["step"] for m in read_metrics(ref)] == list(range(1, 2 * N + 1)), "only rank 0 may log"


# ======================================================================================= 2. 2 -> 1 process
@pytest.mark.slow
@pytest.mark.distributed
def test_resume_two_processes_in_one(runs):
    stopped = runs.two_then_one
    # SIGTERM reached rank 0 only, yet both ranks stopped after step N and wrote the checkpoint
    assert runs.results["two_then_one"] == [str(stopped / "checkpoints")] * 2
    assert checkpoint_names(stopped) == [f"step_{N:06d}"]
    assert not (stopped / "export").exists()
    assert sharded_files(checkpoint(stopped, N)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert_same_losses(runs.reference, stopped, steps=range(1, N + 1))

    import torch.distributed as dist

    assert not dist.is_initialized()
    trainer = Trainer(run_config(stopped, world=1, resume="auto"))
    assert trainer.step == N and trainer.ema.num_updates == N and trainer.accelerator.num_processes == 1
    assert trainer.scheduler.last_epoch == N
    # the whole state was read back (resharded from 2 ranks to 1): weights and EMA as saved
    from mardini.export import read_weights

    assert_state_equal(trainer.full_model_state(), read_weights(checkpoint(stopped, N), "raw"), "resumed weights")
    assert_state_equal(trainer.full_ema_state(), read_weights(checkpoint(stopped, N), "ema"), "resumed EMA")
    assert trainer.optimizer.state and all(int(s["step"]) == N for s in trainer.optimizer.state.values())
    trainer.fit()
    assert_same_final_state(runs.reference, stopped)
    assert_same_losses(runs.reference, stopped)
    state = trainer_state(checkpoint(stopped, 2 * N))
    assert state["world_size"] == 1
    assert sharded_files(checkpoint(stopped, 2 * N)) == [".metadata", "__0_0.distcp"]


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpoint_resaved_by_one_process_is_identical(runs, tmp_path):
    """The GPU check of issue 14 in small (benchmarks/resave_checkpoint.py): a 2-process sharded checkpoint, loaded
    by one process and saved again at once; scripts/compare_checkpoints.py finds every model, optimizer and EMA
    tensor equal, and finds a single changed element."""
    import importlib.util

    from mardini.training.checkpoint import read_checkpoint_tensors

    spec = importlib.util.spec_from_file_location("compare_checkpoints",
                                                  Path(__file__).parent.parent / "scripts" / "compare_checkpoints.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    saved = checkpoint(runs.reference, N)
    out = tmp_path / "resaved"
    Trainer(run_config(out, world=1, resume=str(saved))).save_checkpoint()
    resaved = checkpoint(out, N)
    assert trainer_state(saved)["world_size"] == 2 and trainer_state(resaved)["world_size"] == 1
    assert script.main([str(saved), str(resaved), "--json", str(tmp_path / "compare.json")]) == 0
    report = json.loads((tmp_path / "compare.json").read_text())["results"][0]
    groups = report["groups"]
    assert set(groups) == {"model", "optim", "ema"} and report["identical"]
    n_params = len(export_of(runs.reference, "raw"))
    assert groups["model"]["tensors"] == groups["ema"]["tensors"] == n_params
    assert groups["optim"]["tensors"] >= 2 * n_params  # exp_avg and exp_avg_sq of every parameter (+ steps)

    tensors = read_checkpoint_tensors(resaved)
    name = next(k for k in tensors if k.startswith("model.") and tensors[k].numel() > 1)
    changed = dict(tensors, **{name: tensors[name].clone().index_fill_(0, torch.tensor([0]), 0.5)})
    found = script.compare(tensors, changed)
    assert not found["identical"] and found["groups"]["model"]["different"] == 1
    assert found["groups"]["ema"]["different"] == found["groups"]["optim"]["different"] == 0


# ======================================================================================= 3. 1 -> 2 processes
@pytest.mark.slow
@pytest.mark.distributed
def test_resume_one_process_on_two(runs):
    run = runs.one_then_two
    # the first half, in a plain process: a sharded-format checkpoint written by one rank
    assert runs.one_then_two_names == [f"step_{N:06d}"]
    assert sharded_files(checkpoint(run, N)) == [".metadata", "__0_0.distcp"]
    assert (checkpoint(run, N) / "rng_state_0.pt").exists()
    assert trainer_state(checkpoint(run, N))["world_size"] == 1
    assert [m["step"] for m in runs.one_then_two_first_metrics] == list(range(1, N + 1))
    # the second half, resumed by torchrun with 2 processes
    assert runs.results["one_then_two"] == [str(run / "export")] * 2
    assert trainer_state(checkpoint(run, 2 * N))["world_size"] == 2
    assert_same_final_state(runs.reference, run)
    assert_same_losses(runs.reference, run)
    # rank 1 had no RNG state to restore: said once, by rank 0, for both
    assert runs.output.count("holds the RNG state of 1 of these 2 ranks") == 1, runs.output[-3000:]


# ============================================================================ 4. FSDP == DDP / single process
@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_two_processes_match_single_process_ddp(runs, tmp_path):
    single = tmp_path / "ddp"
    Trainer(run_config(single, world=1, parallel="ddp")).fit()
    assert (checkpoint(single, 2 * N) / "model.safetensors").exists()  # the DDP (Accelerate) format
    assert_same_final_state(runs.reference, single)
    assert_same_losses(runs.reference, single)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_bf16_trains_the_ddp_objective_with_fp32_timesteps(runs, tmp_path):
    """FSDP used to cast the model's inputs to bf16 at the root (t = 0.7771 reached the model as 0.77734375), so
    it trained another objective than DDP. Under bf16 autocast, FSDP and DDP on 2 processes and DDP in one process
    must all see the same fp32 timesteps, exactly, and log the same losses up to bf16 rounding."""
    single = tmp_path / "ddp_bf16"
    trainer = Trainer(bf16_config(single, world=1, parallel="ddp"))
    times = record_times(trainer)
    trainer.fit()

    two = {name: [json.loads(Path(f"{runs.root / f'times_{run}'}.rank{k}.json").read_text()) for k in range(2)]
           for name, run in (("FSDP", "bf16"), ("DDP on 2 processes", "bf16_ddp"))}
    assert runs.results["bf16_ddp"] == [str(runs.bf16_ddp / "export")] * 2
    for name, ranks in two.items():
        assert sorted(times) == sorted(ranks[0]) == sorted(ranks[1]) == ["0", "1", "2"], name
        for step, records in times.items():
            ddp_t = sorted(r["t"] for r in records)
            got_t = sorted(r["t"] for rank in ranks for r in rank[step])
            assert {r["dtype"] for rank in ranks for r in rank[step]} == {r["dtype"] for r in records} == \
                {"torch.float32"}, name
            assert got_t == ddp_t, f"step {step}: {name} timesteps {got_t} != one process {ddp_t}"
            assert any(float(torch.tensor(t).bfloat16()) != t for t in ddp_t), "times bf16 can hold prove nothing"
    ref = {m["step"]: m["loss"] for m in read_metrics(single)}
    for name, run in (("FSDP", runs.bf16), ("DDP on 2 processes", runs.bf16_ddp)):
        got = {m["step"]: m["loss"] for m in read_metrics(run)}
        assert sorted(got) == sorted(ref) == [1, 2, 3], name
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=2e-2), \
                f"step {step}: {name} {got[step]} vs one process {ref[step]}"


# ============================================================================ 5. sharded checkpoint readers
@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_checkpoint_loads_full_weights_in_plain_process(runs):
    import torch.distributed as dist

    from mardini.export import load_model, read_weights
    from mardini.inference.pipeline import MarDiniPipeline

    final = checkpoint(runs.reference, 2 * N)
    assert not dist.is_initialized()
    ema, raw = read_weights(final, "ema"), read_weights(final, "raw")
    assert_state_equal(ema, export_of(runs.reference, "ema"), "read_weights(sharded checkpoint, 'ema')")
    assert_state_equal(raw, export_of(runs.reference, "raw"), "read_weights(sharded checkpoint, 'raw')")
    assert any(not torch.equal(ema[k], raw[k]) for k in ema), "EMA and raw weights must differ after 2N steps"
    assert all(not v.is_meta and v.device.type == "cpu" for v in ema.values())

    pipe = MarDiniPipeline.from_pretrained(final)
    assert_state_equal({k: v.float() for k, v in pipe.model.state_dict().items()}, ema, "pipeline weights")
    model, _ = load_model(final, "raw")
    assert_state_equal(model.state_dict(), raw, "load_model(raw)")
    # a checkpoint written by a single plain process reads the same way
    one = checkpoint(runs.one_then_two, N)
    assert read_weights(one, "ema").keys() == ema.keys()


# ====================================================================================== 6. unit level, fast
def _tiny_model_and_batch():
    from mardini.diffusion import Diffusion
    from mardini.models import MarDini, as_model_config

    cfg = tiny_config("unused")
    torch.manual_seed(0)
    model = MarDini(as_model_config(cfg.model))
    diffusion = Diffusion(OmegaConf.to_object(cfg.diffusion))
    g = torch.Generator().manual_seed(1)
    b, t = 2, cfg.model.max_frames
    z_hi = torch.randn(b, t, 12, 16, 16, generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, 1:-1] = True
    batch = dict(z_hi=z_hi, z_lo=None, mask=mask, diffusion=diffusion, noise=torch.randn(z_hi.shape, generator=g),
                 t=torch.rand(b, generator=g) * 0.9 + 0.05)
    return model, batch


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["z_hi"], batch["z_lo"], batch["mask"], batch["diffusion"], noise=batch["noise"], t=batch["t"])
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_keeps_names_loss_and_gradients():
    from mardini.training.parallel import is_sharded, parallelize, transformer_blocks

    plain, batch = _tiny_model_and_batch()
    wrapped = copy.deepcopy(plain)
    parallelize(wrapped, "ddp", activation_checkpointing=True)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert not is_sharded(wrapped)

    # checkpointing is really on: every block's inner modules run again (recomputed) during backward
    calls = {"plain": 0, "wrapped": 0}
    for key, model in (("plain", plain), ("wrapped", wrapped)):
        inner = next(m for m in transformer_blocks(model)[0].modules() if isinstance(m, torch.nn.Linear))
        inner.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    loss_p, grads_p = _loss_and_grads(plain, batch)
    loss_w, grads_w = _loss_and_grads(wrapped, batch)
    assert calls == {"plain": 1, "wrapped": 2}, calls

    assert torch.isfinite(loss_p) and torch.equal(loss_p, loss_w), (loss_p, loss_w)
    assert grads_p.keys() == grads_w.keys() and len(grads_p) == len(list(plain.parameters()))
    different = [n for n in grads_p if not torch.equal(grads_p[n], grads_w[n])]
    assert not different, f"activation checkpointing changed {len(different)} gradients, e.g. {different[:3]}"


def test_parallelize_fsdp_without_process_group_keeps_model_whole():
    import torch.distributed as dist

    from mardini.training.parallel import is_sharded, parallelize

    model, _ = _tiny_model_and_batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not dist.is_initialized()
    parallelize(model, "fsdp")
    assert not is_sharded(model)
    assert_state_equal(model.state_dict(), before, "fsdp without a process group")


def test_parallelize_unknown_mode_names_the_key(tmp_path):
    from mardini.training.config import validate_config
    from mardini.training.parallel import parallelize

    model, _ = _tiny_model_and_batch()
    with pytest.raises(ValueError, match=r"train\.parallel.*bogus"):
        parallelize(model, mode="bogus")
    cfg = tiny_config(tmp_path / "run", parallel="bogus")
    with pytest.raises(ValueError, match=r"train\.parallel"):
        validate_config(cfg)


@pytest.mark.parametrize("saved, resumed, message", [
    ("ddp", "fsdp", "train.parallel=ddp"),
    ("fsdp", "ddp", "train.parallel=fsdp"),
])
def test_resume_with_other_parallel_format_fails_clearly(tmp_path, saved, resumed, message):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(out, max_steps=2, parallel=saved))
    trainer.step = 1  # a step a fresh start (0) does not have: the resume below must read it from the checkpoint
    path = trainer.save_checkpoint()
    assert ((path / "sharded" / ".metadata").exists()) == (saved == "fsdp")
    for resume in ("auto", str(path)):
        with pytest.raises(ValueError, match=rf"{path.name}.*{message.replace('.', '[.]')}"):
            Trainer(tiny_config(out, max_steps=2, parallel=resumed, resume=resume))
    # the same format resumes, at the saved step
    assert Trainer(tiny_config(out, max_steps=2, parallel=saved, resume="auto")).step == 1
