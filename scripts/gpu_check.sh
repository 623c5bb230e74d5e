#!/usr/bin/env bash
# Eddy's GPU checks on a lent single-GPU machine, from the repository root:
#
#     bash scripts/gpu_check.sh [pytest args, e.g. -k fsdp]
#
# 0. The packages the machine lacks travel as wheels in .whl/ (ignored by git; carried with the tree) and
#    are installed into /tmp/site; launch.sh gets a stand-in environment if the Python has no bin/accelerate.
#    The benchmark's peers (step 2) need, besides the tests' wheels, one wheel each of (pure Python, one version
#    of each in .whl/: two stop the install):
#      denoising-diffusion-pytorch, ema-pytorch, pytorch-fid   lucidrains' Unet, GaussianDiffusion and Trainer
#      video-diffusion-pytorch, einops-exts, rotary-embedding-torch   its Unet3D
#      diffusers, importlib-metadata==8.7.0 (needs only zipp)  UNet2DModel and its schedulers
#    fetched here with
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_17_x86_64 -d .whl denoising-diffusion-pytorch ema-pytorch pytorch-fid \
#          video-diffusion-pytorch einops-exts rotary-embedding-torch diffusers importlib-metadata==8.7.0
#    The machine's own torch, torchvision (lucidrains' Trainer and pytorch-fid import it; never carry another, it
#    must match torch), accelerate, einops, scipy, pillow, tqdm, huggingface-hub (diffusers wants >= 1.32),
#    safetensors, regex, requests and filelock serve them. A peer that cannot be imported is skipped with a note.
# 1. The GPU tier, python -m pytest -m gpu tests/gpu (tests/gpu/conftest.py prints the environment report).
# 2. benchmarks/train_step.py --suite: every configuration of BENCHMARKS.md for Eddy and the peers, most important
#    rows first, within what is left of the budget (at most GPU_CHECK_BENCH_SECONDS).
# Output in $OUT (else /tmp/gpu_check): gpu_check.log (everything printed), tests.xml (JUnit), bench.json,
# full_metrics.jsonl and full_samples.png (from the ./launch.sh test). A failing step does not stop the next.
#
# Environment:
#   GPU_CHECK_CPU=1        dry run on the CPU: the tier with EDDY_GPU_TESTS_ON_CPU=1 (tiny sizes), no wheel
#                          install, the benchmark suite's CPU mode (--device cpu --tiny)
#   GPU_CHECK_BENCH_SECONDS  the benchmark suite's --budget_s at most (default 280; with GPU_CHECK_CPU=1, 60)
#   GPU_CHECK_BUDGET       seconds for the whole script (default 540); the tests get at most GPU_CHECK_TEST_SECONDS
#                          (default 420) of it
#   GPU_CHECK_PYTHON       the Python (default python3; with GPU_CHECK_CPU=1, .venv/bin/python)
#   GPU_CHECK_INSTALL=0|1  install the carried wheels (default 1, and 0 with GPU_CHECK_CPU=1)
#   EDDY_VENV              the environment launch.sh uses (default: the one GPU_CHECK_PYTHON lives in)

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD
OUTDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$OUTDIR"
if [ -z "${GPU_CHECK_TEED:-}" ]; then  # everything printed also goes to gpu_check.log
    GPU_CHECK_TEED=1 bash "$REPO/scripts/gpu_check.sh" "$@" 2>&1 | tee "$OUTDIR/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi

CPU_MODE=${GPU_CHECK_CPU:-0}
BUDGET=${GPU_CHECK_BUDGET:-540}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-420}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
SITE=/tmp/site
if [ "$CPU_MODE" = 1 ]; then
    PY=${GPU_CHECK_PYTHON:-$REPO/.venv/bin/python}
    INSTALL=${GPU_CHECK_INSTALL:-0}
    export EDDY_GPU_TESTS_ON_CPU=1
else
    PY=${GPU_CHECK_PYTHON:-python3}
    INSTALL=${GPU_CHECK_INSTALL:-1}
fi
rm -rf "$WORK"
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TQDM_MININTERVAL=15  # progress bars: a line every 15 s, not hundreds of carriage returns in the log

say() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }
SUMMARY=()
result() { SUMMARY+=("$(printf '%-8s %-4s %s' "$1" "$2" "$3")"); say "$1 $2 $3"; }
left() { echo $((BUDGET - SECONDS - 10)); }  # seconds left in the budget

# ----------------------------------------------------------------------------------------------
# 0. The carried wheels: one pip call (two calls into one --target would let the second replace the
# first's shared folders, such as google/). The wheels in .whl/fallback/ (protobuf, typing-extensions,
# click, fsspec) go in only where this machine's own version does not meet a carried package's needs.

say "gpu_check: $(date -u +%FT%TZ), repository $REPO, budget ${BUDGET}s, output in $OUTDIR$([ "$CPU_MODE" = 1 ] && echo ', CPU DRY RUN')"
if [ "$INSTALL" = 1 ]; then
    fallback=$("$PY" - <<'PYEOF'
import glob, re, zipfile
import importlib.metadata as md
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name as cn
except ImportError:  # cannot judge: take every fallback wheel
    print(" ".join(sorted(glob.glob(".whl/fallback/*.whl"))))
    raise SystemExit
def metadata(w):
    z = zipfile.ZipFile(w)
    return z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
needs = {}
for w in glob.glob(".whl/*.whl"):
    for line in metadata(w).splitlines():
        if line.startswith("Requires-Dist:"):
            r = Requirement(line.split(":", 1)[1].strip())
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                needs.setdefault(cn(r.name), []).append(r.specifier)
take = []
for w in sorted(glob.glob(".whl/fallback/*.whl")):
    name = cn(re.search(r"^Name: (.+)$", metadata(w), re.M).group(1).strip())
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or not all(s.contains(have, prereleases=True) for s in needs.get(name, [])):
        take.append(w)
print(" ".join(take))
PYEOF
    )
    say "0. installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE${fallback:+, with the fallbacks $fallback}"
    rm -rf "$SITE"
    # shellcheck disable=SC2086
    if timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl $fallback; then
        result wheels PASS "installed into $SITE"
    else
        result wheels FAIL "pip install of .whl/*.whl failed"
    fi
    export PYTHONPATH=$SITE:$REPO
    # Needs that the carried packages and this machine's own leave unmet (informational).
    "$PY" -m pip check 2>&1 | head -n 20 | sed 's/^/    pip check: /'
else
    say "0. wheel install skipped (GPU_CHECK_INSTALL=$INSTALL)"
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

# The environment launch.sh uses: the one the Python above lives in, when it has bin/python and
# bin/accelerate; else a stand-in whose bin/ holds wrappers that run that Python (wrappers, not
# links: a link to a venv's python would lose the venv) and its accelerate CLI module.
if [ -z "${EDDY_VENV:-}" ]; then
    EDDY_VENV=$("$PY" -c 'import sys; print(sys.prefix)')
    if [ ! -x "$EDDY_VENV/bin/python" ] || [ ! -x "$EDDY_VENV/bin/accelerate" ]; then
        real_py=$(command -v "$PY")
        EDDY_VENV=$WORK/venv
        mkdir -p "$EDDY_VENV/bin"
        printf '#!/usr/bin/env bash\nexec "%s" "$@"\n' "$real_py" > "$EDDY_VENV/bin/python"
        printf '#!/usr/bin/env bash\nexec "%s" -m accelerate.commands.accelerate_cli "$@"\n' "$real_py" \
            > "$EDDY_VENV/bin/accelerate"
        chmod +x "$EDDY_VENV/bin/python" "$EDDY_VENV/bin/accelerate"
        say "EDDY_VENV: $EDDY_VENV (wrappers around $real_py, which has no bin/accelerate beside it)"
    fi
fi
export EDDY_VENV

# ----------------------------------------------------------------------------------------------
# 1. The GPU tier. -v, not -q: pytest prints the report header (the environment report of
# tests/gpu/conftest.py) only at normal verbosity or above. The ./launch.sh test's metrics and last
# sample grid are copied into $OUTDIR.

t=$(left)
((t > TEST_SECONDS)) && t=$TEST_SECONDS
say "1. python -m pytest -m gpu tests/gpu $* (at most ${t}s)"
timeout -k 15 "$t" "$PY" -m pytest -m gpu tests/gpu -v -p no:cacheprovider --basetemp "$WORK/pytest" \
    --junitxml "$OUTDIR/tests.xml" "$@"
rc=$?
case $rc in
    0) result tests PASS "every GPU test passed or was skipped (see above)" ;;
    124 | 137) result tests FAIL "timed out after ${t}s" ;;
    *) result tests FAIL "pytest exit status $rc (see above, and tests.xml)" ;;
esac
run=$(ls -d "$WORK"/pytest/*/launch_results/*/ 2> /dev/null | head -n 1)
if [ -n "$run" ]; then
    cp "$run/metrics.jsonl" "$OUTDIR/full_metrics.jsonl" 2> /dev/null
    last_png=$(ls "$run"/samples/step-*.png 2> /dev/null | tail -n 1)
    [ -n "$last_png" ] && cp "$last_png" "$OUTDIR/full_samples.png"
fi

# ----------------------------------------------------------------------------------------------
# 2. The benchmark suite: Eddy against lucidrains, video-diffusion-pytorch and diffusers (training steps eager,
# compiled and captured, the Trainer end to end, sampling). It keeps to its --budget_s by itself (skipping the
# rows that would overrun, stopping one still running at the end) and prints its tables last; its JSON is
# rewritten after every row, so even the outer timeout keeps what was measured.

if [ "$CPU_MODE" = 1 ]; then
    BENCH_FLAGS=(--device cpu --tiny --suite)
    BENCH_MAX=${GPU_CHECK_BENCH_SECONDS:-60}
else
    BENCH_FLAGS=(--suite)
    BENCH_MAX=${GPU_CHECK_BENCH_SECONDS:-280}
fi
t=$(left)
if ((t < 60)); then
    result bench SKIP "${t}s left in the budget"
else
    b=$((t - 30))
    ((b > BENCH_MAX)) && b=$BENCH_MAX
    say "2. python benchmarks/train_step.py ${BENCH_FLAGS[*]} --budget_s $b --json $OUTDIR/bench.json (at most ${t}s)"
    timeout -k 15 "$t" "$PY" benchmarks/train_step.py "${BENCH_FLAGS[@]}" --budget_s "$b" --json "$OUTDIR/bench.json"
    rc=$?
    if ((rc == 0)); then result bench PASS "rows in bench.json (skipped rows: see its notes)"
    elif [ -f "$OUTDIR/bench.json" ]; then result bench FAIL "exit status $rc (124: timed out); the rows measured are in bench.json"
    else result bench FAIL "exit status $rc, no bench.json"; fi
fi

# ----------------------------------------------------------------------------------------------
echo
echo "===== gpu_check summary (${SECONDS}s; output in $OUTDIR)"
printf '%s\n' "${SUMMARY[@]}"
! printf '%s\n' "${SUMMARY[@]}" | grep -q ' FAIL '
