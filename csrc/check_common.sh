# Shared prologue of the build checks (csrc/cmake_check.sh, csrc/cuda/check.sh), sourced
# from the repository root after `set -euo pipefail`: the Python to use, the cache folder
# of passing runs, and skip_without.
PYTHON=${PYTHON:-python3}
cache=${LBK_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/lbkernels}

# skip_without COMMAND NAME: exits 0 with "NAME not found: skipped" where COMMAND is
# missing (a check of what a machine cannot build passes there).
skip_without() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "$2 not found: skipped"
    exit 0
  fi
}
