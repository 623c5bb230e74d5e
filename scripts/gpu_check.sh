#!/usr/bin/env bash
# One pass of Eddy's GPU checks on a lent single-GPU machine, from the repository root:
#
#     bash scripts/gpu_check.sh
#
# Made for a machine with no package index: the Python packages Eddy and the benchmark peer need
# beyond what the machine has travel as wheels in .whl/ (ignored by git; carried with the tree), and
# are installed into /tmp/site first. Then:
#   a. environment report: torch, GPU, bf16, the carried packages and whether their needs are met;
#   b. the real user command, ./launch.sh, on one GPU with the default (full) preset, 300 steps;
#   c. fp16 with the GradScaler, 40 steps, then --resume to 60: the scaler state saved and restored;
#      bf16 and --mixed_precision no, 20 steps each: finite losses;
#   d. resume on the GPU: 40 steps straight against 20 + resume to 40, weights compared;
#   e. benchmarks/train_step.py (Eddy against lucidrains, training step and sampling, + compile);
#   f. FSDP2 through fsdp.yaml: train, resume sharded, continue unsharded;
#   g. DeepSpeed ZeRO-2 through deepspeed_zero2.yaml: train, resume, continue without DeepSpeed; then
#      the full preset's images/s under DeepSpeed against plain one-GPU training, one after the other.
# c, d and f run side by side (small models); a, b, e and g alone. Every step has its own timeout and the
# whole script keeps to GPU_CHECK_BUDGET seconds (default 400): a step that would not fit is
# skipped and says so. A failing step does not stop the others. Output: PASS/FAIL/SKIP lines, a
# summary at the end, and files in $OUT (else /tmp/gpu_check): gpu_check.log (this output),
# steps.log (every command's full output), summary.txt, bench.json, full_metrics.jsonl and
# full_samples.png (from b). At most 8 files: the device tool returns no more.
#
# Environment:
#   GPU_CHECK_CPU=1       dry run on a CPU (tiny sizes, no wheel install, no compile), to catch
#                         mistakes in this script before the one GPU run
#   GPU_CHECK_BUDGET      seconds for the whole script (default 400)
#   GPU_CHECK_ONLY        the steps to run, e.g. "a g" (default: all)
#   GPU_CHECK_PYTHON      the Python to use (default python3; with GPU_CHECK_CPU=1, .venv/bin/python)
#   GPU_CHECK_INSTALL=0|1 install the carried wheels (default 1, and 0 with GPU_CHECK_CPU=1)
#   EDDY_VENV             the environment launch.sh uses (default: the one GPU_CHECK_PYTHON lives in)

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
BUDGET=${GPU_CHECK_BUDGET:-400}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
SITE=/tmp/site
if [ "$CPU_MODE" = 1 ]; then
    PY=${GPU_CHECK_PYTHON:-$REPO/.venv/bin/python}
    INSTALL=${GPU_CHECK_INSTALL:-0}
else
    PY=${GPU_CHECK_PYTHON:-python3}
    INSTALL=${GPU_CHECK_INSTALL:-1}
fi

rm -rf "$WORK"
mkdir -p "$WORK/logs"
SUMMARY=$OUTDIR/summary.txt
: > "$SUMMARY"

export PYTHONUNBUFFERED=1 WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TQDM_MININTERVAL=15  # progress bars: a line every 15 s, not hundreds of carriage returns in the logs

# ----------------------------------------------------------------------------------------------
# Helpers

say() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }

wanted() {  # STEP: whether GPU_CHECK_ONLY (default all) includes it
    [ -z "${GPU_CHECK_ONLY:-}" ] || [[ " $GPU_CHECK_ONLY " == *" $1 "* ]]
}

result() {  # LABEL PASS|FAIL|SKIP|INFO DETAIL
    printf '%-9s %-4s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
}

limit() {  # WANTED_SECONDS -> seconds this step may take within the budget (0: does not fit)
    local want=$1 left=$((BUDGET - SECONDS - 10))
    ((left < want)) && want=$left
    ((want < 20)) && want=0
    echo "$want"
}

logged() {  # NAME SECONDS CMD...: run CMD under timeout, output to logs/NAME.log; returns CMD's status
    local name=$1 secs=$2
    shift 2
    (
        echo "\$ $*"
        timeout -k 15 "$secs" "$@"
        rc=$?
        echo "[exit status $rc]"
        exit "$rc"
    ) > "$WORK/logs/$name.log" 2>&1
}

show() {  # NAME [LINES]: the last lines of a step's log
    [ -f "$WORK/logs/$1.log" ] || return 0
    echo "    --- logs/$1.log (last ${2:-12} lines) ---"
    tail -n "${2:-12}" "$WORK/logs/$1.log" | tr '\r' '\n' | tail -n "${2:-12}" | sed 's/^/    | /'
}

train() {  # NAME SECONDS TRAIN-FLAGS...: python trainer/train.py on one device, no launcher
    local name=$1 secs=$2
    shift 2
    logged "$name" "$secs" "$PY" trainer/train.py "$@"
}

check() {  # SUBCOMMAND ARGS...: the Python checks below
    timeout 120 "$PY" "$WORK/check.py" "$@"
}

# The checks that read run folders and checkpoints, in one small Python program.
cat > "$WORK/check.py" <<'PYEOF'
"""Checks for scripts/gpu_check.sh: python check.py {env,metrics,ckpts,scaler,compare,bench} ARGS."""
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, ".")  # the repository root


def env(site=None):
    import importlib
    import importlib.metadata as md
    import torch
    ok = True
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"GPU: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, "
              f"capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, bf16 supported: "
              f"{torch.cuda.is_bf16_supported()}")
    for mod, dist in [("ema_pytorch", "ema-pytorch"), ("wandb", "wandb"), ("datasets", "datasets"),
                      ("denoising_diffusion_pytorch", "denoising-diffusion-pytorch"), ("accelerate", "accelerate"),
                      ("einops", "einops"), ("safetensors", "safetensors"), ("yaml", "pyyaml"),
                      ("pytest", "pytest"), ("tensorboard", "tensorboard"), ("deepspeed", "deepspeed")]:
        try:
            m = importlib.import_module(mod)
            print(f"import {mod}: ok, {md.version(dist)} from {Path(m.__file__).parent}")
        except Exception as e:
            ok = ok and mod in ("tensorboard", "deepspeed")  # optional: only their own runs need them
            print(f"import {mod}: FAILED: {type(e).__name__}: {e}")
    for dist in ["huggingface-hub", "pyarrow", "fsspec", "protobuf", "typing-extensions", "click", "pydantic",
                 "numpy", "pillow", "tqdm", "torchvision", "scipy", "packaging"]:
        try:
            print(f"  {dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            print(f"  {dist}: not installed")
    # Every need (Requires-Dist) of the carried packages, against what this interpreter finds first.
    try:
        from packaging.requirements import Requirement
        site = Path(site) if site else None
        dists = [d for d in md.distributions() if site and Path(str(d.locate_file(""))).resolve() == site.resolve()]
        unmet = []
        for d in dists:
            for line in d.requires or []:
                r = Requirement(line)
                if r.marker is not None and not r.marker.evaluate({"extra": ""}):
                    continue
                try:
                    have = md.version(r.name)
                except md.PackageNotFoundError:
                    unmet.append(f"{d.metadata['Name']} needs {r}: not installed")
                    continue
                if r.specifier and not r.specifier.contains(have, prereleases=True):
                    unmet.append(f"{d.metadata['Name']} needs {r}: found {have}")
        print(f"carried packages in {site}: {len(dists)}; needs not met: {len(unmet)}")
        for u in unmet:
            print(f"  WARNING: {u}")
    except Exception as e:
        print(f"requirement check not run: {type(e).__name__}: {e}")
    return 0 if ok else 1


def _metrics(run):
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics(run):
    """Final loss (must be finite) and samples/s of a run."""
    rows = _metrics(run)
    if not rows:
        print(f"no metrics in {run}")
        return 1
    last = rows[-1]
    rates = [r["samples_per_s"] for r in rows[1:]] or [rows[0]["samples_per_s"]]
    finite = math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])
    print(f"step {last['step']}: loss {last['loss']:.4f}, grad norm {last['grad_norm']:.3f}, "
          f"skipped non-finite {last['nonfinite_skipped']}; samples/s per log window (first left out): "
          f"median {statistics.median(rates):.0f}, max {max(rates):.0f}, last {rates[-1]:.0f}")
    return 0 if finite else 1


def ckpts(run, *steps):
    """The named steps are committed and verify against their manifests."""
    from trainer.checkpoint import list_checkpoints, step_dir_name, verify
    have = [p.name for p in list_checkpoints(Path(run))]
    print(f"checkpoints: {' '.join(have) or 'none'}")
    bad = 0
    for s in steps:
        folder = Path(run) / "checkpoints" / step_dir_name(int(s))
        try:
            verify(folder)
        except Exception as e:
            print(f"  {folder.name}: {e}")
            bad += 1
    return 1 if bad else 0


def scaler(run, before, after, resumed_steps):
    """The fp16 GradScaler state in optimizer.pt: present at every checkpoint, continued across the resume.

    GradScaler's growth tracker counts steps since the last overflow: if the resume restored the
    state, the tracker at `after` is the one at `before` plus the steps between (when the scale
    did not change), or the scale went down from the saved one (overflows after the resume). A
    fresh scaler would start again at 65536 with a tracker at 0."""
    import torch
    from trainer.checkpoint import list_checkpoints
    states = {}
    for folder in list_checkpoints(Path(run)):
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        sc = opt.get("scaler")
        step = int(folder.name.split("-")[1])
        states[step] = sc
        print(f"  {folder.name}: " + (f"scale {sc['scale']:g}, growth tracker {sc['_growth_tracker']}"
                                       if sc else "no scaler state"))
    b, a = states.get(int(before)), states.get(int(after))
    if not b or not a:
        print("scaler state missing")
        return 2
    n = int(resumed_steps)
    continued = (a["scale"] == b["scale"] and a["_growth_tracker"] == b["_growth_tracker"] + n) or a["scale"] < b["scale"]
    print(f"scale at step {before} (saved) {b['scale']:g} -> at step {after} (after resume) {a['scale']:g}; "
          f"growth tracker {b['_growth_tracker']} -> {a['_growth_tracker']}: "
          + ("continued from the saved state" if continued else "NOT continued (looks like a fresh scaler)"))
    return 0 if continued else 1


def compare(ckpt_a, ckpt_b):
    """Largest absolute difference of the model and EMA weights of two checkpoints."""
    from safetensors.torch import load_file
    worst = 0.0
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(str(Path(ckpt_a) / name)), load_file(str(Path(ckpt_b) / name))
        if a.keys() != b.keys():
            print(f"{name}: different keys")
            return 2
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        same = all(a[k].equal(b[k]) for k in a)
        print(f"  {name}: max abs diff {diff:.3g}" + (" (bit-exact)" if same else ""))
        worst = max(worst, diff)
    print(f"max abs diff {worst:.3g}")
    return 0


def bench(path):
    """The benchmark's JSON: which rows were measured, which failed."""
    res = json.loads(Path(path).read_text())
    ok = [r for r in res["train"] if "error" not in r]
    failed = [f"{r['model']} {r['mode']} {r['precision']}: {r['error']}" for r in res["train"] if "error" in r]
    failed += [f"sampling {r['model']}: {r['error']}" for r in res["sample"] if "error" in r]
    print(f"training rows measured: {len(ok)}; sampling rows: {len([r for r in res['sample'] if 'error' not in r])}")
    for f in failed:
        print(f"  failed: {f}")
    for n in res.get("notes", []):
        print(f"  note: {n}")
    eager = {r["model"] for r in ok if r["mode"] == "eager"}
    return 0 if "eddy" in eager else 1


if __name__ == "__main__":
    sys.exit(globals()[sys.argv[1]](*sys.argv[2:]))
PYEOF

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
        result 0.wheels PASS "installed into $SITE"
    else
        result 0.wheels FAIL "pip install of .whl/*.whl failed"
    fi
    export PYTHONPATH=$SITE:$REPO
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
# a. Environment

say "a. environment (launch.sh will use EDDY_VENV=$EDDY_VENV)"
t=$(limit 90)
if ! wanted a; then
    result a.env SKIP "not in GPU_CHECK_ONLY"
elif ((t == 0)); then
    result a.env SKIP "no time left in the budget"
elif logged a "$t" "$PY" "$WORK/check.py" env "$SITE"; then
    result a.env PASS "torch, GPU and every import ok"
else
    result a.env FAIL "an import failed or the report did not finish (see below)"
fi
show a 40
# launch.sh's setup() installs with pip (impossible here) unless this import line succeeds.
if timeout 120 "$EDDY_VENV/bin/python" -c "import accelerate, einops, ema_pytorch, wandb, datasets, safetensors, yaml, pytest, deepspeed, models, trainer" \
    > "$WORK/logs/a_launch_imports.log" 2>&1; then
    result a.launch PASS "launch.sh's import check passes: it will not try pip"
else
    result a.launch FAIL "launch.sh's import check fails: it would try pip ($(tail -n 1 "$WORK/logs/a_launch_imports.log"))"
fi

# ----------------------------------------------------------------------------------------------
# b. The real user command on one GPU: the default (full) preset, 300 steps, save and sample at 150.
# full preset: 35.7M parameters, batch 64, 250 DDIM steps for 64 samples at each save; on an H100
# about 20 s of steps, 2 x a few seconds of sampling, plus start-up: well inside the timeout.

if [ "$CPU_MODE" = 1 ]; then
    B_FLAGS=(--train_num_steps 20 --save_and_sample_every 10 --num_samples 4 --sampling_timesteps 5)
    B_STEPS=(10 20)
else
    B_FLAGS=(--train_num_steps 300 --save_and_sample_every 150)
    B_STEPS=(150 300)
fi
say "b. ./launch.sh ${B_FLAGS[*]} --results_path $WORK/r_full"
t=$(limit 240)
if ! wanted b; then
    result b.launch SKIP "not in GPU_CHECK_ONLY"
elif ((t)); then
    start=$SECONDS
    logged b "$t" ./launch.sh "${B_FLAGS[@]}" --results_path "$WORK/r_full"
    rc=$?
    wall=$((SECONDS - start))
    run=$(ls -d "$WORK"/r_full/*/ 2>/dev/null | head -n 1)
    run=${run%/}
    show b 14
    if [ -n "$run" ]; then
        echo "    run folder $run:"
        (cd "$run" && find . -maxdepth 2 -not -path './wandb/*/*' | sort | sed 's/^/      /')
        du -sh "$run" | sed 's/^/    /'
        grep -E '^(device|batch|model|data):' "$WORK/logs/b.log" | sed 's/^/    /'
        cp "$run/metrics.jsonl" "$OUTDIR/full_metrics.jsonl" 2>/dev/null
        last_png=$(ls "$run"/samples/step-*.png 2>/dev/null | tail -n 1)
        [ -n "$last_png" ] && cp "$last_png" "$OUTDIR/full_samples.png"
    fi
    problems=()
    ((rc == 0)) || problems+=("exit status $rc")
    [ -n "$run" ] || problems+=("no run folder")
    if [ -n "$run" ]; then
        m=$(check metrics "$run") || problems+=("loss not finite or no metrics")
        echo "    metrics: $m"
        check ckpts "$run" "${B_STEPS[@]}" > "$WORK/logs/b_ckpts.log" 2>&1 || problems+=("checkpoints ${B_STEPS[*]} missing or damaged")
        sed 's/^/    /' "$WORK/logs/b_ckpts.log"
        ls "$run"/samples/step-*.png > /dev/null 2>&1 || problems+=("no sample grids")
        grep -q '"identical": true' "$run/replicas.json" 2>/dev/null || problems+=("replicas.json missing or not identical")
        ls -d "$run"/wandb/offline-run-* > /dev/null 2>&1 || problems+=("no offline W&B run")
        if [ "$CPU_MODE" != 1 ]; then
            grep -q 'preset full' "$WORK/logs/b.log" || problems+=("not the full preset")
            grep -q 'mixed precision bf16' "$WORK/logs/b.log" || problems+=("not bf16")
        fi
    fi
    if ((${#problems[@]} == 0)); then
        result b.launch PASS "${wall} s wall, set-up included; ${m:-}"
    else
        result b.launch FAIL "${wall} s wall; $(IFS=';'; echo "${problems[*]}")"
    fi
else
    result b.launch SKIP "no time left in the budget"
fi

# ----------------------------------------------------------------------------------------------
# c and d side by side: small (tiny preset) runs, each with its own timeout.

SMALL=(--preset tiny --num_samples 4 --report_to none)
[ "$CPU_MODE" = 1 ] || SMALL+=(--num_workers 2)
# fp16 on a CPU runs without a GradScaler and is emulated (seconds a step): the dry run takes bf16.
C_MP=fp16
[ "$CPU_MODE" = 1 ] && C_MP=bf16

step_c() {
    local C=$WORK/c t
    # c1: fp16 with the GradScaler, 40 steps, a checkpoint every 20; then resume to 60.
    t=$(limit 90)
    if ((t == 0)); then
        result c.fp16 SKIP "no time left in the budget"
    elif train c_fp16 "$t" "${SMALL[@]}" --mixed_precision "$C_MP" --train_num_steps 40 \
        --save_and_sample_every 20 --results_path "$C" --run_name fp16 \
        && train c_fp16_resume "$t" --resume "$C/fp16" --train_num_steps 60 --results_path "$C" \
        && grep -q 'resuming .* from step-00000040 (step 40)' "$WORK/logs/c_fp16_resume.log" \
        && grep -q "mixed precision $C_MP" "$WORK/logs/c_fp16_resume.log"; then
        if m=$(check metrics "$C/fp16"); then result c.fp16 PASS "40 steps, resumed at 40 to 60 in $C_MP; $m"
        else result c.fp16 FAIL "non-finite loss or no metrics: $m"; fi
        check scaler "$C/fp16" 40 60 20 > "$WORK/logs/c_scaler.log" 2>&1
        case $? in
            0) result c.scaler PASS "$(tail -n 1 "$WORK/logs/c_scaler.log")" ;;
            2) if [ "$CPU_MODE" = 1 ]; then result c.scaler SKIP "no GradScaler in the CPU dry run (expected)"
               else result c.scaler FAIL "no scaler state in optimizer.pt"; fi ;;
            *) result c.scaler FAIL "$(tail -n 1 "$WORK/logs/c_scaler.log")" ;;
        esac
        sed 's/^/    /' "$WORK/logs/c_scaler.log"
    else
        result c.fp16 FAIL "fp16 run or its resume failed (logs/c_fp16*.log)"
        show c_fp16 8
        show c_fp16_resume 8
    fi
    # c2, c3: bf16 (with TensorBoard) and no mixed precision, 20 steps each.
    local mp report
    for mp in bf16 no; do
        report=none  # bf16 also exercises TensorBoard, where it is installed
        [ "$mp" = bf16 ] && "$PY" -c "import tensorboard" 2> /dev/null && report=tensorboard
        t=$(limit 60)
        if ((t == 0)); then
            result "c.$mp" SKIP "no time left in the budget"
        elif train "c_$mp" "$t" "${SMALL[@]}" --report_to "$report" --mixed_precision "$mp" \
            --train_num_steps 20 --save_and_sample_every 20 --results_path "$C" --run_name "$mp" \
            && grep -q "mixed precision $mp" "$WORK/logs/c_$mp.log"; then
            if m=$(check metrics "$C/$mp"); then result "c.$mp" PASS "20 steps, --report_to $report; $m"
            else result "c.$mp" FAIL "non-finite loss or no metrics: $m"; fi
        else
            result "c.$mp" FAIL "run failed or not in $mp (logs/c_$mp.log)"
            show "c_$mp" 8
        fi
    done
}

step_d() {
    local D=$WORK/d t
    t=$(limit 90)
    # A: 40 steps straight. B: 20 steps, then a second process resumes it to 40.
    if ((t == 0)); then
        result d.resume SKIP "no time left in the budget"
    elif train d_A "$t" "${SMALL[@]}" --train_num_steps 40 --save_and_sample_every 20 --results_path "$D" --run_name A \
        && train d_B "$t" "${SMALL[@]}" --train_num_steps 20 --save_and_sample_every 20 --results_path "$D" --run_name B \
        && train d_B_resume "$t" --resume "$D/B" --train_num_steps 40 --results_path "$D"; then
        echo "    step 20, both uninterrupted (any difference here is the kernels' own nondeterminism):"
        check compare "$D/A/checkpoints/step-00000020" "$D/B/checkpoints/step-00000020" | sed 's/^/    /'
        echo "    step 40, A straight against B resumed at 20:"
        out=$(check compare "$D/A/checkpoints/step-00000040" "$D/B/checkpoints/step-00000040")
        echo "$out" | sed 's/^/    /'
        diff=$(echo "$out" | awk '/^max abs diff/ {print $4}')
        if echo "$out" | grep -q 'model.safetensors: .*(bit-exact)' && echo "$out" | grep -q 'ema.safetensors: .*(bit-exact)'; then
            result d.resume PASS "resumed run equals the straight one bit for bit at step 40"
        elif [ "$CPU_MODE" != 1 ] && awk -v d="$diff" 'BEGIN {exit !(d < 1e-2)}'; then
            result d.resume PASS "max abs weight diff at step 40: $diff (not bit-exact; GPU kernels are nondeterministic)"
        else
            result d.resume FAIL "max abs weight diff at step 40: ${diff:-?}"
        fi
    else
        result d.resume FAIL "a run failed (logs/d_*.log)"
        for n in d_A d_B d_B_resume; do show "$n" 8; done
    fi
}

# ----------------------------------------------------------------------------------------------
# f (FSDP2, fsdp.yaml) and g (DeepSpeed ZeRO-2, deepspeed_zero2.yaml), each with one process (NCCL,
# a world of one): train 40 steps straight (A) and 20 + resume to 40 (B), compare; then one plain
# process continues A's checkpoint (a full state dict in every mode).

launched() {  # CONFIG: sets LAUNCH to the accelerate launch of trainer/train.py with accelerate_configs/CONFIG
    local procs=1
    [ "$CPU_MODE" = 1 ] && procs=2  # one CPU process would form no process group: nothing to shard
    LAUNCH=(env ACCELERATE_USE_CPU="$CPU_MODE" "$PY" -m accelerate.commands.launch --config_file
            "accelerate_configs/$1" --num_processes "$procs" --main_process_port 0 trainer/train.py)
}

launched_resume() {  # STEP CONFIG MARKER LABEL: the check above; returns non-zero when a run failed
    local x=$1 config=$2 marker=$3 label=$4 dir=$WORK/$1 t
    launched "$config"
    local launch=("${LAUNCH[@]}")
    t=$(limit 120)
    if ((t == 0)); then
        result "$x.$label" SKIP "no time left in the budget"
        return 1
    fi
    if logged "${x}_A" "$t" "${launch[@]}" "${SMALL[@]}" --train_num_steps 40 --save_and_sample_every 20 \
            --results_path "$dir" --run_name A \
        && logged "${x}_B" "$t" "${launch[@]}" "${SMALL[@]}" --train_num_steps 20 --save_and_sample_every 20 \
            --results_path "$dir" --run_name B \
        && logged "${x}_B_resume" "$t" "${launch[@]}" --resume "$dir/B" --train_num_steps 40 --results_path "$dir" \
        && grep -q "$marker" "$WORK/logs/${x}_A.log"; then
        grep -E '^device:' "$WORK/logs/${x}_A.log" | sed 's/^/    /'
        m=$(check metrics "$dir/A") || { result "$x.$label" FAIL "non-finite loss: $m"; return 1; }
        out=$(check compare "$dir/A/checkpoints/step-00000040" "$dir/B/checkpoints/step-00000040")
        echo "$out" | sed 's/^/    /'
        result "$x.$label" PASS "$config, 40 steps, resumed at 20: $(echo "$out" | tail -n 1); $m"
    else
        result "$x.$label" FAIL "a run with $config failed (logs/${x}_*.log)"
        for n in "${x}_A" "${x}_B" "${x}_B_resume"; do show "$n" 20; done
        return 1
    fi
    if train "${x}_A_plain" "$t" --resume "$dir/A" --train_num_steps 50 --results_path "$dir" \
        && grep -q 'one process' "$WORK/logs/${x}_A_plain.log"; then
        result "$x.plain" PASS "one plain process continued the $config checkpoint to step 50"
    else
        result "$x.plain" FAIL "continuing the $config checkpoint in one plain process failed (logs/${x}_A_plain.log)"
        show "${x}_A_plain" 12
    fi
}

step_f() {
    launched_resume f fsdp.yaml 'FSDP2 over' fsdp
}

say "c. fp16 + GradScaler + resume, bf16, no mixed precision; d. resume on the device; f. FSDP2 (side by side)"
steps=()
for x in c d f; do wanted "$x" && steps+=("$x"); done
if [ "$CPU_MODE" = 1 ]; then  # a few CPU cores: one after the other
    for x in "${steps[@]}"; do "step_$x" > "$WORK/$x.out" 2>&1; done
else  # small models: the GPU runs them together
    pids=()
    for x in "${steps[@]}"; do "step_$x" > "$WORK/$x.out" 2>&1 & pids+=($!); done
    ((${#pids[@]})) && wait "${pids[@]}"
fi
for x in "${steps[@]}"; do cat "$WORK/$x.out"; done

# ----------------------------------------------------------------------------------------------
# g. DeepSpeed ZeRO-2: the resume check (above), then the full preset, 150 steps without sampling,
# under DeepSpeed and under single_gpu.yaml, one after the other: median images/s of each.

step_g() {
    launched_resume g deepspeed_zero2.yaml 'DeepSpeed ZeRO-2' zero || return
    local G=$WORK/g t
    launched deepspeed_zero2.yaml
    local zero=("${LAUNCH[@]}")
    launched single_gpu.yaml
    local single=("${LAUNCH[@]}")
    local speed=(--train_num_steps 150 --save_and_sample_every 1000 --num_samples 0 --log_every 25 --report_to none)
    if [ "$CPU_MODE" = 1 ]; then
        speed=("${SMALL[@]}" --train_num_steps 20 --num_samples 0 --log_every 5)
        single=("$PY" trainer/train.py)
    fi
    t=$(limit 100)
    if ((t)) && logged g_speed_zero "$t" "${zero[@]}" "${speed[@]}" --results_path "$G" --run_name speed_zero \
        && logged g_speed_single "$t" "${single[@]}" "${speed[@]}" --results_path "$G" --run_name speed_single; then
        zs=$(check metrics "$G/speed_zero")
        ss=$(check metrics "$G/speed_single")
        echo "    DeepSpeed ZeRO-2: $zs"
        echo "    single_gpu.yaml:  $ss"
        result g.speed INFO "full preset images/s, DeepSpeed: ${zs##*samples/s}; plain: ${ss##*samples/s}"
    else
        result g.speed FAIL "a speed run failed or did not fit (logs/g_speed_*.log)"
        show g_speed_zero 12
        show g_speed_single 12
    fi
}

if wanted g; then
    say "g. DeepSpeed ZeRO-2: train, resume, continue without DeepSpeed; images/s against one plain GPU"
    step_g > "$WORK/g.out" 2>&1
    cat "$WORK/g.out"
fi

# ----------------------------------------------------------------------------------------------
# e. The benchmark: Eddy against lucidrains (training step, sampling), then torch.compile last. Its
# JSON is rewritten after every row, so a timeout during the compile keeps the eager numbers.

if [ "$CPU_MODE" = 1 ]; then
    E_FLAGS=(--device cpu --tiny --sample_steps 2)
else
    E_FLAGS=(--compile)
fi
say "e. python benchmarks/train_step.py ${E_FLAGS[*]} --json $OUTDIR/bench.json"
t=$(limit 240)
if ! wanted e; then
    result e.bench SKIP "not in GPU_CHECK_ONLY"
elif ((t)); then
    logged e "$t" "$PY" benchmarks/train_step.py "${E_FLAGS[@]}" --json "$OUTDIR/bench.json"
    rc=$?
    grep -E '^(note|training step|sampling|  [0-9]|  FAILED)' "$WORK/logs/e.log" | sed 's/^/    /'
    sed -n '/^| model (params)/,$p' "$WORK/logs/e.log"
    if [ -f "$OUTDIR/bench.json" ] && b=$(check bench "$OUTDIR/bench.json"); then
        echo "$b" | sed 's/^/    /'
        if ((rc == 0)); then result e.bench PASS "$(echo "$b" | head -n 1)"
        else result e.bench FAIL "exit status $rc (124: timed out, likely in the compile); eager rows kept: $(echo "$b" | head -n 1)"; fi
    else
        result e.bench FAIL "exit status $rc, no usable bench.json"
        show e 20
    fi
else
    result e.bench SKIP "no time left in the budget"
fi

# ----------------------------------------------------------------------------------------------
# Summary

for f in "$WORK"/logs/*.log; do
    echo "===== $(basename "$f")"
    cat "$f"
done | tr '\r' '\n' > "$OUTDIR/steps.log"
fails=$(grep -c ' FAIL ' "$SUMMARY")
passes=$(grep -c ' PASS ' "$SUMMARY")
echo
echo "===== gpu_check summary ($SECONDS s; $passes passed, $fails failed; logs: $OUTDIR)"
sort -s -k1.1,1.1 "$SUMMARY"
((fails == 0))
