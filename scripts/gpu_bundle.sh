#!/usr/bin/env bash
# Download, here (with network), what the GPU machine lacks to run scripts/gpu_check.sh offline (docs/GPU.md).
#
#   make gpu-bundle                      # for the GPU machine: CPython 3.12, x86-64 (the default)
#   make gpu-bundle GPU_PYVER=3.11 GPU_BUNDLE=/tmp/b311   # the same bundle for another Python (install checks)
#
# The machine has torch, numpy 2.x, cython, setuptools, sacrebleu, regex, sentencepiece, pytest; it lacks
# fairseq and fairseq's config stack. The bundle ($GPU_BUNDLE, default .gpu-bundle/, git-ignored) holds:
#   sdist/     fairseq-0.12.2.tar.gz: built on the machine, against its own numpy and Cython
#   wheels/    hydra-core, omegaconf, antlr4-python3-runtime (sdist-only on PyPI: a pure-Python wheel built
#              here), bitarray (binary wheel for cp$PYVER manylinux x86-64)
#   fallback/  fairseq 0.12.2 as a cp$PYVER wheel built here (Cython/C extensions only, numpy 2.x headers),
#              installed there only if building the sdist there fails; skipped when no python$PYVER exists
#   MANIFEST   "sha256  path" of every file above, checked by `scripts/gpu_check.sh --check-bundle`
# fairseq 0.12.2 imports nothing else at run time that the machine lacks (checked against the machine's
# package list, docs/GPU.md). Every download is --no-deps: the list above is the whole closure.
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=${GPU_PYVER:-3.12}
DEST=${GPU_BUNDLE:-.gpu-bundle}
PY=${PY:-.venv/bin/python}               # the python whose pip downloads (needs setuptools, numpy, cython)
BUILD_PY=${BUILD_PY:-}                    # python$PYVER that builds the fallback wheel (default: searched)
FAIRSEQ=fairseq==0.12.2
WHEELS=(hydra-core==1.3.2 omegaconf==2.3.0)
ANTLR=antlr4-python3-runtime==4.9.3       # omegaconf 2.3 / hydra 1.3 pin 4.9.*
BINARY=(bitarray==3.12.3)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

die() { echo "gpu_bundle: $*" >&2; exit 2; }
[[ $PYVER =~ ^3\.[0-9]+$ ]] || die "GPU_PYVER must look like 3.12, got '$PYVER'"
"$PY" -c "import setuptools, numpy, Cython" 2>/dev/null || die "$PY lacks setuptools/numpy/cython (run make setup)"

tmp=$(mktemp -d "${DEST%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/sdist" "$tmp/wheels" "$tmp/fallback"
pip=("$PY" -m pip -q --disable-pip-version-check)
platform_args=(--only-binary=:all: --python-version "$PYVER" --implementation cp)
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

# --no-build-isolation: pip runs the sdist's setup.py to read its metadata; in an isolated build env,
# --no-binary :all: would apply to the build requirements too (Cython, numpy compiled from source: tried,
# 8 minutes, then it failed).
echo "gpu_bundle: $FAIRSEQ sdist"
"${pip[@]}" download --no-deps --no-build-isolation --no-binary :all: "$FAIRSEQ" -d "$tmp/sdist"
echo "gpu_bundle: wheels for cp${PYVER/./}: ${WHEELS[*]} ${BINARY[*]}"
"${pip[@]}" download --no-deps "${platform_args[@]}" "${WHEELS[@]}" "${BINARY[@]}" -d "$tmp/wheels"
echo "gpu_bundle: $ANTLR (pure-Python wheel built here)"
"${pip[@]}" wheel --no-deps --no-build-isolation "$ANTLR" -w "$tmp/wheels"
ls "$tmp"/wheels/antlr4_python3_runtime-*-py3-none-any.whl >/dev/null || die "antlr4 wheel is not pure Python"

if [[ -z $BUILD_PY ]]; then
    for candidate in "python$PYVER" "$HOME"/.pyenv/versions/"$PYVER".*/bin/python"$PYVER"; do
        "$candidate" -V >/dev/null 2>&1 && BUILD_PY=$candidate  # the last that runs (pyenv: the newest)
    done
fi
if [[ -n $BUILD_PY ]] && "$BUILD_PY" -V >/dev/null 2>&1; then
    echo "gpu_bundle: fallback wheel of $FAIRSEQ built with $BUILD_PY ($("$BUILD_PY" -V 2>&1))"
    "$BUILD_PY" -m venv "$tmp/buildenv"
    "$tmp/buildenv/bin/python" -m pip -q --disable-pip-version-check install "numpy>=2,<3" cython setuptools wheel
    # no torch in this venv: fairseq's setup.py then builds only its Cython/C extensions (data_utils_fast,
    # token_block_utils_fast, libbleu), the ones fairseq-train/generate need; the torch C++ ones are for
    # NAT and BASE-layer models.
    "$tmp/buildenv/bin/python" -m pip -q --disable-pip-version-check wheel --no-deps --no-build-isolation \
        "$tmp"/sdist/fairseq-0.12.2.tar.gz -w "$tmp/fallback"
    rm -rf "$tmp/buildenv"
else
    echo "gpu_bundle: WARNING no python$PYVER here (set BUILD_PY): no fallback wheel; the GPU machine must build" \
         "fairseq from the sdist" >&2
fi

(cd "$tmp" && find sdist wheels fallback -type f | LC_ALL=C sort | xargs sha256sum) > "$tmp/MANIFEST"
echo "python $PYVER" >> "$tmp/MANIFEST"
rm -rf "$DEST"
mkdir -p "$DEST"
mv "$tmp"/sdist "$tmp"/wheels "$tmp"/fallback "$tmp"/MANIFEST "$DEST"/
echo "gpu_bundle: $DEST ($(du -sh "$DEST" | cut -f1)):"
sed 's/^[0-9a-f]*  /  /' "$DEST/MANIFEST"
