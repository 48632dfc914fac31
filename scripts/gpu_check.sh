#!/usr/bin/env bash
# The one-shot GPU check of kd-plugin (docs/GPU.md): run in the repository root of a GPU machine that has
# python3 with torch (CUDA), numpy, cython, setuptools and pytest but no network and no fairseq.
#
#   scripts/gpu_check.sh                 # everything below, within GPU_CHECK_BUDGET (520 s); results under $OUT
#   scripts/gpu_check.sh --check-bundle  # only: is .gpu-bundle/ (make gpu-bundle) complete and intact?
#
# Steps (each timed; a failing step does not stop the later ones; exit status 1 if any failed):
#   install  a venv at $GPU_ENV that sees the machine's packages (a .pth line) and gets, without network,
#            the bundle's wheels, fairseq 0.12.2 built from the sdist against the machine's numpy/Cython
#            (falling back to the bundle's prebuilt wheel if that build fails), kd-plugin, and the compat
#            step (scripts/fairseq_compat.py). Console scripts (fairseq-train, kd-dump-teacher, ...) land
#            next to the venv's python, where tests/helpers.py and the benchmark look for them.
#   pytest   tests/test_gpu.py -m gpu: every criterion with --fp16 and --bf16, cache vs online on GPU,
#            an overflowing fp16 teacher, stock fairseq-generate.
#   bench    benchmarks/bench_kd.py at a GPU size (teacher 6+6 layers d=512, student 3+3, --fp16): words/s
#            and peak GPU memory as ratios to plain label_smoothed_cross_entropy.
# Outputs ($OUT, default ./gpu-out; at most 8 files): summary.md, install.log, pytest.log, junit.xml,
# bench.log, bench.md, bench.json.
# Settings (environment): GPU_BUNDLE (.gpu-bundle), GPU_ENV (/tmp/kd-gpu-env), GPU_CHECK_BUDGET (seconds
# for all steps, 520), GPU_BENCH_ARGS (extra bench_kd.py flags, appended), PYTHON (python3: the machine's).
set -uo pipefail
SELF=$(realpath "$0")
cd "$(dirname "$SELF")/.."
REPO=$PWD
BUNDLE=${GPU_BUNDLE:-.gpu-bundle}
ENV_DIR=${GPU_ENV:-/tmp/kd-gpu-env}
OUT=${OUT:-$REPO/gpu-out}
PY0=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-520}
VPY=$ENV_DIR/bin/python
export OUT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

die() { echo "gpu_check: $*" >&2; exit 2; }

# ---------------------------------------------------------------------------------------------- bundle

check_bundle() {
    # every file of the MANIFEST present with its sha256, and each needed distribution among them
    [[ -f $BUNDLE/MANIFEST ]] || die "$BUNDLE/MANIFEST not found: run 'make gpu-bundle' (with network) first"
    local bad
    bad=$(cd "$BUNDLE" && grep -v '^python ' MANIFEST | sha256sum --quiet -c 2>&1 | head -1)
    [[ -z $bad ]] || die "$BUNDLE is damaged: $bad (rerun 'make gpu-bundle')"
    local pyver tag pattern
    pyver=$(sed -n 's/^python //p' "$BUNDLE/MANIFEST")
    tag=cp${pyver/./}
    for pattern in sdist/fairseq-0.12.2.tar.gz wheels/hydra_core-1.3.2-py3-none-any.whl \
                   wheels/omegaconf-2.3.0-py3-none-any.whl wheels/antlr4_python3_runtime-4.9.*-py3-none-any.whl \
                   "wheels/bitarray-*-$tag-$tag-*manylinux*x86_64*.whl"; do
        grep -q "  ${pattern//\*/.*}\$" "$BUNDLE/MANIFEST" || die "$BUNDLE lacks ${pattern} (rerun 'make gpu-bundle')"
    done
    if [[ ${1:-} == --for-python ]]; then
        local have
        have=$("$2" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "cannot run $2"
        [[ $have == "$pyver" ]] || die "$BUNDLE is for Python $pyver, $2 is $have: make gpu-bundle GPU_PYVER=$have"
    fi
    echo "gpu_check: bundle $BUNDLE complete (Python $pyver): $(grep -c '  ' "$BUNDLE/MANIFEST") files"
}

# ---------------------------------------------------------------------------------------------- install

make_venv() {  # what `python -m venv --without-pip` does, for a python whose venv module is missing
    local base ver
    base=$("$PY0" -c 'import sys; print(sys._base_executable)') || return 1
    ver=$("$PY0" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || return 1
    mkdir -p "$ENV_DIR/bin" "$ENV_DIR/lib/python$ver/site-packages" && ln -sf "$base" "$VPY" &&
        printf 'home = %s\ninclude-system-site-packages = false\nversion = %s\n' "$(dirname "$base")" "$ver" \
            > "$ENV_DIR/pyvenv.cfg"
}

install() {
    check_bundle --for-python "$PY0" || return 1
    rm -rf "$ENV_DIR"
    "$PY0" -m venv --without-pip "$ENV_DIR" || make_venv || return 1
    # the machine's packages (torch, numpy, pip, ...) behind the venv's own; addsitedir also runs their .pth
    local purelib
    purelib=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
    "$PY0" -c 'import site; print("import site; " + "; ".join(map("site.addsitedir(%r)".__mod__, site.getsitepackages())))' \
        > "$purelib/_kd_machine_site.pth" || return 1
    local pip=("$VPY" -m pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check)
    "${pip[@]}" "$BUNDLE"/wheels/*.whl || return 1
    # fairseq from the sdist, against this machine's numpy and Cython. Its setup.py also builds torch C++
    # extensions (libbase, libnat: BASE layers and NAT models only; CUDA ones when CUDA_HOME is set): torch
    # is hidden from the build so it compiles only the Cython/C extensions fairseq-train needs, as
    # `make setup`'s isolated build does (GPU_CHECK_TORCH_EXT=1 builds them all).
    local hide
    hide=$(mktemp -d)
    mkdir "$hide/torch"
    echo 'raise ImportError("hidden by scripts/gpu_check.sh while building fairseq")' > "$hide/torch/__init__.py"
    [[ ${GPU_CHECK_TORCH_EXT:-0} == 1 ]] && hide=""
    if env -u CUDA_HOME PYTHONPATH="$hide" MAX_JOBS=8 "${pip[@]}" --no-build-isolation \
            "$BUNDLE"/sdist/fairseq-0.12.2.tar.gz; then
        echo "gpu_check: fairseq built from the sdist on this machine"
    elif compgen -G "$BUNDLE/fallback/fairseq-*.whl" >/dev/null; then
        echo "gpu_check: FALLBACK: the sdist did not build (above); installing make gpu-bundle's prebuilt wheel"
        "${pip[@]}" "$BUNDLE"/fallback/fairseq-*.whl || return 1
    else
        return 1
    fi
    "${pip[@]}" --no-build-isolation -e . || return 1  # kd-plugin (editable: tests use this tree)
    "$VPY" scripts/fairseq_compat.py || return 1
    (cd / && "$VPY" -c '
import sys, fairseq, kd_plugin, torch, fairseq.data.data_utils_fast
assert fairseq.__file__.startswith(sys.prefix), fairseq.__file__
print("gpu_check: fairseq %s from %s; kd_plugin from %s; torch %s, CUDA %s, device %s" % (
    fairseq.__version__, fairseq.__file__, kd_plugin.__file__, torch.__version__, torch.version.cuda,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"))') || return 1
    for tool in fairseq-train fairseq-generate fairseq-preprocess kd-dump-teacher kd-distill-corpus; do
        [[ -x $ENV_DIR/bin/$tool ]] || { echo "gpu_check: $tool missing from $ENV_DIR/bin"; return 1; }
    done
}

# ---------------------------------------------------------------------------------------------- bench

bench() {
    # bench_kd.py has no flags for model size or precision: set the sizes on its parsed arguments and add
    # --fp16 to every fairseq-train it runs. Peak GPU memory: fairseq's gb_free (total - max allocated of the
    # update, 0.1 GiB steps) over the measured train_inner lines.
    local work=/tmp/kd-bench
    rm -rf "$work"
    # shellcheck disable=SC2086
    PYTHONPATH="benchmarks:examples${PYTHONPATH:+:$PYTHONPATH}" \
        "$VPY" - --work "$work" --synthetic --rounds 1 --warmup 10 --updates 20 --log-interval 10 \
        --max-tokens 4096 --train-sentences 8000 --valid-sentences 100 --threads 1 \
        --configs plain,token-online-full,token-cache,sentence,hybrid-online-full \
        --output "$OUT/bench.md" ${GPU_BENCH_ARGS:-} <<'EOF'
import json, os, re, sys
import bench_kd  # PYTHONPATH: benchmarks/ and examples/ (bench_kd's library, kdexp)
import bench_runs  # every fairseq-train command of the benchmark comes from its train_cmd
import torch

SIZES = {"teacher_layers": 6, "teacher_dim": 512, "teacher_ffn": 2048, "teacher_heads": 8,
         "student_layers": 3, "student_dim": 512, "student_ffn": 2048, "student_heads": 8}


def parse_args(argv=None, _parse=bench_kd.parse_args):
    a = _parse(argv)
    vars(a).update(SIZES)
    return a


def train_cmd(*args, _cmd=bench_runs.train_cmd, **kw):
    return _cmd(*args, **kw) + ["--fp16"]


bench_kd.parse_args, bench_runs.train_cmd = parse_args, train_cmd
sys.argv[0] = "benchmarks/bench_kd.py (scripts/gpu_check.sh: sizes %s, --fp16)" % SIZES
bench_kd.main(sys.argv[1:])

a = bench_kd.parse_args(sys.argv[1:])
results = json.load(open(os.path.join(a.work, "results.json")))
text = "\n(no CUDA: no GPU memory)\n"
if torch.cuda.is_available():
    total = torch.cuda.get_device_properties(0).total_memory / 1024 ** 3
    peak = {}
    for name in a.configs:
        log = open(os.path.join(a.work, "logs", "run-r0-%s.log" % name)).read()
        free = [float(m.group(2)) for m in re.finditer(r"num_updates=(\d+).*?gb_free=([\d.]+)", log)
                if int(m.group(1)) > a.warmup]
        peak[name] = total - min(free) if free else float("nan")
    rows = ["| configuration | peak GPU memory GiB | ratio to plain |", "|---|---:|---:|"]
    rows += ["| %s | %.1f | %.2f |" % (bench_kd.CONFIGS[n][0], peak[n], peak[n] / peak["plain"]) for n in a.configs]
    text = "\n".join(["", "### GPU memory (fairseq's gb_free: %.1f GiB total minus the peak allocated in the "
                      "last update of each measured train_inner interval, 0.1 GiB steps)" % total, "", *rows, "",
                      "- GPU: %s, torch %s, CUDA %s" % (torch.cuda.get_device_name(0), torch.__version__,
                                                       torch.version.cuda), ""])
    results["gpu_peak_gib"] = peak
with open(a.output, "a") as f:
    f.write(text)
json.dump(results, open(os.path.join(os.environ["OUT"], "bench.json"), "w"), indent=1)
print(text)
EOF
}

# ---------------------------------------------------------------------------------------------- steps

case ${1:-} in
    --check-bundle) check_bundle; exit $? ;;
    --install) install; exit $? ;;
    --bench) bench; exit $? ;;
    "") ;;
    *) die "unknown argument '$1' (use --check-bundle, or no argument for the whole check)" ;;
esac

mkdir -p "$OUT"
export OUT
START=$(date +%s)
ROWS=() FAILED=0
step() {  # step NAME LOG MAX_SECONDS COMMAND...: run with a time limit (never past the budget), log, record
    local name=$1 log=$2 cap=$3 left rc t0
    shift 3
    left=$((BUDGET - ($(date +%s) - START)))
    ((cap > left)) && cap=$left
    ((cap < 30)) && cap=30
    echo "== $name (at most ${cap}s): $*" | tee -a "$log"
    t0=$(date +%s.%N)
    timeout -k 10 "$cap" "$@" >>"$log" 2>&1
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
    if ((rc == 0)); then
        ROWS+=("| $name | ok | $secs |")
    else
        FAILED=1
        ROWS+=("| $name | FAILED (exit $rc$( ((rc == 124)) && echo ": time limit")) | $secs |")
        echo "-- $name failed (exit $rc); last lines of $log:"
        tail -n 25 "$log"
    fi
    echo "== $name: exit $rc in ${secs}s"
}

{
    echo "# GPU check"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
    echo "- CPU: $(nproc) x $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1); $("$PY0" -V 2>&1)"
} > "$OUT/summary.md"

step install "$OUT/install.log" 240 bash "$SELF" --install
step pytest "$OUT/pytest.log" 240 "$VPY" -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider \
    --junitxml "$OUT/junit.xml"
step bench "$OUT/bench.log" 600 bash "$SELF" --bench

{
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---:|"
    printf '%s\n' "${ROWS[@]}"
    echo
    echo "pytest: $(grep -E '^=+ .*(passed|failed|skipped|error).* =+$' "$OUT/pytest.log" | tail -1 | tr -d '=')"
    [[ -f $OUT/bench.md ]] && sed -n '/^| configuration/,/^$/p' "$OUT/bench.md"
} >> "$OUT/summary.md"
echo
cat "$OUT/summary.md"
exit $FAILED
