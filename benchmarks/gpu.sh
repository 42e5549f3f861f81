#!/usr/bin/env bash
# The GPU paths on a CUDA machine (docs/benchmarks.md, "GPU"), one after another so that no two share
# the GPU: the GPU tests (each learner trains on CUDA and exports for a CPU robot; Ray Train puts its
# worker on the GPU; world-model rollouts on CUDA match the CPU's), then the learners and the world
# model with --device auto beside their baselines measured in the same run on the same machine:
# SB3 on the same device, MuJoCo on the machine's cores, the world model trained on those cores.
# Each step's whole output goes to OUT_DIR/<step>.log; the JSON lines are printed.
#
# Run: bash benchmarks/gpu.sh [PYTHON] [OUT_DIR]    (defaults: .venv/bin/python, runs/benchmarks/gpu)
#      STEPS="tests sac_update" bash benchmarks/gpu.sh ...   runs only the steps named (tests, sac_update, train_vs_sb3,
#      worldmodel_cuda, worldmodel_cpu, train_sac_float32, train_sac_bfloat16, demo)
set -u
PY=${1:-.venv/bin/python}
OUT=${2:-runs/benchmarks/gpu}
mkdir -p "$OUT"
export MUJOCO_GL=${MUJOCO_GL:-egl} PYTHONUNBUFFERED=1  # MUJOCO_GL=disable where there is no EGL

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "# $name: exit $?, $((SECONDS - start)) s"
    grep '^{' "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import sys, torch; print("# python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
step tests 140 "$PY" -m pytest -o addopts="" -p no:cacheprovider -q -rs -m requires_gpu tests/test_gpu.py tests/test_worldmodel_rollout.py
[[ -f "$OUT/tests.log" ]] && tail -3 "$OUT/tests.log"
step sac_update 150 "$PY" benchmarks/sac_update_speed.py --device auto
step train_vs_sb3 110 "$PY" benchmarks/train_vs_sb3.py --algorithms sac --device auto
step worldmodel_cuda 200 "$PY" benchmarks/worldmodel_bench.py --device auto --calibration-robots 0 --starts 10000 100000
step worldmodel_cpu 90 "$PY" benchmarks/worldmodel_bench.py --device cpu --robots half_cheetah --calibration-robots 0
for precision in float32 bfloat16; do  # flywheel-train on device auto (the learner on the GPU), each SAC precision
    step "train_sac_$precision" 150 "$PY" -m fleet.apps.train policy=sac policy.trainer.total_env_steps=4000 policy.algorithm.learning_starts=500 \
        "policy.algorithm.precision=$precision" train.eval_episodes=4 wandb.mode=disabled "run_dir=$OUT/train_sac_$precision"
    tail -4 "$OUT/train_sac_$precision.log" 2>/dev/null
done
# make demo's job with its defaults (device auto: the learner, its world model and the fleet's world model on CUDA)
step demo 420 "$PY" -m fleet.apps.flywheel wandb.mode=disabled "run_dir=$OUT/demo_run"
tail -14 "$OUT/demo.log" 2>/dev/null
