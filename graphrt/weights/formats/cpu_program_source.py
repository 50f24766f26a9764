"""C source of CPU programs (cpu_program.py): a recorded list of graphrt's kernel calls, kept under a key and run in
C, without Python or its lock: by the CPU lane's serving loop (lane_signal_source.py) inside a captured step, or by
graphrt_program_run (calibration, tests). Placed after the GEMV sources, whose entry points it calls.

A call is a kind (which entry point) and its arguments in the entry point's order: every integer and address as
an int64 slot, the one float apart. COPY is memcpy(slot 0, slot 1, slot 2 bytes): a result into the lane's staging.
"""

SOURCE = r"""
#include <mutex>
#include <unordered_map>

struct ProgCall { int64_t kind; int64_t a[16]; double f; };
enum { CALL_BF16 = 1, CALL_INT8 = 2, CALL_INT4 = 3, CALL_COPY = 4 };

static std::mutex programs_lock;
static std::unordered_map<int, std::vector<ProgCall>>& programs() {
    static auto* table = new std::unordered_map<int, std::vector<ProgCall>>();   /* lives as long as the process */
    return *table;
}

static void program_call(const ProgCall& c) {
    const int64_t* a = c.a;
    typedef const uint16_t* cu16;
    switch (c.kind) {
        case CALL_BF16:   /* graphrt_bf16_gemv(x, w, y, xe, B, N, K, threads, path, nw, eps, silu, residual, xt) */
            graphrt_bf16_gemv((cu16)a[0], (cu16)a[1], (uint16_t*)a[2], (uint16_t*)a[3], (int)a[4], (int)a[5], (int)a[6],
                              (int)a[7], (int)a[8], (cu16)a[9], (float)c.f, (int)a[10], (cu16)a[11], (uint16_t*)a[12]);
            break;
        case CALL_INT8:   /* graphrt_int8_gemv(x, w, scale, y, xe, xf, B, N, K, threads, path, nw, eps, silu, residual) */
            graphrt_int8_gemv((cu16)a[0], (const int8_t*)a[1], (const float*)a[2], (uint16_t*)a[3], (uint16_t*)a[4],
                              (float*)a[5], (int)a[6], (int)a[7], (int)a[8], (int)a[9], (int)a[10], (cu16)a[11],
                              (float)c.f, (int)a[12], (cu16)a[13]);
            break;
        case CALL_INT4:   /* graphrt_int4_gemv(x, w, sz, y, xe, xp, X, B, N, K, G, threads, path, nw, eps, silu, residual) */
            graphrt_int4_gemv((cu16)a[0], (const uint8_t*)a[1], (cu16)a[2], (uint16_t*)a[3], (uint16_t*)a[4],
                              (uint16_t*)a[5], (float*)a[6], (int)a[7], (int)a[8], (int)a[9], (int)a[10], (int)a[11],
                              (int)a[12], (cu16)a[13], (float)c.f, (int)a[14], (cu16)a[15]);
            break;
        case CALL_COPY:
            memcpy((void*)a[0], (const void*)a[1], (size_t)a[2]);
            break;
    }
}

/* the program under `key` (a copy of the calls: the caller's array may go) */
extern "C" void graphrt_program_set(int key, const ProgCall* calls, int n) {
    std::lock_guard<std::mutex> l(programs_lock);
    programs()[key] = std::vector<ProgCall>(calls, calls + n);
}

extern "C" void graphrt_program_drop(int key) {
    std::lock_guard<std::mutex> l(programs_lock);
    programs().erase(key);
}

/* run the program under `key`: 1, or 0 where there is none (the lane then asks Python). Programs are set before
   the graphs that post their keys are replayed and dropped after those graphs are gone, so the calls run unlocked. */
extern "C" int graphrt_program_run(int key) {
    const std::vector<ProgCall>* p = nullptr;
    {
        std::lock_guard<std::mutex> l(programs_lock);
        auto it = programs().find(key);
        if (it == programs().end()) return 0;
        p = &it->second;
    }
    for (const ProgCall& c : *p) program_call(c);
    return 1;
}
"""
