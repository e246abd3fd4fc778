"""Where bncore puts the arrays it allocates (bncore._outputs).

A kernel that reads x[i] (and dy[i]) while it writes y[i] stalls when y starts 1..256
bytes past x modulo 4096 (the core's store->load check sees only the low 12 address bits:
"4K aliasing"; up to 1.99x measured), and the heap puts a page-multiple array allocated
right after another 16 bytes past it modulo 4096. Outputs of 64 KiB or more therefore
come from bncore's NumPy memory handler, which starts them clear of the inputs. Checked
by making the heap's next block of the output's size trail an input on purpose (free a
probe block, then place the input just before the probe's address) and calling the ops.
"""
import pickle

import numpy as np
import pytest

import bncore
from bncore import _outputs

try:
    from numpy._core.multiarray import get_handler_name
except ImportError:   # NumPy 1.x
    from numpy.core.multiarray import get_handler_name

NEAR, SPAN = 256, 4096


def trails(y, a):
    d = (y.ctypes.data - a.ctypes.data) % SPAN
    return 0 < d <= NEAR


def input_before_next(shape, dtype, rel, keep):
    """An array of shape/dtype that the heap's next block of that size would trail by
    ``rel`` bytes (modulo 4096): a view into a buffer kept in ``keep``."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    values = np.random.default_rng(rel).normal(2.0, 1.5, shape).astype(dtype)
    raw = np.empty(nbytes + 2 * SPAN, np.uint8)   # before the probe: nothing allocated
    keep += [raw, values]                          # after it may take the probe's block
    for _ in range(2):   # the first free of a big block raises glibc's mmap threshold:
        probe = np.empty(nbytes, np.uint8)   # the second probe and what follows are heap
        addr = probe.ctypes.data
        del probe
    start = (addr - rel - raw.ctypes.data) % SPAN
    a = raw[start:start + nbytes].view(dtype).reshape(shape)
    a[...] = values
    return a


def test_the_probe_makes_a_plain_allocation_trail():
    """The test's own premise: without bncore's handler, the next array trails the input."""
    keep = []
    a = input_before_next((64, 1000), np.float32, 32, keep)
    assert trails(np.empty((64, 1000), np.float32), a)


@pytest.mark.parametrize("rel", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_like_apart_never_trails_its_inputs(rel, dtype):
    keep, shape = [], (64, 1000)
    a = input_before_next(shape, dtype, rel, keep)
    y = _outputs.empty_like_apart(shape, dtype, a)
    assert not trails(y, a)
    b = input_before_next(shape, dtype, rel, keep)   # and two inputs
    y2 = _outputs.empty_like_apart(shape, dtype, a, b)
    assert not trails(y2, a) and not trails(y2, b)
    for arr in (y, y2):   # an ordinary array that owns its memory
        assert arr.shape == shape and arr.dtype == dtype
        assert arr.flags.c_contiguous and arr.flags.writeable and arr.flags.owndata
        assert arr.base is None and arr.ctypes.data % 64 == 0
        assert get_handler_name(arr) == "bncore_apart"


def test_apart_arrays_behave_like_any_other():
    keep = []
    a = input_before_next((300, 300), np.float32, 32, keep)
    y = bncore.layer_norm(a, 300)
    assert get_handler_name(y) == "bncore_apart" and not trails(y, a)
    want = y.copy()
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(y)), want)
    y.resize((600, 300), refcheck=False)   # realloc through the handler keeps the data
    np.testing.assert_array_equal(y[:300], want)
    y.resize((10, 300), refcheck=False)
    np.testing.assert_array_equal(y, want[:10])
    # the handler was only in place for bncore's own allocation
    assert get_handler_name(np.empty(10**6)) != "bncore_apart"
    # small outputs: NumPy's allocator
    assert get_handler_name(bncore.layer_norm(a[:10, :100], 100)) != "bncore_apart"


@pytest.mark.parametrize("rel", [16, 32, 128])
def test_op_outputs_never_trail_their_inputs(rel):
    """Every allocating entry point, fast path and general path, forward and backward."""
    keep = []
    nchw, nhwc, rows = (8, 16, 20, 20), (8, 20, 20, 16), (400, 128)
    w16 = np.linspace(0.5, 1.5, 16).astype(np.float32)
    wr = np.linspace(0.5, 1.5, 128).astype(np.float32)

    def x_(shape):
        return input_before_next(shape, np.float32, rel, keep)

    checks = []
    x = x_(nchw)
    checks.append(("batch_norm", bncore.batch_norm(x, None, None, w16, training=True), x))
    x = x_(nhwc)
    y, m, s = bncore.batch_norm_forward(x, w16, axis=-1)
    checks.append(("batch_norm_forward", y, x))
    dy = x_(nhwc)
    dx = bncore.batch_norm_backward(dy, x, m, s, w16, axis=-1)[0]
    checks += [("batch_norm_backward/x", dx, x), ("batch_norm_backward/dy", dx, dy)]
    x = x_(rows)
    y, m, s = bncore.layer_norm_forward(x, 128, wr, wr)
    checks.append(("layer_norm_forward", y, x))
    dy = x_(rows)
    dx = bncore.layer_norm_backward(dy, x, m, s, 128, wr)[0]
    checks += [("layer_norm_backward/x", dx, x), ("layer_norm_backward/dy", dx, dy)]
    x = x_(rows)
    checks.append(("rms_norm", bncore.rms_norm(x, 128, wr), x))
    x = x_(nhwc)
    y, m, s = bncore.group_norm_forward(x, 4, w16, w16, axis=-1)
    checks.append(("group_norm_forward", y, x))
    dy = x_(nhwc)
    dx = bncore.group_norm_backward(dy, x, m, s, 4, w16, axis=-1)[0]
    checks += [("group_norm_backward/x", dx, x), ("group_norm_backward/dy", dx, dy)]
    # the general path (eps given as an int is not the one-step call)
    x = x_(nchw)
    checks.append(("batch_norm, general", bncore.batch_norm(x, None, None, w16,
                                                            training=True, eps=0), x))
    x = x_(rows)
    checks.append(("layer_norm, general", bncore.layer_norm(x, 128, wr, wr, eps=0), x))
    x = x_(nchw)
    checks.append(("group_norm, general", bncore.group_norm(x, 4, w16, w16, eps=0), x))
    dy = x_(nchw)
    _, m, s = bncore.batch_norm_forward(x, w16)
    dx = bncore.batch_norm_backward(dy, x, m, s, w16, training=0)[0]
    checks += [("batch_norm_backward, general/x", dx, x),
               ("batch_norm_backward, general/dy", dx, dy)]
    for name, out, inp in checks:
        assert not trails(out, inp), f"{name}: the output trails its input"


# ------------------------------------------------------------------ the big-block cache
# Freed outputs of 32 MiB or more are kept (up to cache_limit() bytes, 4 blocks) and handed
# back for a request of their size: above glibc's mmap threshold every fresh array is a
# new mapping whose pages are faulted in and zeroed on first touch.

BIG = (9, 1024, 1024)   # 36 MiB of float32: over the 32 MiB threshold


@pytest.fixture
def cache():
    """A clean cache with the default limit, restored afterwards."""
    old = _outputs.cache_limit()
    _outputs.cache_limit(256 << 20)
    yield
    _outputs.cache_limit(old)


def big_input():
    return np.random.default_rng(0).normal(3.0, 2.0, BIG).astype(np.float32)


def test_a_freed_big_output_is_reused_for_the_same_size(cache):
    x = big_input()
    y = bncore.rms_norm(x, (1024,))
    addr = y.ctypes.data
    assert _outputs.cached_bytes() == 0
    del y
    kept = _outputs.cached_bytes()
    assert kept >= x.nbytes
    y2 = bncore.rms_norm(x, (1024,))
    assert _outputs.cached_bytes() == 0          # taken out again
    assert abs(y2.ctypes.data - addr) < 8192     # the same block (placed apart anew)
    assert get_handler_name(y2) == "bncore_apart"


def test_a_reused_block_holds_no_stale_values(cache):
    """The op writes every element of its output: garbage left in a cached block (nan
    here) never shows through."""
    x = big_input()
    ref = bncore.layer_norm(x, (1024,))
    y = bncore.layer_norm(x, (1024,))
    y[...] = np.nan
    del y
    assert _outputs.cached_bytes() > 0
    again = bncore.layer_norm(x, (1024,))
    np.testing.assert_array_equal(again, ref)


def test_small_outputs_and_other_sizes_are_not_cached(cache):
    x = big_input()
    small = bncore.rms_norm(x[:1], (1024,))   # 4 MiB: glibc's own heap keeps those
    del small
    assert _outputs.cached_bytes() == 0
    y = bncore.rms_norm(x, (1024,))
    del y
    kept = _outputs.cached_bytes()
    bigger = np.ones((12, 1024, 1024), np.float32)   # 48 MiB: more than 1/8 over the block
    z = bncore.rms_norm(bigger, (1024,))
    assert _outputs.cached_bytes() == kept           # not handed the smaller block
    del z
    assert _outputs.cached_bytes() > kept


def test_the_cache_keeps_at_most_its_limit_and_four_blocks(cache):
    x = big_input()
    ys = [bncore.rms_norm(x, (1024,)) for _ in range(6)]
    del ys
    assert 0 < _outputs.cached_bytes() <= 4 * (x.nbytes + 8192)
    _outputs.cache_limit(x.nbytes + 8192)            # room for one block
    assert _outputs.cached_bytes() == 0              # setting the limit released them
    ys = [bncore.rms_norm(x, (1024,)) for _ in range(3)]
    del ys
    assert x.nbytes <= _outputs.cached_bytes() <= x.nbytes + 8192


def test_release_memory_and_a_zero_limit(cache):
    x = big_input()
    y = bncore.rms_norm(x, (1024,))
    del y
    kept = _outputs.cached_bytes()
    assert kept > 0
    assert bncore.release_memory() == kept
    assert _outputs.cached_bytes() == 0
    assert bncore.release_memory() == 0
    _outputs.cache_limit(0)
    y = bncore.rms_norm(x, (1024,))
    del y
    assert _outputs.cached_bytes() == 0
    with pytest.raises(ValueError, match="cache_limit"):
        _outputs.cache_limit(-1)
    assert _outputs.cache_limit() == 0


def test_arrays_freed_on_other_threads_while_ops_allocate(cache):
    """The cache's slots are shared by every thread that frees an array."""
    import threading
    x = big_input()
    ref = bncore.rms_norm(x, (1024,))
    errors = []

    def work():
        try:
            for _ in range(6):
                y = bncore.rms_norm(x, (1024,))
                if not np.array_equal(y, ref):
                    errors.append("values")
                del y
        except Exception as e:   # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _outputs.cached_bytes() <= 4 * (x.nbytes + 8192)


@pytest.mark.parametrize("value, limit", [("0", 0), ("64", 64 << 20), ("1.5", 3 << 19)])
def test_the_limit_comes_from_the_environment(value, limit):
    import subprocess
    import sys
    code = "import bncore._outputs as o; print(o.cache_limit())"
    env = dict(__import__("os").environ, BNCORE_OUTPUT_CACHE_MB=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert int(out.stdout) == limit


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_bad_environment_value_warns_and_keeps_the_default(value):
    import subprocess
    import sys
    code = "import bncore; import bncore._outputs as o; print(o.cache_limit())"
    env = dict(__import__("os").environ, BNCORE_OUTPUT_CACHE_MB=value)
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) == 256 << 20
    assert "BNCORE_OUTPUT_CACHE_MB" in out.stderr


def test_blocks_of_shapes_left_behind_make_room_for_a_new_size(cache):
    """Four blocks of sizes no longer used fill the cache; a loop over a new size gets its
    block kept (and handed back: the same address) once they have gone unasked for eight
    big requests, instead of a fresh mapping on every call."""
    _outputs.cache_limit(1 << 40)
    old = [np.ones((n, 1024, 1024), np.float32) for n in (9, 10, 11, 12)]   # 36-48 MiB
    ys = [bncore.rms_norm(a, (1024,)) for a in old]
    del ys
    assert _outputs.cached_bytes() >= sum(a.nbytes for a in old)   # four blocks kept
    x = np.ones((14, 1024, 1024), np.float32)                      # 56 MiB: fits none
    addrs = []
    for _ in range(12):
        y = bncore.rms_norm(x, (1024,))
        addrs.append(y.ctypes.data)
        del y
    kept = _outputs.cached_bytes()
    y = bncore.rms_norm(x, (1024,))
    assert kept - _outputs.cached_bytes() >= x.nbytes     # y's block came from the cache
    assert abs(y.ctypes.data - addrs[-1]) < 8192
    del y
    # a block still in use by a loop (asked for at every other request) is not evicted
    again = bncore.rms_norm(old[0], (1024,))
    del again
    for _ in range(6):
        y = bncore.rms_norm(x, (1024,))
        del y
        y0 = bncore.rms_norm(old[0], (1024,))
        a0 = y0.ctypes.data
        del y0
        kept = _outputs.cached_bytes()
        y0 = bncore.rms_norm(old[0], (1024,))
        assert kept - _outputs.cached_bytes() >= old[0].nbytes
        assert abs(y0.ctypes.data - a0) < 8192
        del y0


def test_a_limit_beyond_memory_means_no_limit(cache):
    assert _outputs.cache_limit(10**30) >= 2**63
    x = big_input()
    y = bncore.rms_norm(x, (1024,))
    del y
    assert _outputs.cached_bytes() > 0


def test_show_config_reports_the_cache(capsys):
    bncore.show_config()
    assert "output cache" in capsys.readouterr().out
