#!/usr/bin/env bash
# One GPU lease, prepared: the GPU benchmark suite (with the TRL peer), then the SmolLM2 HH-RLHF recipe.
#
# The device tool carries at most 64 MiB per call and the SmolLM2 GGUF is 98 MB, so the lease is
# back-to-back calls. A carried folder did not survive into the next call on 2026-12-04, but /tmp
# did, so the call that carries GGUF part 1 keeps it there:
#
#   call 1  carry [.whl]   bash experiments/gpu_lease.sh suite    # the GPU suite + TRL peer (6 to 8 min)
#   call 2  carry [.gpu1]  bash experiments/gpu_lease.sh keep     # GGUF part 1 + data -> /tmp/keep1
#   call 3  carry [.gpu2]  bash experiments/gpu_lease.sh recipe   # GGUF part 2; join; the recipe
#
# Name the kind nvidia-h200 in call 1: issue 18's targets are an H200's, and a call that names no
# kind now starts an H100 (80 GB at 3.35 TB/s against 141 GB at 4.8 TB/s). gpu_check holds the SFT
# step (no remat, 8 x 2048) and then PPO's 1.1B policy and value with their Adam moments; it lets
# JAX take 90% of the GPU and logs each part's device memory, but on an H100 the TRL peer's 60%
# (48 GB) may be too little for our side of the iteration. An H100 run still answers the
# MFU and HBM-fraction rows (each against that card's own peak and bandwidth).
#
# The suite's TRL peer (ppo_step_gpu) needs TRL 1.9.0, which the GPU machine lacks: its wheels and
# the ones it needs there (55 MB, pyarrow most of it) go in .whl, installed to /tmp/site-packages
# for the machine's python; TRL_PYTHON=/path/to/python instead names an interpreter that has TRL. With
# neither, the suite skips the peer and says why. Without the peer: SUITE_ONLY=gpu_check.
# Recipe variations: RECIPE_NAME=NAME RECIPE_SET="name=NAME key=value ..." (extra --set overrides);
# RECIPE_TIMEOUT (seconds, default 480) stops the recipe in time for its outputs to be copied.
# Prepare the carried folders here, before the lease (all three are in .gitignore, so only the
# call that names one carries it; each stays under the tool's 64 MiB):
#   bash experiments/gpu_lease.sh prepare
# It fetches the GGUF (`rlhf-jax fetch smollm2`, or $RLHF_JAX_SMOLLM2_GGUF where it is set) and
# splits it in two (.gpu1/gguf.part00, .gpu2/gguf.part01), copies the recipe's two data files from
# ../shared into .gpu1/data, and downloads TRL's wheels for the GPU machine's Python 3.12 into .whl
# (WHL_PYTHON_VERSION overrides 3.12).
# `--dry-run` runs the same two steps on CPU with micro settings (the suite's dry run and the
# recipe's smoke settings), to check the wiring before spending device time.
# Results go to $OUT (set by the device tool), else ./gpu_out.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: gpu_lease.sh prepare|suite|keep|recipe [--dry-run]}
dry=${2:-}
OUT=${OUT:-$PWD/gpu_out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if [ "$what" = prepare ]; then  # on this machine, not the GPU one: no machine file
  set -e
  gguf=$($py -c "from rlhf_jax.assets import fetch_smollm2, find_smollm2; print(find_smollm2() or fetch_smollm2())")
  rm -rf .whl .gpu1 .gpu2 && mkdir -p .whl .gpu1/data .gpu2
  split -n 2 -d "$gguf" .gpu2/part && mv .gpu2/part00 .gpu1/gguf.part00 && mv .gpu2/part01 .gpu2/gguf.part01
  cp ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz ../shared/data/tinyshakespeare/input.txt .gpu1/data/
  $py -m pip download -q --no-deps --only-binary=:all: --python-version "${WHL_PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    trl==1.9.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1
  du -sh .whl .gpu1 .gpu2
  for d in .whl .gpu1 .gpu2; do  # the device tool carries at most 64 MiB per call
    [ "$(du -sm "$d" | cut -f1)" -le 64 ] || { echo "$d is over 64 MiB" >&2; exit 1; }
  done
  exit 0
fi

mkdir -p "$OUT"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $py -c "import jax; print('jax', jax.__version__, jax.devices())"; } > "$OUT/$what-machine.txt" 2>&1
cat "$OUT/$what-machine.txt"

case "$what" in
keep)  # the first call's carried part 1 and data, kept outside the tree for the second call
  rm -rf /tmp/keep1 && cp -r .gpu1 /tmp/keep1 && ls -la /tmp/keep1
  ;;
suite)
  if [ -z "${TRL_PYTHON:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then  # the carried TRL wheels, for this python
    # A folder named site-packages: dill (datasets' hasher) pickles modules from other folders by
    # value, and fails on pyarrow's types there ("Can't pickle <class 'MonthDayNano'>").
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages \
      .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site-packages && TRL_PYTHON=$(command -v "$py")
  fi
  only=(); [ -n "${SUITE_ONLY:-}" ] && only=(--only $SUITE_ONLY)
  suite=(--suite gpu --trl-python "${TRL_PYTHON:-none}" "${only[@]}" --out "$OUT/suite")
  if [ "$dry" = --dry-run ]; then
    $py -m experiments.benchmarks "${suite[@]}" --dry-run 2>&1 | tee "$OUT/suite.log"
  else
    # the suite stops itself at 520 s and still writes its summary; timeout is the backstop
    timeout 560 $py -m experiments.benchmarks "${suite[@]}" --time-limit-s 520 2>&1 | tee "$OUT/suite.log"
  fi
  ;;
recipe)
  gguf=.gpu/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ "$dry" = --dry-run ]; then
    gguf=${RLHF_JAX_SMOLLM2_GGUF:?set RLHF_JAX_SMOLLM2_GGUF for the dry run}
    extra=(base_layers=2 max_records=400 max_prompt_len=64 max_response_len=12 n_eval_prompts=8
           eval_batch_size=8 eval_samples=2 "best_of_n=[1,2]" n_examples=4 ptx_seq_len=32 ptx_heldout_chars=300
           sft.batch_size=4 sft.loop.total_steps=2 rm.batch_size=4 rm.loop.total_steps=2 rm.eval_batches=2
           ppo.batch_size=8 ppo.loop.total_steps=2 ppo.loop.eval_every=1 ppo.eval_samples=8 ppo.ptx_batch_size=2
           sft.optimizer.warmup_steps=0 rm.optimizer.warmup_steps=0 ppo.optimizer.warmup_steps=0)
  else
    [ -d .gpu1 ] || ln -sfn /tmp/keep1 .gpu1  # part 1 kept outside the tree by the first call
    mkdir -p .gpu && cat .gpu1/gguf.part00 .gpu2/gguf.part01 > "$gguf" || exit 1
    extra=()
  fi
  runs=${RUNS_DIR:-/tmp/gpu_runs}
  sets=(runs_dir="$runs" gguf="$gguf" hh_data=.gpu1/data/harmless-base-test.jsonl.gz
        ptx_text=.gpu1/data/input.txt compile_cache="$runs/.jax_cache" "${extra[@]}" ${RECIPE_SET:-})
  args=(); for s in "${sets[@]}"; do args+=(--set "$s"); done
  timeout "${RECIPE_TIMEOUT:-480}" $py -m rlhf_jax.cli pipeline --config experiments/configs/smollm2_hh.json "${args[@]}" \
    2>&1 | tee "$OUT/recipe.log"
  rc=${PIPESTATUS[0]}
  # The small outputs only (no checkpoints or model weights).
  run="$runs/${RECIPE_NAME:-smollm2_hh}"
  mkdir -p "$OUT/recipe"
  (cd "$run" 2>/dev/null && find . -maxdepth 3 \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' \) \
     -not -path '*/checkpoints/*' -not -path '*/model/*' -size -5M -print0 | xargs -0 -r cp --parents -t "$OUT/recipe")
  echo "recipe exit code $rc"
  exit "$rc"
  ;;
*) echo "unknown step $what" >&2; exit 2 ;;
esac
