r"""Load a training checkpoint in the world size this is launched with and save it again at once (no step): with
scripts/compare_checkpoints.py, the check that a sharded checkpoint moves between world sizes unchanged.

    torchrun --nproc_per_node 1 benchmarks/resave_checkpoint.py run_2gpu/checkpoints/step_000060 \
        <the run's overrides> train.output_dir=run_1gpu
    python scripts/compare_checkpoints.py run_2gpu/checkpoints/step_000060 run_1gpu/checkpoints/step_000060

The overrides must build the same model and parallelism (train.parallel=fsdp for a sharded checkpoint).
"""

from __future__ import annotations

import sys

from mardini.cli import compose_config
from mardini.training.trainer import Trainer


def main(argv: list[str]) -> None:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if not argv:
        sys.exit(__doc__)
    checkpoint, overrides = argv[0], argv[1:]
    trainer = Trainer(compose_config([*overrides, f"train.resume={checkpoint}", "train.trackers=[]"]))
    path = trainer.save_checkpoint()
    trainer.accelerator.end_training()
    if trainer.accelerator.is_main_process:
        print(f"resaved {checkpoint} (step {trainer.step}) as {path} from {trainer.accelerator.num_processes} "
              f"process(es)")


if __name__ == "__main__":
    main(sys.argv[1:])
