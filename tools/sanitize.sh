#!/usr/bin/env bash
# Run bncore's tests against an AddressSanitizer + UndefinedBehaviorSanitizer build and
# fail on any sanitizer report whose stack has a frame in bncore's code.
#
#   tools/sanitize.sh            every test file, minus what a sanitizer makes meaningless
#                                (RSS leak windows: ASan's quarantine grows RSS; GIL and
#                                speed-up timings; the 2 GiB array) - about 10-15 minutes
#   tools/sanitize.sh --quick    core, bad-input, thread-determinism and property tests
#                                (hypothesis "quick" profile): a few minutes, what CI runs
#   tools/sanitize.sh [--quick] -- PYTEST_ARGS...   extra arguments for pytest (e.g. -x)
#
# The sources are copied to a temporary folder and built there, so the normal in-place
# build (bncore/*.so) is left alone; the copy is deleted on exit (BNCORE_ASAN_KEEP=1
# keeps it, with the sanitizer logs). Python itself is not instrumented: libasan is
# preloaded, PYTHONMALLOC=malloc hands Python's small objects to ASan's allocator, and
# leak detection is off (the interpreter's own allocations are not ours).
set -euo pipefail

quick=0
pytest_extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --) shift; pytest_extra=("$@"); break ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/bncore-asan.XXXXXX)
if [ "${BNCORE_ASAN_KEEP:-0}" = 1 ]; then
    trap 'echo "kept: $work"' EXIT
else
    trap 'rm -rf "$work"' EXIT
fi

# --- a sanitized build of a copy of the tree
cp -r "$top/setup.py" "$top/pyproject.toml" "$top/README.md" "$top/bncore" "$top/tests" \
    "$top/tools" "$work/"
rm -f "$work"/bncore/*.so "$work"/bncore/_*.c
find "$work" -name __pycache__ -prune -exec rm -rf {} +
cd "$work"
san="-fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer -g -O1"
echo "building bncore with $san in $work ..."
if ! CFLAGS="$san" LDFLAGS="-fsanitize=address,undefined" \
        python3 setup.py build_ext --inplace -j 2 >build.log 2>&1; then
    tail -40 build.log
    echo "FAIL: the sanitized build failed"
    exit 1
fi
for so in bncore/*.so; do   # a run on uninstrumented code would prove nothing
    if ! nm -D "$so" | grep -q __asan_; then
        echo "FAIL: $so is not instrumented"
        exit 1
    fi
done

# --- what to run
if [ "$quick" = 1 ]; then
    tests=(tests/test_core_batchnorm.py tests/test_core_moments.py tests/test_core_family.py
           tests/test_bad_input.py tests/test_properties.py tests/test_outputs.py
           tests/test_fastpath.py tests/test_config.py
           "tests/test_moments.py::test_leading_and_later_kept_axes_need_no_gather"
           "tests/test_moments.py::test_leading_blocks_take_the_fast_path"
           "tests/test_moments.py::test_update_takes_the_fast_path"
           "tests/test_moments.py::test_permuted_contiguous_input_is_reduced_in_memory_order"
           "tests/test_moments.py::test_float64_channels_last_exact_with_one_pass_blocks"
           "tests/test_moments.py::test_float64_channels_last_nan_inf_stay_in_their_channel"
           "tests/test_threads.py::test_bitwise_identical_for_any_n_threads"
           "tests/test_threads.py::test_channels_last_samples_shared_by_the_threads"
           "tests/test_threads.py::test_nchw_group_runs_shared_by_the_threads"
           "tests/test_threads.py::test_channels_last_wide_groups_straight_from_the_block"
           "tests/test_threads.py::test_eight_python_threads_at_once_give_the_serial_results"
           "tests/test_threads.py::test_batch_norm_beyond_the_caches_prefetching_the_next_channel"
           "tests/test_threads.py::test_eval_beyond_the_caches_planes_in_memory_order"
           "tests/test_threads.py::test_backward_beyond_the_caches_short_planes_by_sample"
           "tests/test_threads.py::test_wide_rows_beyond_the_caches_prefetching_the_next_channel_block"
           "tests/test_threads.py::test_row_norms_beyond_the_caches_prefetching_rows_ahead"
           "tests/test_threads.py::test_channels_last_few_rows_split_by_channel_tiles"
           "tests/test_threads.py::test_few_wide_rows_split_by_column_tiles")
else
    tests=(tests)
fi
deselect=()
for t in tests/test_memory.py::test_no_leak_over_many_calls \
         tests/test_memory.py::test_more_than_2_31_bytes_moments_and_in_place_batch_norm \
         tests/test_threads.py::test_kernels_release_the_gil \
         tests/test_reliability.py::test_no_leak_over_100k_calls \
         tests/test_embedding.py; do   # builds other code with the compiler: not ours to check
    [ -f "${t%%::*}" ] && deselect+=(--deselect "$t")
done
unset CI   # the hypothesis "ci" profile is too slow under ASan: 40 derandomised examples
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-quick}"

# --- run under the sanitizers
asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
logs="$work/logs"
mkdir -p "$logs"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:allocator_may_return_null=1:log_path=$logs/asan:strict_string_checks=0"
export UBSAN_OPTIONS="print_stacktrace=1:log_path=$logs/ubsan"
export PYTHONMALLOC=malloc PYTHONPATH="$work" PYTHONDONTWRITEBYTECODE=1
where=$(LD_PRELOAD="$asan $ubsan" python3 -c "import bncore; print(bncore.__file__)")
case "$where" in
    "$work"/*) ;;
    *) echo "FAIL: the tests would import $where, not the sanitized build"; exit 1 ;;
esac
echo "running ${tests[*]} under ASan + UBSan ..."
status=0
LD_PRELOAD="$asan $ubsan" python3 -m pytest -q -p no:cacheprovider "${tests[@]}" \
    "${deselect[@]}" "${pytest_extra[@]}" || status=$?

# --- sanitizer reports: ours when a stack frame is in bncore's sources or .so files
ours='(bncore/src/|bncore/_[a-z]+\.(c|pyx)|/_(batchnorm|stats|rownorm|openmp|outputs)\.cpython)'
reports=$(find "$logs" -type f | sort)
nreports=$(printf '%s' "$reports" | grep -c . || true)
bad=0
for r in $reports; do
    if grep -Eq "$ours" "$r"; then
        bad=$((bad + 1))
        echo "=== sanitizer report in bncore's code: $r"
        cat "$r"
    fi
done
echo "sanitizer reports: $nreports in all, $bad with a frame in bncore's code"
if [ "$bad" -gt 0 ]; then
    echo "FAIL: sanitizer errors in bncore's code"
    exit 1
fi
if [ "$nreports" -gt 0 ]; then
    echo "(reports outside bncore, e.g. in the interpreter or NumPy:)"
    for r in $reports; do head -20 "$r"; done
fi
if [ "$status" -ne 0 ]; then
    echo "FAIL: pytest exited with $status under the sanitizers (see above; a test that" \
         "also fails without them is not a sanitizer finding)"
    exit "$status"
fi
echo "OK: no sanitizer error in bncore's code"
