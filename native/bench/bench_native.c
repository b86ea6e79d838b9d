// SPDX-License-Identifier: MIT
/*
 * bench_native.c - `make bench-native`: the lock-free core alone, in one
 * thread, against the bare hardware operations it is built from.
 *
 *   bare cmpxchg       one `lock cmpxchg` per iteration (a CAS that succeeds)
 *   bare push+detach   a Treiber push (CAS) and a detach (xchg) of one node:
 *                      the two atomics the kernel's task_work_add/run need
 *   native push+detach tw_add (pool pop, fill, push, mark) + tw_detach (under
 *                      pi_lock: mark, CAS) + tw_run_load/start/finish (free):
 *                      one work's whole life in the core, no Python
 *   pool pop+push      tw_pool_pop + tw_pool_push of one node: the allocation
 *                      part of the above (the process's node cache, pool.c)
 *
 * Each figure is the median of 7 runs of N iterations (the native case a
 * quarter of N), in ns per iteration. Arguments: [N] [--json]; --json prints
 * one JSON object (what `shm-taskwork bench` reads) instead of the table.
 */
#define _GNU_SOURCE
#include "../tw_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define RUNS 7
#define N_DEFAULT 2000000
static uint64_t N = N_DEFAULT;

static volatile uint64_t word;
static double bare_cas(void)
{
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < N; i++) {
        uint64_t e = i;
        __atomic_compare_exchange_n(&word, &e, i + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    }
    return (double)(now_ns() - t0) / N;
}

static uint64_t lhead;
static uint64_t lnext;
static double bare_push_detach(void)
{
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < N; i++) {
        uint64_t h = __atomic_load_n(&lhead, __ATOMIC_RELAXED);
        do {
            lnext = h;
        } while (!__atomic_compare_exchange_n(&lhead, &h, 1, 0, __ATOMIC_RELEASE,
                                              __ATOMIC_RELAXED));
        (void)__atomic_exchange_n(&lhead, 0, __ATOMIC_ACQ_REL);
    }
    return (double)(now_ns() - t0) / N;
}

static struct tw_dom D;
static uint32_t slot, gen;
static double native_push_detach(void)
{
    uint32_t node;
    uint64_t rec[TW_REC_WORDS + 2];   /* one work, and tw_run_load's two trailing words */
    char parea[64];
    uint8_t outc;
    uint64_t n_ = N / 4 ? N / 4 : 1;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < n_; i++) {
        int64_t r = tw_add(&D, slot, gen, 1, "payload!", 8, TW_TWA_NONE, NULL, 0, -1, -1, 0,
                           1, 1);
        if (r < 0 || tw_detach(&D, slot, gen, &node, 1) != 1 ||
            tw_run_load(&D, slot, &node, 1, rec, parea, NULL, &outc) != 1 ||
            tw_run_start(&D, slot, node) != 0 ||
            tw_run_finish(&D, slot, &node, 1, &outc, NULL) != 1) {
            fprintf(stderr, "native op failed (%lld)\n", (long long)r);
            exit(1);
        }
    }
    return (double)(now_ns() - t0) / n_;
}

static double pool_pop_push(void)
{
    uint32_t node;
    uint64_t t0 = now_ns();
    for (uint64_t i = 0; i < N; i++) {
        if (tw_pool_pop(&D, &node) != 0) {
            fprintf(stderr, "pool pop failed\n");
            exit(1);
        }
        tw_pool_push(&D, node);
    }
    return (double)(now_ns() - t0) / N;
}

static double median(double (*fn)(void))
{
    double v[RUNS];
    for (int i = 0; i < RUNS; i++)
        v[i] = fn();
    qsort(v, RUNS, sizeof(v[0]), cmp);
    return v[RUNS / 2];
}

int main(int argc, char **argv)
{
    int json = 0;
    for (int i = 1; i < argc; i++) {
        char *end;
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
            continue;
        }
        unsigned long long v = strtoull(argv[i], &end, 10);
        if (*end || v < 1 || v > 1000000000ull) {
            fprintf(stderr, "usage: %s [iterations 1..1000000000] [--json]\n", argv[0]);
            return 2;
        }
        N = v;
    }
    uint32_t pool = 1024, outcomes = 64;
    uint64_t size = tw_layout_size(4, pool, 64, 32, 64, 0, outcomes);
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED ||
        tw_format(base, size, 4, pool, 64, 32, 64, 0, outcomes, now_ns()) < 0 ||
        tw_attach(&D, base, size) < 0) {
        fprintf(stderr, "cannot make a segment\n");
        return 1;
    }
    int s = tw_register(&D, "bench", 0, 10, -1, 0, now_ns(), &gen);
    if (s < 0) {
        fprintf(stderr, "cannot register: %d\n", s);
        return 1;
    }
    slot = (uint32_t)s;
    double cas = median(bare_cas), pd = median(bare_push_detach), nat = median(native_push_detach);
    double pp = median(pool_pop_push);
    if (json) {
        printf("{\"iterations\": %llu, \"bare_cmpxchg_ns\": %.2f, \"bare_push_detach_ns\": %.2f, "
               "\"native_push_detach_ns\": %.2f, \"pool_pop_push_ns\": %.2f}\n",
               (unsigned long long)N, cas, pd, nat, pp);
        return 0;
    }
    printf("%-22s %8.1f ns\n", "bare cmpxchg", cas);
    printf("%-22s %8.1f ns\n", "bare push+detach", pd);
    printf("%-22s %8.1f ns  (%.2fx bare push+detach, %.2fx bare cmpxchg)\n",
           "native push+detach", nat, nat / pd, nat / cas);
    printf("%-22s %8.1f ns  (%.2fx bare cmpxchg)\n", "pool pop+push", pp, pp / cas);
    return 0;
}
