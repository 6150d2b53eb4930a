#!/usr/bin/env bash
# The GPU learning figures (BENCHMARKS.md, "Learning"): the small model trained on synthetic clips (GPU 0) and on
# the photo-motion corpus (GPU 1) at the same time, then the learning benchmark on each export.
#
#   python scripts/make_photo_corpus.py data/photo_motion        # once (CPU, a few minutes)
#   OUT=results bash benchmarks/learning_gpu.sh
#
# STEPS overrides train.max_steps of both presets (default: the presets' own); PHOTO (default data/photo_motion)
# is the corpus folder; EXTRA adds overrides to both runs (e.g. EXTRA="model.motion.residual=false"); RUN names
# the run folders (default learning); with one GPU the two runs share it. The benchmark scores 32 synthetic clips
# and all 64 held-out photographed clips (the periodic evaluation's 16 are easier: blend 23.00 dB vs 21.87).
# Writes under $OUT: learning_*.json (the benchmark), eval_*.jsonl (sampled / posterior-mean / blend PSNR against
# steps), log_*.txt and runs.tar.gz.
set -uo pipefail
OUT=${OUT:-benchmark_results}
PHOTO=${PHOTO:-data/photo_motion}
STEPS_ARG=${STEPS:+train.max_steps=$STEPS}
EXTRA=${EXTRA:-}
RUN=${RUN:-learning}
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline
common="train.trackers=[tensorboard] train.progress=false $STEPS_ARG $EXTRA"

CUDA_VISIBLE_DEVICES=0 python -m mardini.train experiment=small_synthetic run_name=$RUN $common \
    > "$OUT/log_small_synthetic.txt" 2>&1 &
syn=$!
CUDA_VISIBLE_DEVICES=$((GPUS > 1 ? 1 : 0)) python -m mardini.train experiment=small_photo_motion run_name=$RUN \
    data.video.root=$PHOTO/train.csv data.video.val_root=$PHOTO/val.csv $common \
    > "$OUT/log_small_photo_motion.txt" 2>&1 &
photo=$!
wait $syn; echo "small_synthetic training exit status $?"
wait $photo; echo "small_photo_motion training exit status $?"

CUDA_VISIBLE_DEVICES=0 python benchmarks/demo_quality.py outputs/small_synthetic/$RUN/export --device cuda \
    --clips 32 --step-sweep 4 10 --json "$OUT/learning_small_synthetic.json" &
CUDA_VISIBLE_DEVICES=$((GPUS > 1 ? 1 : 0)) python benchmarks/demo_quality.py outputs/small_photo_motion/$RUN/export \
    --device cuda --clips 64 --step-sweep 4 10 --json "$OUT/learning_small_photo_motion.json" \
    > "$OUT/benchmark_photo.txt" 2>&1 &
wait
cat "$OUT/benchmark_photo.txt"
for run in small_synthetic small_photo_motion; do
  cp "outputs/$run/$RUN/eval.jsonl" "$OUT/eval_$run.jsonl" 2>/dev/null
done
tar czf "$OUT/runs.tar.gz" outputs/small_synthetic/$RUN/{metrics.jsonl,config.yaml,samples,export/config.json} \
    outputs/small_photo_motion/$RUN/{metrics.jsonl,config.yaml,samples,export/config.json} 2>/dev/null
python - "$OUT" <<'PY'
import json, sys
for run in ("small_synthetic", "small_photo_motion"):
    try:
        rows = [json.loads(l) for l in open(f"{sys.argv[1]}/eval_{run}.jsonl")]
    except OSError:
        continue
    print(run, "step: sampled / posterior mean / blend (dB)")
    for r in rows:
        print(f"  {r['step']:5d}: {r['val/interpolation_psnr']:.2f} / {r['val/interpolation_posterior_mean_psnr']:.2f}"
              f" / {r['val/interpolation_blend_psnr']:.2f}")
PY
