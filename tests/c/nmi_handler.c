/*
 * nmi_handler.c - TWA_NMI_CURRENT from a C signal handler.
 *
 * A program with no Python in it plays a task: it dlopen()s the package's
 * native extension, maps a domain, registers itself with its own eventfd and
 * calls tw_add_nmi() from a sigaction() handler. Then it runs its own list
 * with tw_detach() and the batch run path, exits the task and prints one line:
 *
 *     ok slot=N handler_adds=N main_adds=N ran=N resume_due=N
 *
 * Usage: nmi_handler EXTENSION.so /DOMAIN FUNC_ID once|storm OTHER_SLOT OTHER_GEN
 *
 *   once   raise(SIGUSR2) once; the handler queues one work; the eventfd must
 *          become readable and the handler must have run nothing.
 *   storm  as once, then a 100 us interval timer whose SIGALRM handler calls
 *          tw_add_nmi() while the main program adds (TWA_NONE) and runs its
 *          list in a loop: the handler interrupts the same process's free-list
 *          pops and pushes, list pushes and detaches.
 *
 * OTHER_SLOT/OTHER_GEN name a task of another process: tw_add_nmi() on it must
 * be -EINVAL and queue nothing.
 *
 * Any failure prints "fail: ..." on stderr and exits 1.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "taskwork.h"

/*
 * The extension also holds cffi's glue for Python. Its functions are bound
 * lazily and never called here; its one data reference into the interpreter
 * is satisfied by this placeholder, exported with -rdynamic.
 */
char _Py_NoneStruct[64] __attribute__((used));

#define SYM(name) static __typeof__(name) *p_##name
SYM(tw_map);
SYM(tw_unmap);
SYM(tw_register);
SYM(tw_add);
SYM(tw_add_nmi);
SYM(tw_detach);
SYM(tw_run_load);
SYM(tw_run_start_many);
SYM(tw_run_finish);
SYM(tw_pending);
SYM(tw_flags_get);
SYM(tw_flags_set);
SYM(tw_flags_clear);
SYM(tw_eventfd_drain);
SYM(tw_slot_check);
SYM(tw_release_slot);
SYM(tw_proc_release);
SYM(tw_pool_free_count);

static struct tw_dom dom;
static uint32_t slot, gen;
static uint64_t fid;
static int efd = -1;
static const char payload[] = "from-a-c-signal-handler";

/* Written by the handler only. */
static volatile sig_atomic_t h_ok, h_fail, h_due, h_done;
static volatile int h_last_rc;
static volatile uint64_t h_last_id;

static uint32_t *batch;
static char *pbuf;
static uint64_t *rec;
static uint8_t *outcome;

static void fail(const char *what, long v)
{
    fprintf(stderr, "fail: %s (%ld)\n", what, v);
    exit(1);
}

/* tw_add_nmi takes no lock and allocates nothing outside the pool: it may
 * interrupt this process's own adds and runs (the storm mode does just that). */
static void on_signal(int sig)
{
    int saved = errno;
    uint64_t id = 0;
    int rc = p_tw_add_nmi(&dom, slot, gen, fid, payload, sizeof(payload) - 1, efd, 0, &id);
    if (rc >= 0) {
        h_ok++;
        h_last_id = id;
        if (rc & TW_DUE_EVENTFD)
            h_due++;
        if (rc & TW_DONE_EVENTFD)
            h_done++;
    } else {
        h_fail++;
        h_last_rc = rc;
    }
    errno = saved;
}

/* task_work_run: drain, clear, detach, load, start and finish the batch
 * (the batch run path: tw_run_load, tw_run_start_many, tw_run_finish);
 * until empty. */
static int run_all(void)
{
    int total = 0;
    for (;;) {
        p_tw_eventfd_drain(efd);
        p_tw_flags_clear(&dom, slot, TW_F_NOTIFY_RESUME | TW_F_NOTIFY_SIGNAL);
        int n = p_tw_detach(&dom, slot, gen, batch, dom.pool_size);
        if (n < 0)
            fail("tw_detach", n);
        if (n == 0)
            return total;
        int rc = p_tw_run_load(&dom, slot, batch, (uint32_t)n, rec, pbuf, NULL, outcome);
        if (rc != n)
            fail("tw_run_load", rc);
        for (int i = 0; i < n; i++) {
            uint64_t off = rec[(uint64_t)TW_REC_POFF * n + i];
            uint64_t len = rec[(uint64_t)TW_REC_POFF * n + i + 1] - off;
            if (rec[(uint64_t)TW_REC_FUNC * n + i] != fid ||
                (uint32_t)rec[(uint64_t)TW_REC_SENDER * n + i] != (uint32_t)getpid())
                fail("a work with the wrong callback or sender", (long)batch[i]);
            if (len != sizeof(payload) - 1 || memcmp(pbuf + off, payload, len) != 0)
                fail("a work with the wrong payload", (long)batch[i]);
        }
        rc = p_tw_run_start_many(&dom, slot, batch, (uint32_t)n);
        if (rc != n)
            fail("tw_run_start_many", rc);
        rc = p_tw_run_finish(&dom, slot, batch, (uint32_t)n, outcome, NULL);
        if (rc != n)
            fail("tw_run_finish", rc);
        total += n;
    }
}

static void on(int sig, void (*fn)(int))
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(sig, &sa, NULL) != 0)
        fail("sigaction", errno);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s EXTENSION.so /DOMAIN FUNC_ID once|storm OTHER_SLOT OTHER_GEN\n",
                argv[0]);
        return 2;
    }
    int storm = strcmp(argv[4], "storm") == 0;
    fid = strtoull(argv[3], NULL, 10);
    uint32_t other_slot = (uint32_t)strtoul(argv[5], NULL, 10);
    uint32_t other_gen = (uint32_t)strtoul(argv[6], NULL, 10);

    void *h = dlopen(argv[1], RTLD_LAZY | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "fail: dlopen: %s\n", dlerror());
        return 1;
    }
#define LOAD(name) do { \
        *(void **)&p_##name = dlsym(h, #name); \
        if (!p_##name) { fprintf(stderr, "fail: %s is not exported\n", #name); return 1; } \
    } while (0)
    LOAD(tw_map); LOAD(tw_unmap); LOAD(tw_register); LOAD(tw_add); LOAD(tw_add_nmi);
    LOAD(tw_detach); LOAD(tw_run_load); LOAD(tw_run_start_many); LOAD(tw_run_finish);
    LOAD(tw_pending); LOAD(tw_flags_get); LOAD(tw_flags_set);
    LOAD(tw_flags_clear); LOAD(tw_eventfd_drain); LOAD(tw_slot_check); LOAD(tw_release_slot);
    LOAD(tw_proc_release); LOAD(tw_pool_free_count);

    int fd = shm_open(argv[2], O_RDWR, 0);
    if (fd < 0)
        fail("shm_open", errno);
    struct stat st;
    if (fstat(fd, &st) != 0)
        fail("fstat", errno);
    int rc = p_tw_map(&dom, fd, (uint64_t)st.st_size);
    close(fd);
    if (rc)
        fail("tw_map", rc);
    batch = calloc(dom.pool_size, sizeof(*batch));
    pbuf = calloc(dom.pool_size, (uint64_t)dom.payload_size + 1);
    rec = calloc((uint64_t)TW_REC_WORDS * dom.pool_size + 2, sizeof(*rec));
    outcome = calloc(dom.pool_size, 1);
    if (!batch || !pbuf || !rec || !outcome)
        fail("calloc", 0);

    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (efd < 0)
        fail("eventfd", errno);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    rc = p_tw_register(&dom, "c-nmi", 0, SIGUSR1, efd, getuid(),
                       (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec, &gen);
    if (rc < 0)
        fail("tw_register", rc);
    slot = (uint32_t)rc;

    /* Not the own task: EINVAL, and no node taken from the pool. */
    int free_before = p_tw_pool_free_count(&dom);
    uint64_t dummy;
    rc = p_tw_add_nmi(&dom, other_slot, other_gen, fid, payload, 1, efd, 0, &dummy);
    if (rc != -EINVAL)
        fail("tw_add_nmi on another process's task is not -EINVAL", rc);
    if (p_tw_pool_free_count(&dom) != free_before)
        fail("tw_add_nmi on another process's task took a node", free_before);

    /* Once, from a SIGUSR2 handler. */
    on(SIGUSR2, on_signal);
    if (p_tw_pending(&dom, slot, gen) != 0)
        fail("a new task has pending work", 0);
    raise(SIGUSR2);
    if (h_ok != 1 || h_fail != 0)
        fail("the handler's tw_add_nmi failed", h_last_rc);
    if (h_due != 1 || h_done != 1)
        fail("the handler's add did not write the eventfd itself", h_due);
    if (!(p_tw_flags_get(&dom, slot) & TW_F_NOTIFY_RESUME))
        fail("NOTIFY_RESUME is not set", 0);
    if (p_tw_pending(&dom, slot, gen) != 1)
        fail("not exactly one pending work", 0);
    struct pollfd pfd = { .fd = efd, .events = POLLIN };
    if (poll(&pfd, 1, 5000) != 1)
        fail("the eventfd did not become readable", errno);
    int ran = run_all();
    if (ran != 1)
        fail("the run did not find exactly the one work", ran);
    int main_adds = 0;

    if (storm) {
        on(SIGALRM, on_signal);
        struct itimerval it = { { 0, 100 }, { 0, 100 } };
        if (setitimer(ITIMER_REAL, &it, NULL) != 0)
            fail("setitimer", errno);
        double deadline = now_s() + 10.0;
        for (int i = 0; (h_ok < 3000 || main_adds < 3000) && now_s() < deadline; i++) {
            int64_t r = p_tw_add(&dom, slot, gen, fid, payload, sizeof(payload) - 1, TW_TWA_NONE,
                                 NULL, 0, -1, -1, 0, 0, 1);
            if (r < 0)
                fail("tw_add", (long)r);
            main_adds++;
            if (i % 32 == 31)
                ran += run_all();
        }
        struct itimerval off = { { 0, 0 }, { 0, 0 } };
        setitimer(ITIMER_REAL, &off, NULL);
        signal(SIGALRM, SIG_IGN);
        ran += run_all();
        if (h_fail != 0)
            fail("a tw_add_nmi in the handler failed", h_last_rc);
        if (h_done != h_due)
            fail("a due eventfd write was not done", h_due - h_done);
    }
    if (ran != h_ok + main_adds)
        fail("works lost or run twice", ran - (h_ok + main_adds));

    /* Exit the task: PF_EXITING, run until the head holds the sentinel. */
    p_tw_flags_set(&dom, slot, TW_F_EXITING);
    for (int k = 0; p_tw_slot_check(&dom, slot, gen) != -ESRCH; k++) {
        if (k > 1000)
            fail("the task did not reach the exited sentinel", k);
        ran += run_all();
    }
    rc = p_tw_add_nmi(&dom, slot, gen, fid, payload, 1, efd, 0, &dummy);
    if (rc != -ESRCH)
        fail("tw_add_nmi on the exited task is not -ESRCH", rc);
    p_tw_release_slot(&dom, slot, gen);
    p_tw_proc_release(&dom);
    printf("ok slot=%u handler_adds=%d main_adds=%d ran=%d resume_due=%d\n", slot, (int)h_ok,
           main_adds, ran, (int)h_due);
    p_tw_unmap(&dom);
    close(efd);
    return 0;
}
