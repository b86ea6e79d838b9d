// SPDX-License-Identifier: MIT
/*
 * sys.c - layer 0, the system: the clock, /proc, eventfd, pidfd, futex and
 * tgkill wrappers. Calls nothing of the core; every other file may call it.
 */
#include "tw_internal.h"

#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <linux/futex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

uint64_t tw_now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t tw_proc_start_ticks(int pid)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *p = strrchr(buf, ')');   /* comm may hold spaces and parentheses */
    if (!p)
        return 0;
    /* after ')' come fields 3.. ; starttime is field 22 */
    int field = 2;
    for (p++; *p && field < 22; p++)
        if (*p == ' ')
            field++;
    return strtoull(p, NULL, 10);
}

int tw_eventfd_write(int efd)
{
    uint64_t one = 1;
    if (write(efd, &one, sizeof(one)) == sizeof(one))
        return 0;
    return errno == EAGAIN ? 0 : -errno;   /* EAGAIN: counter full, already readable */
}

int tw_eventfd_drain(int efd)
{
    uint64_t v;
    if (read(efd, &v, sizeof(v)) == sizeof(v))
        return 1;
    return errno == EAGAIN ? 0 : -errno;
}

int tw_pidfd_send(int pidfd, int signum)
{
    if (syscall(SYS_pidfd_send_signal, pidfd, signum, NULL, 0) == 0)
        return 0;
    return -errno;
}

int tw_pidfd_getfd(int pidfd, int targetfd)
{
    long r = syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
    return r < 0 ? -errno : (int)r;
}

void tw_futex_wake(uint32_t *word)
{
    /* Shared (no FUTEX_PRIVATE_FLAG): the word may be in the segment. EFAULT
     * (the segment was unmapped) is harmless. */
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

void tw_futex_wait(uint32_t *word, uint32_t val, const struct timespec *rel)
{
    syscall(SYS_futex, word, FUTEX_WAIT, val, rel, NULL, 0);
}

int tw_futex_wait_rc(uint32_t *word, uint32_t val, const struct timespec *rel)
{
    return syscall(SYS_futex, word, FUTEX_WAIT, val, rel, NULL, 0) == 0 ? 0 : -errno;
}

int tw_tgkill(int pid, int tid, int signum)
{
    return syscall(SYS_tgkill, pid, tid, signum) == 0 ? 0 : -errno;
}

int tw_thread_start_quiet(void *(*fn)(void *))
{
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&a, 64 * 1024);
    pthread_t th;
    int r = pthread_create(&th, &a, fn, NULL);
    pthread_attr_destroy(&a);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return -r;
}
