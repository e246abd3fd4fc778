"""Per-call timing shared by ``python -m bncore bench`` and ``check``, apart from the bench
module so that ``check`` and ``info`` do not import PyTorch (which takes a second and caps
OpenMP's default thread count at the core count for the whole process)."""
import time


def _loop_time(fn, min_time):
    # Untimed warm-up first: bncore and PyTorch each bring an OpenMP runtime whose idle
    # workers keep spinning for a while after a parallel region. Interleaving without a
    # warm-up would bill one library for the other's spinning threads.
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max(min_time / 2, 0.005):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        t = time.perf_counter() - t0
        if t >= min_time:
            return t / n


def measure(calls, repeat, min_time):
    """Per-call seconds of each callable: ``repeat`` samples each, taken round-robin."""
    samples = {k: [] for k in calls}
    for _ in range(repeat):
        for k, fn in calls.items():
            samples[k].append(_loop_time(fn, min_time))
    return samples
