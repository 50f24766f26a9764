"""C++ source of the worker pool the CPU GEMV kernels (int4_cpu_source.py, bf16_cpu_source.py) run on, instead of
OpenMP. Placed first in the library.

Why: the CPU lane calls the kernels from the CUDA driver's callback thread, and OpenMP gives that thread a team of
its own beside the main thread's; with both teams (30 threads on the H100 host's 16 CPUs) libgomp stops spinning
and every fork and barrier sleeps and wakes through the kernel: an int4 MLP group cost 531 us more inside the
captured step than called directly (tools/lane_probe.py). Here one pool serves whichever thread calls, its workers
spin for `spin_us` after each job before they sleep (the lane sets a few milliseconds, so its workers stay awake
between the groups of a step; elsewhere the default is short).

pool_run(fn, ctx, n, threads): `threads` threads (the caller and threads - 1 workers) take chunks of consecutive
tasks from a shared counter, each chunk as fn(ctx, begin, end), until the `n` tasks are taken; returns when all are
done, and when every worker has seen the job (so none can mistake it for the next). Callers are serialized by a
mutex. Chunks, not a fixed split: inside a decode step other threads share the CPUs (the thread that waits for the
GPU, the driver's), and with a fixed split the job waited for whichever worker they delayed. Guided chunks (by
default; `graphrt_cpu_pool_guided(0)`: fixed ones, about 8 a thread): each takes 1 / (2 threads) of the tasks left,
so the first are large and the last single tasks, and the threads end close together (fixed chunks of an 8B
gate/up product were 1.7 MB each, about 0.25 ms of one thread's reading). Each task writes its own outputs, so which
thread runs it does not change a bit of the result.
"""

SOURCE = r"""
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
static inline void cpu_relax() { _mm_pause(); }
#else
static inline void cpu_relax() {}
#endif

typedef void (*range_fn)(void* ctx, int begin, int end);

namespace {
struct Pool {
    std::vector<std::thread> workers;           /* worker i is thread i + 1 of a job */
    std::atomic<unsigned> generation{0};
    std::atomic<int> pending{0};
    std::atomic<int> next{0};                   /* the first task not yet taken */
    range_fn fn = nullptr;
    void* ctx = nullptr;
    int n = 0, threads = 1, chunk = 1;
    std::atomic<int> guided{1};                 /* chunk sizes: guided (1) or fixed, about 8 a thread (0) */
    std::atomic<long> spin_ns{50000};
    std::mutex wake_lock, run_lock;
    std::condition_variable wake;

    void share() {
        for (;;) {
            int begin = next.load(std::memory_order_relaxed), size;
            do {   /* guided: a share of what is left, so the last chunks are small and the threads end together */
                if (begin >= n) return;
                size = guided ? (n - begin) / (2 * threads) : chunk;
                if (size < 1) size = 1;
            } while (!next.compare_exchange_weak(begin, begin + size, std::memory_order_relaxed));
            fn(ctx, begin, begin + size < n ? begin + size : n);
        }
    }

    void work(int t, unsigned seen) {
        for (;;) {
            auto start = std::chrono::steady_clock::now();
            long budget = spin_ns.load(std::memory_order_relaxed);
            int spins = 0;
            while (generation.load(std::memory_order_acquire) == seen) {
                cpu_relax();
                if (++spins % 256 == 0 && std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::steady_clock::now() - start).count() > budget) {
                    std::unique_lock<std::mutex> l(wake_lock);
                    wake.wait(l, [&] { return generation.load(std::memory_order_acquire) != seen; });
                }
            }
            seen = generation.load(std::memory_order_acquire);
            if (t < threads) share();
            pending.fetch_sub(1, std::memory_order_acq_rel);   /* every worker acknowledges every job */
        }
    }
};

Pool* current = nullptr;   /* lives as long as the process (its workers are detached) */

Pool& pool() {
    if (current == nullptr) {
        static bool registered = false;
        if (!registered) {   /* a forked child has none of the parent's workers: it starts a pool of its own */
            pthread_atfork(nullptr, nullptr, [] { current = nullptr; });
            registered = true;
        }
        current = new Pool();
    }
    return *current;
}
}  // namespace

static void pool_run(range_fn fn, void* ctx, int n, int threads) {
    Pool& p = pool();
    std::lock_guard<std::mutex> serial(p.run_lock);
    if (threads < 1) threads = 1;
    if (threads > n) threads = n > 0 ? n : 1;
    while ((int)p.workers.size() < threads - 1) {
        int t = (int)p.workers.size() + 1;
        unsigned now = p.generation.load(std::memory_order_acquire);   /* a new worker waits for the next job */
        p.workers.emplace_back([t, now] { pool().work(t, now); });
        p.workers.back().detach();
    }
    p.fn = fn; p.ctx = ctx; p.n = n; p.threads = threads;
    p.chunk = n / (threads * 8) > 1 ? n / (threads * 8) : 1;   /* about 8 chunks a thread */
    p.next.store(0, std::memory_order_relaxed);
    p.pending.store((int)p.workers.size(), std::memory_order_relaxed);
    {
        std::lock_guard<std::mutex> l(p.wake_lock);
        p.generation.fetch_add(1, std::memory_order_acq_rel);
    }
    p.wake.notify_all();
    p.share();
    while (p.pending.load(std::memory_order_acquire) > 0) cpu_relax();
}

extern "C" void graphrt_cpu_pool_spin(long spin_us) { pool().spin_ns.store(spin_us * 1000, std::memory_order_relaxed); }
extern "C" void graphrt_cpu_pool_guided(int guided) { pool().guided.store(guided, std::memory_order_relaxed); }
"""
