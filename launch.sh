#!/usr/bin/env bash
# Eddy's one entry point. Sets up what is missing, then:
#   ./launch.sh [train flags...]     train (accelerate launch with the config that fits this machine)
#   ./launch.sh test [pytest args]   run the test suite
#   ./launch.sh sample [flags...]    sample from a checkpoint (trainer/sample.py)
#   ./launch.sh evaluate [flags...]  roll a forecaster forward against the solver (trainer/evaluate.py)
#   ./launch.sh export [flags...]    a checkpoint as a model folder, optionally to the Hub (trainer/export.py)
#   ./launch.sh control [flags...]   generate controls, re-simulate and score them (trainer/control.py)
# Environment: EDDY_VENV (default .venv), EDDY_TORCH (pip spec for torch, default torch==2.13.0,
# used only when torch is not installed yet), ACCELERATE_CONFIG (overrides the chosen config).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV="${EDDY_VENV:-.venv}"
PY="$VENV/bin/python"

# What each command imports: training, sampling and evaluation need Eddy's own dependencies; the tests
# also need the dev extra (pytest, TensorBoard, DeepSpeed).
RUNTIME="accelerate, einops, ema_pytorch, wandb, datasets, safetensors, yaml, matplotlib, torchmetrics, models, trainer"
DEV="$RUNTIME, pytest, tensorboard, deepspeed"

setup() {  # [dev]: install what the command needs, once
    local imports="$RUNTIME" spec="."
    if [ "${1:-}" = dev ]; then imports="$DEV" spec=".[dev]"; fi
    if [ ! -x "$PY" ]; then
        echo "launch.sh: creating the virtual environment $VENV" >&2
        python3 -m venv "$VENV"
    fi
    if ! "$PY" -c "import torch" 2>/dev/null; then
        echo "launch.sh: installing ${EDDY_TORCH:-torch==2.13.0}" >&2
        "$PY" -m pip install -q "${EDDY_TORCH:-torch==2.13.0}"
    fi
    if ! "$PY" -c "import $imports" 2>/dev/null; then
        echo "launch.sh: installing Eddy and its dependencies ($spec)" >&2
        "$PY" -m pip install -q -e "$spec"
    fi
}

pick_config() {
    if [ -n "${ACCELERATE_CONFIG:-}" ]; then echo "$ACCELERATE_CONFIG"; return; fi
    local gpus
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    if [ "$gpus" -eq 0 ]; then echo "accelerate_configs/cpu.yaml --num_cpu_threads_per_process $(nproc)"
    elif [ "$gpus" -eq 1 ]; then echo accelerate_configs/single_gpu.yaml
    else echo "accelerate_configs/multi_gpu.yaml --num_processes $gpus"
    fi
}

if [ "${1:-}" = test ]; then setup dev; else setup; fi
case "${1:-}" in
    test)
        shift
        export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
        exec "$PY" -m pytest "$@"
        ;;
    sample)
        shift
        exec "$PY" trainer/sample.py "$@"
        ;;
    evaluate|export|control)
        command=$1
        shift
        exec "$PY" "trainer/$command.py" "$@"
        ;;
    *)
        config=$(pick_config)
        case "$config" in  # where DeepSpeed is installed, it would warn that it found no GPU
            accelerate_configs/cpu*) export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}" ;;
        esac
        echo "launch.sh: accelerate launch --config_file $config trainer/train.py $*" >&2
        # Preemption: pass SIGTERM/SIGUSR1 to the training processes, which save and exit 0; the
        # launcher then ends normally. (Signalled itself, the launcher would exit non-zero.)
        forward() { pkill "-$1" -P "$launcher" 2>/dev/null || true; }
        trap 'forward TERM' TERM
        trap 'forward USR1' USR1
        # shellcheck disable=SC2086
        "$VENV/bin/accelerate" launch --config_file $config trainer/train.py "$@" &
        launcher=$!
        status=0
        while true; do
            wait "$launcher" && status=0 || status=$?
            kill -0 "$launcher" 2>/dev/null || break  # wait returned because of a trapped signal
        done
        exit "$status"
        ;;
esac
