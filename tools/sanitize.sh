#!/usr/bin/env bash
# Run bncore's tests under AddressSanitizer (+ UndefinedBehaviorSanitizer) and report any
# error whose stack is in bncore's code. Builds a separate copy of the tree in a temporary
# folder; the normal in-place build is left alone.
#
#   tools/sanitize.sh            the whole test suite except the slow leak windows
#   tools/sanitize.sh --quick    core tests only (a few minutes)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/bncore-asan.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r "$top/setup.py" "$top/pyproject.toml" "$top/README.md" "$top/bncore" "$top/tests" "$work/"
cd "$work"
rm -f bncore/*.so bncore/*.c
export CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"
export LDFLAGS="-fsanitize=address,undefined"
python3 setup.py build_ext --inplace -j 2 >build.log 2>&1 || { tail -30 build.log; exit 1; }
for so in bncore/*.so; do   # a run on uninstrumented code would prove nothing
    nm -D "$so" | grep -q __asan_report || { echo "FAIL: $so is not instrumented"; exit 1; }
done
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
tests=(tests)
deselect=(--deselect tests/test_reliability.py::test_no_leak_over_100k_calls
          --deselect tests/test_reliability.py::test_peak_memory_beyond_outputs_is_small
          --deselect tests/test_reliability.py::test_kernels_release_the_gil)
if [ "${1:-}" = "--quick" ]; then
    tests=(tests/test_core_batchnorm.py tests/test_core_moments.py tests/test_core_family.py
           tests/test_bad_input.py)
fi
# Python's own allocations are not ours: no leak report, and Python's allocator is kept.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:halt_on_error=1:log_path=$work/asan
export UBSAN_OPTIONS=print_stacktrace=1:log_path=$work/ubsan
status=0
LD_PRELOAD="$asan $ubsan" PYTHONPATH="$work" python3 -m pytest -q -p no:cacheprovider \
    "${tests[@]}" "${deselect[@]}" || status=$?
reports=$(ls "$work"/asan.* "$work"/ubsan.* 2>/dev/null || true)
if [ -n "$reports" ]; then
    echo "sanitizer reports:"; cat $reports
    if grep -l "bncore" $reports >/dev/null 2>&1; then
        echo "FAIL: a sanitizer error in bncore's code"; exit 1
    fi
fi
[ "$status" -eq 0 ] || { echo "FAIL: tests failed under the sanitizers"; exit "$status"; }
echo "sanitizers: no error in bncore's code"
