#!/usr/bin/env bash
# Every quality figure and grid in the README, from the committed checkpoints, in one command:
#   scripts/quality_report.sh            # all of it (hours on a 2-core CPU: see README section 5)
#   scripts/quality_report.sh sweeps     # only the guidance and spacing sweeps (N = 500 and 2,000)
#   scripts/quality_report.sh nfe        # only the samplers' quality against steps (resumable)
#   scripts/quality_report.sh levers     # only the levers no request parameter offers (N = 500; 40 min of 2 EPYC cores)
# Stop training first: a run beside it halves every figure's speed and skews the timings.
# With a GPU but without the data or the FID network there (the served 10k rows, the diffusion 10k rows drawn in
# batches of 500 and the committed nfe and snr sweeps were drawn so): run the sampling commands there with --sample-only --device cuda, copy runs/eval_progress/ back, and
# run the same commands here without --sample-only; they measure those samples and record the machine that drew them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EVAL="$PY -m training.evaluate"
part=${1:-all}
# checkpoint_at COMMIT MODEL: the model's checkpoint as committed then, in a folder removed on exit
OLD=$(mktemp -d)
trap 'rm -rf "$OLD"' EXIT
checkpoint_at() {
  mkdir "$OLD/$2-$1"
  for f in model.safetensors config.json; do git show "$1:checkpoints/$2/$f" > "$OLD/$2-$1/$f"; done
  echo "$OLD/$2-$1"
}
# the diffusion weights of step 39441 (served until the third GPU stretch): the sweeps, the nfe curves and the older
# 10k rows were measured on them
D39441=$(checkpoint_at e89db50 diffusion)
# the step-48463 weights (served now): the rows named after them stay on them when newer weights are served
D48463=$(checkpoint_at 64d5cb2 diffusion)

if [[ $part == all || $part == references ]]; then
  $PY -m training.fid_references --n 1000 2000 --test-sizes 1000 2500 5000 10000   # ~1.5 h here
  # MNIST, against the GAN's 1,000-digit reference (evaluate.py --model gan --reference-size 1000)
  $PY -m training.fid_references --data ../shared/data/mnist.npz --reference-size 1000 --n 1000 --test-sizes 1000 \
    --out docs/quality/fid_references_mnist.json
fi
if [[ $part == all || $part == sweeps ]]; then
  # diffusion guidance settings at N = 500 (KID is unbiased at this N; FID only compares at equal N): DDIM 20 steps,
  # then DPM++2M 20 steps, all with the timestep spacing served until the linspace rows below chose another
  # (trailing) and without the served default's guidance interval. The committed DDIM rows date from the step-19000
  # weights.
  sweep() { $EVAL --model diffusion --checkpoint "$D39441" --n-samples 500 --params "$2" --out "docs/quality/diffusion-sweep-$1.json"; }
  sweep guidance-1 '{"timestep_spacing": "trailing", "guidance_t_max": 999, "sampler": "ddim", "steps": 20, "guidance_scale": 1}'
  sweep guidance-2 '{"timestep_spacing": "trailing", "guidance_t_max": 999, "sampler": "ddim", "steps": 20, "guidance_scale": 2}'
  sweep guidance-4-interval '{"timestep_spacing": "trailing", "sampler": "ddim", "steps": 20, "guidance_scale": 4, "guidance_t_min": 167, "guidance_t_max": 882}'
  sweep guidance-4-rescale '{"timestep_spacing": "trailing", "guidance_t_max": 999, "sampler": "ddim", "steps": 20, "guidance_scale": 4, "guidance_rescale": 0.7}'
  sweep dpm-guidance-3.5 '{"timestep_spacing": "trailing", "guidance_t_max": 999, "guidance_scale": 3.5}'
  sweep dpm-guidance-4 '{"timestep_spacing": "trailing", "guidance_t_max": 999, "guidance_scale": 4}'   # the default before (10k row below)
  sweep dpm-guidance-3 '{"timestep_spacing": "trailing", "guidance_t_max": 999, "guidance_scale": 3}'
  sweep dpm-guidance-2 '{"timestep_spacing": "trailing", "guidance_t_max": 999, "guidance_scale": 2}'
  # guidance over an interval of noise levels and guidance rescale, on the served sampler and weights
  sweep dpm-guidance-4-interval '{"timestep_spacing": "trailing", "guidance_scale": 4, "guidance_t_min": 167, "guidance_t_max": 882}'
  sweep dpm-guidance-5-interval '{"timestep_spacing": "trailing", "guidance_scale": 5, "guidance_t_min": 167, "guidance_t_max": 882}'
  sweep dpm-guidance-6-interval '{"timestep_spacing": "trailing", "guidance_scale": 6, "guidance_t_min": 167, "guidance_t_max": 882}'
  sweep dpm-guidance-4.5-off-above-882 '{"timestep_spacing": "trailing", "guidance_scale": 4.5, "guidance_t_max": 882}'
  sweep dpm-guidance-5-off-above-882 '{"timestep_spacing": "trailing", "guidance_scale": 5, "guidance_t_max": 882}'
  sweep dpm-guidance-6-off-above-882 '{"timestep_spacing": "trailing", "guidance_scale": 6, "guidance_t_max": 882}'
  sweep dpm-guidance-5-off-above-800 '{"timestep_spacing": "trailing", "guidance_scale": 5, "guidance_t_max": 800}'
  sweep dpm-guidance-5-off-above-940 '{"timestep_spacing": "trailing", "guidance_scale": 5, "guidance_t_max": 940}'
  sweep dpm-guidance-5-rescale '{"timestep_spacing": "trailing", "guidance_t_max": 999, "guidance_scale": 5, "guidance_rescale": 0.7}'
  sweep dpm-guidance-6-rescale '{"timestep_spacing": "trailing", "guidance_t_max": 999, "guidance_scale": 6, "guidance_rescale": 0.7}'
  # linspace timestep spacing (the last step at t = 0, not t = 49; generators/schedulers.py), same sampler and weights
  sweep dpm-linspace-guidance-4.5-off-above-882 '{"timestep_spacing": "linspace", "guidance_scale": 4.5, "guidance_t_max": 882}'  # served
  sweep dpm-linspace-guidance-4 '{"timestep_spacing": "linspace", "guidance_t_max": 999, "guidance_scale": 4}'
  sweep dpm-linspace-guidance-3.5 '{"timestep_spacing": "linspace", "guidance_t_max": 999, "guidance_scale": 3.5}'
  # the served default re-checked on the step-48463 weights at N = 2,000 (same seed): against a lower scale, and
  # against guidance over fewer steps (off above t = 750, and at the last step, t = 0); neither adopted
  check() { $EVAL --model diffusion --checkpoint "$D48463" --n-samples 2000 --params "$2" --out "docs/quality/diffusion-step-48463-$1.json"; }
  check at-2000 '{"guidance_scale": 4.5}'
  check guidance-3.5-at-2000 '{"guidance_scale": 3.5}'
  check guidance-off-above-750-at-2000 '{"guidance_scale": 4.5, "guidance_t_min": 1, "guidance_t_max": 750}'
  # the served setting without the guided evaluation of the last step (t = 0): 36 evaluations instead of 37
  check guidance-from-t-1-at-2000 '{"guidance_scale": 4.5, "guidance_t_min": 1}'
  # unconditional samples (class_label "none"), against the random-class default's guided ones
  check unconditional-at-2000 '{"class_label": "none"}'
  # 30 steps instead of 20 (56 evaluations per guided image instead of 37), at the served guidance and at 3.5
  check 30-steps-at-2000 '{"steps": 30}'
  check 30-steps-guidance-3.5-at-2000 '{"steps": 30, "guidance_scale": 3.5}'
  # guidance without its update along the conditional image (guidance_parallel 0, "APG"), at 4.5 and at 6
  check parallel-0-at-2000 '{"guidance_parallel": 0}'
  check parallel-0-guidance-6-at-2000 '{"guidance_parallel": 0, "guidance_scale": 6}'
  # the EBM at its served default but with linspace levels (not adopted: README section 5), and unconditional
  $EVAL --model ebm --n-samples 500 --params '{"timestep_spacing": "linspace"}' --out docs/quality/ebm-sweep-linspace-guidance-4.json
  $EVAL --model ebm --n-samples 2000 --params '{"class_label": "none"}' --out docs/quality/ebm-unconditional-at-2000.json
  # the EBM's served default at that N, for its precision and recall beside the diffusion model's at 2,000
  $EVAL --model ebm --n-samples 2000 --out docs/quality/ebm-at-2000.json
fi
if [[ $part == all || $part == levers ]]; then
  # levers that no request parameter offers (training/sampling_levers.py), on the served step-48463 weights at N = 500
  # beside the served default at that N; none adopted (README section 5). Autoguidance by earlier committed weights
  # of the same network (steps 19000, 11814, 3572), over every noise level; predicted noise scaled by 1/1.015,
  # 1/1.005, 1/0.995 and 1/0.99; the weights averaged with those of step 39441 (the end of the stretch before, also annealed).
  LEVER="$PY -m training.sampling_levers"
  at500() { echo "--model diffusion --checkpoint $D48463 --n-samples 500 --out docs/quality/diffusion-step-48463-$1-at-500.json"; }
  $EVAL $(at500 served)
  $LEVER --autoguide-with "$(checkpoint_at 2bb697b diffusion)" $(at500 autoguided-by-step-19000) --params '{"guidance_scale": 2, "guidance_t_max": 999}'
  $LEVER --autoguide-with "$(checkpoint_at 0138002 diffusion)" $(at500 autoguided-by-step-11814) --params '{"guidance_scale": 3, "guidance_t_max": 999}'
  $LEVER --autoguide-with "$(checkpoint_at 05451c8 diffusion)" $(at500 autoguided-by-step-3572) --params '{"guidance_scale": 2.5, "guidance_t_max": 999}'
  for factor in 1.015 1.005 0.995 0.99; do $LEVER --eps-scale $factor $(at500 eps-scale-$factor); done
  $LEVER --average-with "$D39441" --average-weight 0.5 $(at500 averaged-0.5-with-step-39441)
  $LEVER --average-with "$D39441" --average-weight 0.75 $(at500 averaged-0.75-with-step-39441)
fi
if [[ $part == all || $part == nfe ]]; then
  # KID/FID at 5-100 steps per sampler, +-guidance, and 1000-step DDPM; the EBM: 5-40 levels x 0-2 corrector
  # steps, +-guidance, and 100 levels x 2. N = 500 each; the batch size names the samples (keep it to reproduce
  # the committed rows' directories; at 50 images per class both sizes draw the same batches, so the same images)
  # (all with trailing timestep spacing, the only one then)
  T='{"timestep_spacing": "trailing"}'
  D='{"timestep_spacing": "trailing", "guidance_t_max": 999}'
  $PY scripts/nfe_curve.py --checkpoint "$D39441" --params "$D" --n-samples 500 --batch-size 500 --guidance 3.5 1   # the default guidance then, and none
  $PY scripts/nfe_curve.py --checkpoint "$D39441" --params "$D" --n-samples 500 --guidance 4                         # the served guidance, added later
  $PY scripts/nfe_curve.py --params "$T" --model ebm --n-samples 500 --batch-size 500 --guidance 2 1   # guidance 2: the default then
  # the EBM corrector's step size (snr) by guidance scale at 20 levels x 1 corrector step (which chose the served
  # guidance 4, snr 0.25); the guidance 4 and 5 rows were drawn with training/evaluate.py's batch size, 50
  $PY scripts/nfe_curve.py --params "$T" --model ebm --n-samples 500 --series snr=0.1,0.16,0.25,0.35 --x levels=20 \
    --guidance 2 3 --reference '' --out docs/quality/ebm_snr_guidance.json
  $PY scripts/nfe_curve.py --params "$T" --model ebm --n-samples 500 --batch-size 50 --series snr=0.16,0.25 --x levels=20 \
    --guidance 4 5 --reference '' --out docs/quality/ebm_snr_guidance.json
fi
if [[ $part == all || $part == served ]]; then
  # DPM++2M 20 steps (chosen from the nfe part), linspace spacing, guidance 4.5 off above t = 882 (from the sweeps),
  # first drawn on a GPU in batches of 500 (the batch size names them), since redrawn here with the same images:
  # about 37 min of sampling and 20 min of Inception features on 2 idle Xeon cores (a 2-core AMD EPYC took about
  # 3.5 min of Inception per 1,000 images; the first run also computes the reference's, then cached)
  $EVAL --model diffusion --n-samples 10000 --batch-size 500
  # the same samples (same seed and batch size) against 10,000 test images, which the model never trained on
  $EVAL --model diffusion --n-samples 10000 --batch-size 500 --reference-split test \
    --out docs/quality/diffusion-vs-test-images-at-10000.json
  # guidance 5 instead of 4.5 (not adopted: README section 5), also drawn on a GPU in batches of 500
  $EVAL --model diffusion --checkpoint "$D48463" --n-samples 10000 --batch-size 500 --params '{"guidance_scale": 5}' \
    --out docs/quality/diffusion-step-48463-guidance-5-at-10000.json
  # 16 steps instead of 20 (30 evaluations per guided image instead of 37; not adopted), drawn the same way
  $EVAL --model diffusion --checkpoint "$D48463" --n-samples 10000 --batch-size 500 --params '{"steps": 16}' \
    --out docs/quality/diffusion-step-48463-16-steps-at-10000.json
  # the served setting on the step-39441 weights
  $EVAL --model diffusion --checkpoint "$D39441" --n-samples 10000 --out docs/quality/diffusion-step-39441-at-10000.json
  # on the step-39441 weights, the defaults before: trailing spacing with guidance 4, and before it guidance 3.5
  # (drawn on a GPU in batches of 500), and guidance 5 off above t = 882, drawn on a GPU in batches of 500
  $EVAL --model diffusion --checkpoint "$D39441" --n-samples 10000 --params '{"timestep_spacing": "trailing", "guidance_scale": 4, "guidance_t_max": 999}' \
    --out docs/quality/diffusion-trailing-guidance-4-at-10000.json
  $EVAL --model diffusion --checkpoint "$D39441" --n-samples 10000 --batch-size 500 \
    --params '{"timestep_spacing": "trailing", "guidance_scale": 3.5, "guidance_t_max": 999}' \
    --out docs/quality/diffusion-guidance-3.5-at-10000.json
  $EVAL --model diffusion --checkpoint "$D39441" --n-samples 10000 --batch-size 500 \
    --params '{"timestep_spacing": "trailing", "guidance_scale": 5, "guidance_t_max": 882}' \
    --out docs/quality/diffusion-guidance-5-off-above-882-at-10000.json
  # the served setting at 16 steps instead of 20 (30 evaluations per guided image instead of 37), step-39441 weights
  $EVAL --model diffusion --checkpoint "$D39441" --n-samples 10000 --params '{"steps": 16}' --out docs/quality/diffusion-16-steps-at-10000.json
  # the EBM's served default (guidance 4, snr 0.25, chosen from ebm_snr_guidance.json) and the one before it
  # (guidance 2, snr 0.16); about 1 s per guided sample on 2 cores: ~3 h each here (both were drawn on a GPU in
  # batches of 500, as was diffusion's guidance-3.5 row; the batch size names them)
  $EVAL --model ebm --n-samples 10000 --batch-size 500
  $EVAL --model ebm --n-samples 10000 --batch-size 500 --params '{"guidance_scale": 2, "snr": 0.16}' \
    --out docs/quality/ebm-guidance-2-at-10000.json
  $EVAL --model ebm --n-samples 1000 --params '{"guidance_scale": 2, "snr": 0.16}' \
    --out docs/quality/ebm-guidance-2-at-1000.json   # ~20 min
  $EVAL --model gan --n-samples 1000 --reference-size 1000  # MNIST: FID-M is the figure the GAN targets
  # every digit at 1,000 samples, without Inception (a minute): the per-digit accuracy target
  $EVAL --model gan --n-samples 10000 --reference-size 1000 --no-fid --out docs/quality/gan-class-accuracy-at-10000.json
  # the GAN as served before its BatchNorm and mode-seeking fixes (step 6384), from the git history
  $EVAL --model gan --checkpoint "$(checkpoint_at c1794d0524d03e4d34f397fe6d0287af3609b57a gan)" --n-samples 1000 \
    --reference-size 1000 --out docs/quality/gan-before-fixes-step-6384.json
  $PY -m training.ebm_ood --n 500
fi
if [[ $part == all || $part == grids ]]; then
  $PY scripts/sample_report.py
fi
$PY scripts/readme_tables.py
