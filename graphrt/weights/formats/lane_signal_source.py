"""C source of the CPU lane's serving loop (exec/lane_signal.py): the host side of a request/answer pair of flags in
pinned, mapped host memory that a captured step's kernels write and poll, instead of a CUDA host node.

flags (int32): [0] request: a kernel writes the key of the host function to run; [1] answer: the key again, once it
ran; [2] timeout: the key a waiting kernel gave up on; [3] stop: the host asks the serving thread to return.
graphrt_lane_wait spins for spin_us (then naps, from nap_us up to 1 ms) until a request or a stop, clears the request and returns its key (0: stop);
graphrt_lane_serve runs the requests that have a C program itself and returns the others; ctypes releases the GIL
for both. graphrt_lane_done publishes the answer after every store of the host
function's result (x86 keeps stores in order; the fence keeps the compiler and other CPUs from moving them).
"""

SOURCE = r"""
#include <time.h>

extern "C" int graphrt_lane_wait(volatile int* flags, long spin_us, long nap_us) {
    auto start = std::chrono::steady_clock::now();
    int spins = 0;
    for (;;) {
        int key = flags[0];
        if (key != 0) {
            flags[0] = 0;
            std::atomic_thread_fence(std::memory_order_acquire);
            return key;
        }
        if (flags[3] != 0) return 0;
        if (++spins % 256 == 0 && std::chrono::duration_cast<std::chrono::microseconds>(
                std::chrono::steady_clock::now() - start).count() > spin_us) {
            struct timespec nap = {0, nap_us * 1000};
            nanosleep(&nap, nullptr);
            if (nap_us < 1000) nap_us *= 2;   /* long idle: wake less often (the first request then waits longer) */
        } else {
            cpu_relax();
        }
    }
}

extern "C" void graphrt_lane_done(volatile int* flags, int key) {
    std::atomic_thread_fence(std::memory_order_release);
    flags[1] = key;
}

static double monotonic_s() {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* The serving loop: requests whose key has a program (cpu_program_source.py) run here and are answered; the first
   other key is returned for Python to run and answer (0: stop). trace: {capacity, count} then (start, end) pairs
   in CLOCK_MONOTONIC seconds (Python's perf_counter clock): each program run is logged while count < capacity. */
extern "C" int graphrt_lane_serve(volatile int* flags, long spin_us, long nap_us, volatile int64_t* trace) {
    for (;;) {
        int key = graphrt_lane_wait(flags, spin_us, nap_us);
        if (key == 0) return 0;
        double start = monotonic_s();
        if (!graphrt_program_run(key)) return key;
        int64_t at = trace[1];
        if (at < trace[0]) {
            double* span = (double*)(trace + 2) + 2 * at;
            span[0] = start;
            span[1] = monotonic_s();
            trace[1] = at + 1;
        }
        graphrt_lane_done(flags, key);
    }
}
"""
