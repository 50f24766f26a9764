/* A minimal NVTX injection library: logs every range push/pop to $NVTX_LOG_PATH.
   Load it with NVTX_INJECTION64_PATH=/path/libnvtx_inject.so; NVTX calls in any library (here the
   `nvtx` Python package used by graphrt) then reach these callbacks, as they would reach Nsight Systems.
   Build: gcc -shared -fPIC -O2 -o libnvtx_inject.so tools/nvtx_inject.c */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

typedef void (*fn_ptr)(void);
typedef fn_ptr **function_table;
typedef struct { size_t struct_size; int (*get_module_table)(int module, function_table *table, unsigned int *size); } callbacks_t;
typedef const void *(*get_export_table_t)(uint32_t id);

enum { ETID_CALLBACKS = 1, MODULE_CORE = 1, MODULE_CORE2 = 5 };
enum { CORE_RANGE_PUSH_A = 9, CORE_RANGE_POP = 11 };
enum { CORE2_RANGE_PUSH_EX = 4, CORE2_RANGE_POP = 5, CORE2_REGISTER_STRING_A = 10, CORE2_DOMAIN_CREATE_A = 12 };
enum { MESSAGE_ASCII = 1, MESSAGE_REGISTERED = 3 };

typedef struct {  /* nvtxEventAttributes_t, version 2/3 layout */
    uint16_t version, size; uint32_t category; int32_t color_type; uint32_t color;
    int32_t payload_type, reserved0; uint64_t payload; int32_t message_type; const char *message;
} event_attributes_t;

static FILE *out;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void log_line(const char *kind, const char *msg) {
    pthread_mutex_lock(&lock);
    if (out) { fprintf(out, "%s %s\n", kind, msg ? msg : ""); fflush(out); }
    pthread_mutex_unlock(&lock);
}
static int push_a(const char *msg) { log_line("push", msg); return 0; }
static int pop(void) { log_line("pop", ""); return 0; }
static int domain_push_ex(void *domain, const event_attributes_t *a) {
    (void)domain;
    log_line("push", (a && (a->message_type == MESSAGE_ASCII || a->message_type == MESSAGE_REGISTERED)) ? a->message : "?");
    return 0;
}
static int domain_pop(void *domain) { (void)domain; log_line("pop", ""); return 0; }
/* Registered strings and domains are handles; ours point at a private copy of the text. */
static const void *register_string(void *domain, const char *s) { (void)domain; return strdup(s ? s : ""); }
static const void *domain_create(const char *name) { return strdup(name ? name : ""); }

static void install(function_table t, unsigned int size, unsigned int id, fn_ptr f) {
    if (t && id < size && t[id]) *t[id] = f;
}

int InitializeInjectionNvtx2(get_export_table_t get_export_table) {
    const char *path = getenv("NVTX_LOG_PATH");
    out = fopen(path ? path : "nvtx.log", "a");
    const callbacks_t *cb = (const callbacks_t *)get_export_table(ETID_CALLBACKS);
    if (!cb || !cb->get_module_table) return 0;
    function_table t = 0; unsigned int n = 0;
    if (cb->get_module_table(MODULE_CORE, &t, &n)) {
        install(t, n, CORE_RANGE_PUSH_A, (fn_ptr)push_a);
        install(t, n, CORE_RANGE_POP, (fn_ptr)pop);
    }
    if (cb->get_module_table(MODULE_CORE2, &t, &n)) {
        install(t, n, CORE2_RANGE_PUSH_EX, (fn_ptr)domain_push_ex);
        install(t, n, CORE2_RANGE_POP, (fn_ptr)domain_pop);
        install(t, n, CORE2_REGISTER_STRING_A, (fn_ptr)register_string);
        install(t, n, CORE2_DOMAIN_CREATE_A, (fn_ptr)domain_create);
    }
    return 1;
}
