"""C source of the CPU lane's serving loop (exec/lane_signal.py): the host side of a request/answer pair of flags in
pinned, mapped host memory that a captured step's kernels write and poll, instead of a CUDA host node.

flags (int32): [0] request: a kernel writes the key of the host function to run; [1] answer: the key again, once it
ran; [2] timeout: the key a waiting kernel gave up on; [3] stop: the host asks the serving thread to return.
graphrt_lane_wait spins for spin_us (then naps, from nap_us up to 1 ms) until a request or a stop, clears the request and returns its key (0: stop);
ctypes releases the GIL for the call. graphrt_lane_done publishes the answer after every store of the host
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
"""
