"""Multi-GPU training figures (BENCHMARKS.md "Multi-GPU", issues 14 and 15): every run is a real `mardini.train`
launch; "2 GPUs" below means --gpus N (default 2; with 8, accelerate reads configs/accelerate/fsdp_8gpu.yaml).

    python benchmarks/multi_gpu.py --out results/            # 2 GPUs, about 45 minutes (one call: --phases)
    python benchmarks/multi_gpu.py --gpus 8 --out results/   # 8 GPUs: scaling 1 -> 8, resharding 8 -> 1 -> 8
    python benchmarks/multi_gpu.py --preset cpu --out /tmp/mg # the same phases with the tiny model on 2 CPU
                                                              # processes (gloo): checks the script, not the speed
Phases (in this order; --phases picks some, --deadline-min skips those that would start too late):
  paper_torchrun   paper-size model, FSDP2, bf16, compiled, `torchrun --nproc_per_node 2`: periodic validation,
                   final samples, export, exit status 0; steps/s, tokens/s, MFU and peak memory per GPU
  weak_scaling     the same per-GPU batch on 1 GPU (torchrun, 1 process, FSDP) -> efficiency 1 -> 2 GPUs (mean
                   and median step); meanwhile on the other GPU: the 2-GPU checkpoint resaved by 1 process
  reshard          the checkpoint of --reshard-from (paper_torchrun, or paper_accelerate_ac in a later call) loaded
                   and saved again by 1 process (unless weak_scaling did), that one by 2 processes under
                   `accelerate launch`; scripts/compare_checkpoints.py: model, optimizer, EMA identical 2 -> 1 -> 2
  paper_accelerate paper-size model under `accelerate launch --config_file configs/accelerate/fsdp_2gpu.yaml`,
                   activation checkpointing on, a larger batch
  loss_equality    `small`, FSDP: 2 GPUs x batch b vs 1 GPU x batch b x grad_accum 2 (same global batch, same
                   samples, noise and masks): the per-step losses; meanwhile on the other GPU: identity_impl
  ddp_small        `small`, DDP: 1 vs 2 GPUs, torch.compile on and off
  max_batch        benchmarks/max_batch.py: the largest per-GPU batch of the paper-size run, activation
                   checkpointing off and on (--max-batch); launched again after an out-of-memory exit
  launcher_pair    the paper-size run at identical settings (batch, steps, no periodic validation) under torchrun
                   and under `accelerate launch`: the launchers must not change speed, memory or losses
  loss_noise       the noise floor of loss_equality: `small`, FSDP, 1 GPU at the same global batch two ways
                   (b x grad_accum 2 on GPU 0, 2b x grad_accum 1 on GPU 1: the same maths, other rounding), and
                   2 GPUs x b; the 2-vs-1-GPU difference is compared with the 1-GPU-vs-1-GPU one
  identity_impl    benchmarks/train_step.py: the paper joint step with identity attention split vs gather (1 GPU;
                   runs inside loss_equality unless that phase is left out)
Writes --out/multi_gpu.json (after every phase) and --out/logs.tar.gz. MFU = model FLOPs per step per GPU (3 x the
analytic forward count at the mean number of generated frames of the curriculum's second half,
benchmarks/train_throughput.py) x steps/s / --peak-tflops (790: bf16 matmul measured on the lent H200). steps/s is
the mean over the second half of a run (everything included); steps_per_s_median the median step there, the compiled
steady state without the few recompilations new mask shapes cause (slow_steps, slow_steps_s count them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train_throughput import median_rate, model_flops_per_step, steady_rate, step_seconds  # benchmarks/

REPO = Path(__file__).resolve().parent.parent
MAX_BATCH_LAUNCHES = 8  # per setting: each out-of-memory try in a multi-process launch ends that launch
PHASES = ("paper_torchrun", "weak_scaling", "reshard", "paper_accelerate", "loss_equality", "ddp_small",
          "max_batch", "identity_impl", "launcher_pair", "loss_noise")

QUIET = ["train.trackers=[]", "train.progress=false"]
PRESETS = {
    "gpu": dict(
        peak_tflops=790.0,
        # The paper-size model at 512 px latents: 17 frames of 64x64 latents (identity autoencoder on 128x128
        # synthetic clips: 12 channels; a 16-channel VAE changes only the patch embedding's input width), the
        # planner at r = 4 (16x16 latents), as in BENCHMARKS.md's training-step tables.
        paper=["model=paper", "model.latent_channels=12", "model.lowres_factor=4", "data=synthetic_large",
               "data.synthetic.height=128", "data.synthetic.width=128", "data.num_workers=6", "train=gpu",
               "train.parallel=fsdp", "train.warmup_steps=10", "train.log_every=10", "train.eval_num_videos=4",
               "train.num_sample_videos=1", "train.sample_steps=10", "train.keep_last=1",
               "train.checkpoint_every=100000", "train.sample_every=0", "train.eval_every=0", *QUIET],
        paper_batch=4, paper_steps=40, paper_eval_every=20, paper_ac_batch=8, paper_ac_steps=20, pair_steps=40,
        small=["experiment=small_synthetic", "train.eval_every=0", "train.sample_every=0",
               "train.checkpoint_every=100000", "train.num_sample_videos=1", *QUIET],
        small_batch=32, loss_batch=16, loss_steps=200, ddp_steps=160,
        identity_impl=["--parts", "joint", "--compile", "1", "--kernels", "cudnn", "--impls", "split,gather",
                       "--batch", "2"],
        # one launch each; the sizes measured first sit just below the largest fits found on 2026-12-04 (6 without
        # activation checkpointing, 54-65 with it), so few sizes are tried
        max_batch=[["--ac", "0", "--sizes", "5,6"], ["--ac", "1", "--sizes", "48,54", "--bisections", "2"]]),
    "cpu": dict(
        peak_tflops=1.0,
        paper=["model=tiny", "data=synthetic", "train.cpu=true", "train.parallel=fsdp", "train.warmup_steps=2",
               "train.log_every=2", "train.eval_num_videos=2", "train.num_sample_videos=1", "train.sample_steps=2",
               "train.keep_last=1", "train.checkpoint_every=100000", "train.sample_every=0", "train.eval_every=0",
               "diffusion.num_inference_steps=2", "data.num_workers=0", *QUIET],
        paper_batch=2, paper_steps=6, paper_eval_every=3, paper_ac_batch=4, paper_ac_steps=4, pair_steps=6,
        small=["model=tiny", "data=synthetic", "train.cpu=true", "train.eval_every=0", "train.sample_every=0",
               "train.checkpoint_every=100000", "train.num_sample_videos=1", "train.sample_steps=2",
               "diffusion.num_inference_steps=2", "data.num_workers=0", *QUIET],
        small_batch=2, loss_batch=2, loss_steps=6, ddp_steps=6, identity_impl=None,
        max_batch=[["--ac", "0", "--sizes", "1,2", "--max-size", "4"],
                   ["--ac", "1", "--sizes", "1,2", "--max-size", "3"]]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, args):
        self.args, self.p = args, dict(PRESETS[args.preset], gpus=args.gpus)
        if args.max_batch is not None:
            self.p["max_batch"] = args.max_batch
        self.out = Path(args.out).resolve()
        self.runs = Path(args.runs).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.runs.mkdir(parents=True, exist_ok=True)
        import torch

        self.results: dict = {"preset": args.preset, "commit": git_commit(), "source_digest": source_digest(),
                              "torch": torch.__version__,
                              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                              "phases": {}}
        self.start = time.time()
        self.overrides_of: dict[str, list[str]] = {}  # run name -> the overrides it was launched with

    # ------------------------------------------------------------------------------------------ launching
    def launch(self, name: str, target: list[str], nproc: int, gpus: str | None = None, launcher: str = "torchrun",
               timeout: float = 600) -> dict:
        """Run `target` (['-m', module, ...] or [script, ...]) under torchrun or accelerate; wait; log."""
        port = str(free_port())
        if launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", port, *target]
        else:
            config = "fsdp_8gpu.yaml" if nproc == 8 else "fsdp_2gpu.yaml"  # --num_processes overrides its count
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "configs" / "accelerate" / config), "--num_processes", str(nproc),
                   "--main_process_port", port, *target]
        env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
        if gpus is not None and self.args.preset == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = gpus
        began = time.time()
        with open(self.logs / f"{name}.txt", "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            try:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        record = {"exit_status": rc, "wall_s": round(time.time() - began, 1), "processes": nproc,
                  "launcher": launcher}
        print(f"[{self.elapsed():6.0f} s] {name}: exit {rc} in {record['wall_s']} s", flush=True)
        return record

    def train(self, name: str, overrides: list[str], nproc: int, gpus: str | None = None,
              launcher: str = "torchrun", timeout: float = 600) -> dict:
        run_dir = self.runs / name
        overrides = [*overrides, f"train.output_dir={run_dir}", f"run_name={name}"]
        self.overrides_of[name] = overrides
        record = self.launch(name, ["-m", "mardini.train", *overrides], nproc, gpus, launcher, timeout)
        record.update(self.throughput(run_dir, overrides, nproc))
        return record

    def throughput(self, run_dir: Path, overrides: list[str], nproc: int) -> dict:
        """Steady-state figures from rank 0's metrics.jsonl (second half of the run)."""
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            return {}
        metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if len(metrics) < 4:
            return {"steps": len(metrics)}
        rate = steady_rate(metrics)
        flops, shape = model_flops_per_step(overrides)
        batch = shape["batch_per_process"]
        record = {"steps": len(metrics), "steps_per_s": round(rate, 4), "batch_per_gpu": batch,
                  "global_batch": batch * nproc, "samples_per_s": round(rate * batch * nproc, 2),
                  "final_loss": round(sum(m["loss"] for m in metrics[-10:]) / len(metrics[-10:]), 5)}
        if "tokens_per_sample" in shape:
            record["tokens_per_s_per_gpu"] = round(rate * batch * shape["tokens_per_sample"])
        if flops:
            record["tflops_per_gpu"] = round(flops * rate / 1e12, 1)
            record["mfu_per_gpu"] = round(flops * rate / (self.p["peak_tflops"] * 1e12), 4)
        # the compiled steady state: the median step, without the few recompilations for new mask shapes
        median, seconds = median_rate(metrics), step_seconds(metrics)
        record.update(steps_per_s_median=round(median, 4),
                      slow_steps=sum(s > 3 / median for s in seconds), slow_steps_s=round(sum(
                          s for s in seconds if s > 3 / median), 1))
        if "tokens_per_sample" in shape:
            record["tokens_per_s_per_gpu_median"] = round(median * batch * shape["tokens_per_sample"])
        if flops:
            record["mfu_per_gpu_median"] = round(flops * median / (self.p["peak_tflops"] * 1e12), 4)
        peaks = [m["peak_mem_gib"] for m in metrics if "peak_mem_gib" in m]
        if peaks:
            record["peak_mem_gib_rank0"] = max(peaks)
        evals = run_dir / "eval.jsonl"
        if evals.exists():
            record["evaluations_at_steps"] = [json.loads(line)["step"] for line in evals.read_text().splitlines()]
        record["export_written"] = (run_dir / "export" / "model.safetensors").exists()
        record["samples_written"] = sorted(p.name for p in (run_dir / "samples").glob("*.mp4")) \
            if (run_dir / "samples").is_dir() else []
        return record

    def drop_heavy(self, *names: str) -> None:
        """Checkpoints and exports of finished runs (tens of GB at paper size): the disk holds a few."""
        if self.args.keep_heavy:
            return
        for name in names:
            for sub in ("checkpoints", "export"):
                shutil.rmtree(self.runs / name / sub, ignore_errors=True)

    def elapsed(self) -> float:
        return time.time() - self.start

    def save(self) -> None:
        (self.out / "multi_gpu.json").write_text(json.dumps(self.results, indent=1))

    # ------------------------------------------------------------------------------------------ phases
    def paper(self, batch: int, steps: int, *extra: str) -> list[str]:
        return [*self.p["paper"], f"train.batch_size={batch}", f"train.max_steps={steps}", *extra]

    def paper_torchrun(self) -> dict:
        p = self.p
        return {"run": self.train("paper_torchrun", self.paper(p["paper_batch"], p["paper_steps"],
                                                                f"train.eval_every={p['paper_eval_every']}"),
                                  nproc=p["gpus"])}

    def weak_scaling(self) -> dict:
        """1 GPU at the 2-GPU run's per-GPU batch; meanwhile the 2-GPU checkpoint is resaved by 1 process."""
        p = self.p
        ckpt = self.checkpoint_of("paper_torchrun")
        with ThreadPoolExecutor(2) as pool:
            one = pool.submit(self.train, "paper_1gpu", self.paper(p["paper_batch"], p["paper_steps"]), 1, "0")
            resave = pool.submit(self.resave, "resaved_1gpu", "paper_torchrun", 1, "1", "torchrun") \
                if ckpt and self.args.reshard_from == "paper_torchrun" else None
            result = {"run_1gpu": one.result(), "resave_1gpu": resave.result() if resave else "no checkpoint"}
        self.drop_heavy("paper_1gpu")
        two = self.results["phases"].get("paper_torchrun", {}).get("run", {})
        for key in ("steps_per_s", "steps_per_s_median"):
            if key in two and key in result["run_1gpu"]:
                result[key.replace("steps_per_s", "efficiency_1_to_n")] = round(two[key] / result["run_1gpu"][key], 4)
        return result

    def checkpoint_of(self, name: str) -> str | None:
        found = sorted((self.runs / name / "checkpoints").glob("step_*"))
        return str(found[-1]) if found else None

    def resave(self, name: str, source: str, nproc: int, gpus: str | None, launcher: str) -> dict:
        """The last checkpoint of run `source` loaded by `nproc` processes and saved again (as run `name`), with
        the overrides `source` was launched with."""
        ckpt = self.checkpoint_of(source)
        overrides = [o for o in self.overrides_of[source] if not o.startswith(("train.output_dir=", "run_name="))]
        self.overrides_of[name] = overrides
        record = self.launch(name, [str(REPO / "benchmarks" / "resave_checkpoint.py"), ckpt, *overrides,
                                    f"train.output_dir={self.runs / name}"], nproc, gpus, launcher, timeout=400)
        return dict(record, source=ckpt)

    def reshard(self) -> dict:
        """N -> 1 -> N processes: the checkpoint of --reshard-from resaved by 1 process (weak_scaling does it
        beside its 1-GPU run for paper_torchrun), that one by N under `accelerate launch`; all three compared."""
        source, result = self.args.reshard_from, {}
        if self.checkpoint_of(source) is None:
            return {"error": f"no checkpoint of {source}"}
        if self.checkpoint_of("resaved_1gpu") is None:
            result["resave_1gpu"] = self.resave("resaved_1gpu", source, 1, "0", "torchrun")
            if self.checkpoint_of("resaved_1gpu") is None:
                return result
        result["resave_2gpu"] = self.resave("resaved_2gpu", "resaved_1gpu", self.p["gpus"], None, "accelerate")
        chain = [self.checkpoint_of(n) for n in (source, "resaved_1gpu", "resaved_2gpu")]
        if all(chain):
            report = self.out / "compare_checkpoints.json"
            cmd = [sys.executable, str(REPO / "scripts" / "compare_checkpoints.py"), *chain, "--json", str(report)]
            with open(self.logs / "compare_checkpoints.txt", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
            result.update(compare_exit_status=rc, chain=chain,
                          compare=json.loads(report.read_text()) if report.exists() else None)
        self.drop_heavy(source, "resaved_1gpu", "resaved_2gpu")
        return result

    def paper_accelerate(self) -> dict:
        p = self.p
        run = self.train("paper_accelerate_ac", self.paper(p["paper_ac_batch"], p["paper_ac_steps"],
                                                             "train.activation_checkpointing=true"),
                         nproc=p["gpus"], launcher="accelerate")
        if self.args.reshard_from != "paper_accelerate_ac":
            self.drop_heavy("paper_accelerate_ac")
        return {"run": run}

    def loss_equality(self) -> dict:
        p = self.p
        common = [*p["small"], "train.parallel=fsdp", f"train.max_steps={p['loss_steps']}", "train.log_every=10"]
        two = self.train("loss_2gpu", [*common, f"train.batch_size={p['loss_batch']}"], nproc=p["gpus"])
        with ThreadPoolExecutor(2) as pool:  # the other GPU meanwhile: the identity-attention benchmark
            one = pool.submit(self.train, "loss_1gpu_accum",  # grad_accum = number of GPUs: same global batch
                              [*common, f"train.batch_size={p['loss_batch']}", f"train.grad_accum={p['gpus']}"], 1, "0")
            side = pool.submit(self.identity_impl)
            one, side = one.result(), side.result()
        result = {"run_2gpu": two, "run_1gpu_accum": one, **compare_losses(self.runs / "loss_2gpu",
                                                                           self.runs / "loss_1gpu_accum")}
        self.results["phases"]["identity_impl"] = side
        self.drop_heavy("loss_2gpu", "loss_1gpu_accum")
        return result

    def ddp_small(self) -> dict:
        p = self.p
        common = [*p["small"], "train.parallel=ddp", f"train.max_steps={p['ddp_steps']}",
                  f"train.batch_size={p['small_batch']}"]
        result = {}
        with ThreadPoolExecutor(2) as pool:  # the two 1-GPU runs side by side, one per GPU
            futures = {f"1gpu_compile_{c}": pool.submit(self.train, f"ddp_1gpu_compile_{c}",
                                                        [*common, f"train.compile={str(c).lower()}"], 1, gpu)
                       for c, gpu in ((True, "0"), (False, "1"))}
            result.update({k: f.result() for k, f in futures.items()})
        for c in (True, False):
            result[f"2gpu_compile_{c}"] = self.train(f"ddp_2gpu_compile_{c}",
                                                     [*common, f"train.compile={str(c).lower()}"], p["gpus"])
        for c in (True, False):
            one, two = result[f"1gpu_compile_{c}"], result[f"2gpu_compile_{c}"]
            if "steps_per_s" in one and "steps_per_s" in two:
                result[f"efficiency_compile_{c}"] = round(two["steps_per_s"] / one["steps_per_s"], 4)
        self.drop_heavy(*(f"ddp_{n}gpu_compile_{c}" for n in (1, 2) for c in (True, False)))
        return result

    def identity_impl(self) -> dict:
        if not self.p["identity_impl"]:
            return {"skipped": "GPU only"}
        out = self.out / "identity_impl.json"
        record = self.launch("identity_impl", [str(REPO / "benchmarks" / "train_step.py"), *self.p["identity_impl"],
                                               "--peak-tflops", str(self.p["peak_tflops"]), "--out", str(out)],
                             1, "0", timeout=500)
        record["results"] = json.loads(out.read_text())["results"] if out.exists() else None
        return record

    def max_batch(self) -> dict:
        """benchmarks/max_batch.py per argument list of the preset (or --max-batch); launched again after each
        out-of-memory exit (one rank out of memory ends a multi-process launch), going on from its JSON."""
        p, result = self.p, {}
        for i, args in enumerate(p["max_batch"]):
            name = f"max_batch_{i}"
            out = self.out / f"{name}.json"
            launches, tries, state = [], 0, None
            for attempt in range(MAX_BATCH_LAUNCHES):
                target = [str(REPO / "benchmarks" / "max_batch.py"), *args, "--json", str(out),
                          *(["--fresh"] if attempt == 0 else []), "--", *self.paper(p["paper_batch"],
                                                                                      p["paper_steps"])]
                launches.append(self.launch(f"{name}_{attempt}", target, p["gpus"], timeout=900))
                # torchrun reports a failed worker as exit status 1, whatever the worker's own (3 after running
                # out of memory): go on while the JSON shows progress and an unfinished setting
                state = json.loads(out.read_text())["results"] if out.exists() else None
                done, before = all(r.get("done") for r in state or []), tries
                tries = sum(len(r.get("tries", [])) for r in state or [])
                if launches[-1]["exit_status"] == 0 or done or tries == before:
                    break
            result[name] = {"args": args, "launches": launches, "results": state}
            self.results["phases"]["max_batch"] = result
            self.save()
        return result

    def launcher_pair(self) -> dict:
        """The same paper-size run under both launchers, one after the other (both use every GPU)."""
        p = self.p
        overrides = self.paper(p["paper_batch"], p["pair_steps"], "train.log_every=5")
        result = {"torchrun": self.train("pair_torchrun", overrides, p["gpus"]),
                  "accelerate": self.train("pair_accelerate", overrides, p["gpus"], launcher="accelerate")}
        a, b = result["torchrun"], result["accelerate"]
        if "steps_per_s" in a and "steps_per_s" in b:
            result["accelerate_over_torchrun_steps_per_s"] = round(b["steps_per_s"] / a["steps_per_s"], 4)
        result.update(compare_losses(self.runs / "pair_torchrun", self.runs / "pair_accelerate"))
        self.drop_heavy("pair_torchrun", "pair_accelerate")
        return result

    def loss_noise(self) -> dict:
        """How far two mathematically equal 1-GPU runs drift apart in bf16, beside the 2-vs-1-GPU drift."""
        p = self.p
        common = [*p["small"], "train.parallel=fsdp", f"train.max_steps={p['loss_steps']}", "train.log_every=10"]
        two = self.train("noise_2gpu", [*common, f"train.batch_size={p['loss_batch']}"], nproc=p["gpus"])
        with ThreadPoolExecutor(2) as pool:  # one run per GPU
            accum = pool.submit(self.train, "noise_1gpu_accum", [*common, f"train.batch_size={p['loss_batch']}",
                                                                 f"train.grad_accum={p['gpus']}"], 1, "0")
            whole = pool.submit(self.train, "noise_1gpu_whole",
                                [*common, f"train.batch_size={p['loss_batch'] * p['gpus']}"], 1, "1")
            accum, whole = accum.result(), whole.result()
        result = {"run_2gpu": two, "run_1gpu_accum": accum, "run_1gpu_whole": whole,
                  "two_gpus_vs_1gpu_accum": compare_losses(self.runs / "noise_2gpu", self.runs / "noise_1gpu_accum"),
                  "1gpu_whole_vs_1gpu_accum": compare_losses(self.runs / "noise_1gpu_whole",
                                                             self.runs / "noise_1gpu_accum")}
        self.drop_heavy("noise_2gpu", "noise_1gpu_accum", "noise_1gpu_whole")
        return result

    # ------------------------------------------------------------------------------------------ driver
    def run(self, phases: list[str]) -> None:
        for phase in phases:
            if phase in self.results["phases"]:  # identity_impl already ran beside loss_equality
                continue
            budget = self.args.phase_minutes.get(phase, 3.0) * 60
            if self.elapsed() + budget > self.args.deadline_min * 60:
                self.results["phases"][phase] = {"skipped": f"deadline: {self.elapsed():.0f} s elapsed"}
                print(f"skipping {phase}: deadline", flush=True)
                continue
            print(f"[{self.elapsed():6.0f} s] phase {phase}", flush=True)
            began = time.time()
            try:
                result = getattr(self, phase)()
            except Exception as e:  # keep going: later phases are independent
                result = {"error": f"{type(e).__name__}: {e}"}
            result["phase_wall_s"] = round(time.time() - began, 1)
            self.results["phases"][phase] = result
            self.save()
        with tarfile.open(self.out / "logs.tar.gz", "w:gz") as tar:
            tar.add(self.logs, arcname="logs")
            for run in sorted(self.runs.iterdir()):
                for name in ("metrics.jsonl", "eval.jsonl", "config.yaml", "cli.log"):
                    if (run / name).exists():
                        tar.add(run / name, arcname=f"runs/{run.name}/{name}")
        self.save()


def compare_losses(a: Path, b: Path) -> dict:
    """Per-step losses of two runs with the same global batch: differences, and 20-step window means."""
    if not ((a / "metrics.jsonl").exists() and (b / "metrics.jsonl").exists()):
        return {"loss_comparison": f"missing metrics.jsonl in {a.name} or {b.name}"}
    la = {m["step"]: m["loss"] for m in map(json.loads, (a / "metrics.jsonl").read_text().splitlines())}
    lb = {m["step"]: m["loss"] for m in map(json.loads, (b / "metrics.jsonl").read_text().splitlines())}
    steps = sorted(la.keys() & lb.keys())
    if not steps:
        return {"loss_comparison": "no common steps"}
    diffs = [abs(la[s] - lb[s]) for s in steps]
    rel = [abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-12) for s in steps]
    window = max(1, min(20, len(steps) // 5))
    windows = []
    for i in range(0, len(steps) - window + 1, window):
        chunk = steps[i:i + window]
        windows.append({"steps": f"{chunk[0]}-{chunk[-1]}", "a": round(sum(la[s] for s in chunk) / window, 5),
                        "b": round(sum(lb[s] for s in chunk) / window, 5)})
    return {"loss_comparison": {"steps": len(steps), "step1": [la[steps[0]], lb[steps[0]]],
                                "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                                "mean_rel_diff": sum(rel) / len(rel), "first5_rel_diff": rel[:5],
                                "window_means": windows}}


def source_digest() -> str:
    """sha256 of the code that ran (mardini/, benchmarks/, configs/: .py and .yaml): a device machine may be handed
    a copy of the working tree whose git metadata is older than its files, so the commit alone can mislead; the same
    digest computed in a checkout (`python -c "import sys; sys.path.insert(0, 'benchmarks'); import multi_gpu;
    print(multi_gpu.source_digest())"`) identifies the commit."""
    import hashlib

    digest = hashlib.sha256()
    for folder in ("mardini", "benchmarks", "configs"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--gpus", type=int, default=2, help="processes of the multi-GPU runs (4 or 8 on larger machines; "
                   "the 1-GPU comparisons use GPUs 0 and 1)")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--out", default="multi_gpu_results")
    p.add_argument("--runs", default="/tmp/mardini_multi_gpu", help="run folders (checkpoints: tens of GB)")
    p.add_argument("--deadline-min", type=float, default=1e9, help="start no phase that would end after this")
    p.add_argument("--phase-minutes", type=json.loads, default={  # as measured on 2 H200s (2026-11-30, 12-04)
        "paper_torchrun": 4.5, "weak_scaling": 3.3, "reshard": 2, "paper_accelerate": 3.3, "loss_equality": 4,
        "ddp_small": 4.5, "identity_impl": 3, "max_batch": 9, "launcher_pair": 5, "loss_noise": 3.5},
        help="JSON: expected minutes per phase")
    p.add_argument("--keep-heavy", action="store_true", help="keep checkpoints and exports of finished runs")
    p.add_argument("--reshard-from", default="paper_torchrun", choices=("paper_torchrun", "paper_accelerate_ac"),
                   help="the multi-GPU run whose checkpoint the reshard phase moves N -> 1 -> N processes")
    p.add_argument("--max-batch", type=json.loads, default=None,
                   help='JSON list of argument lists for benchmarks/max_batch.py, one launch each (default: the '
                        'preset\'s), e.g. \'[["--ac", "1", "--sizes", "48,56"]]\'')
    args = p.parse_args()
    phases = args.phases.split(",")
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        p.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    Bench(args).run(phases)


if __name__ == "__main__":
    main()
