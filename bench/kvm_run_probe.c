/*
 * kvm_run_probe: an LD_PRELOAD shim for bench/startup.sh.
 *
 * It wraps libc's ioctl(). On the first KVM_RUN request (of any thread) it
 * writes CLOCK_MONOTONIC in nanoseconds, as decimal text, to the file named
 * by $KVM_RUN_PROBE_OUT, then (when $KVM_RUN_PROBE_KILL=1) SIGKILLs its own
 * process: the benchmark only wants the host-side start-up cost, and on a
 * host whose /dev/kvm cannot run the guest (PVM) there is nothing after it
 * worth waiting for. Otherwise the real ioctl() is called as usual.
 *
 * Built by bench/startup.sh:
 *   gcc -O2 -shared -fPIC -o target/bench/kvm_run_probe.so bench/kvm_run_probe.c -ldl
 * Never committed as a binary.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* _IO(KVMIO, 0x80), KVMIO = 0xAE; spelled out so no kernel headers are needed. */
#define PROBE_KVM_RUN 0xAE80UL

typedef int (*ioctl_fn)(int, unsigned long, ...);

static ioctl_fn real_ioctl;
static int fired;

static void record(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    const char *path = getenv("KVM_RUN_PROBE_OUT");
    if (path && *path) {
        char buf[32];
        int n = snprintf(buf, sizeof buf, "%lld\n",
                         (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd >= 0) {
            ssize_t w = write(fd, buf, (size_t)n);
            (void)w;
            close(fd);
        }
    }
    const char *kill_it = getenv("KVM_RUN_PROBE_KILL");
    if (kill_it && strcmp(kill_it, "1") == 0)
        kill(getpid(), SIGKILL);
}

/* glibc declares ioctl(int, unsigned long, ...); the third argument, when
 * there is one, is a pointer or an int, both passed in a register on x86_64,
 * so forwarding it as a pointer is exact. */
int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);

    if (!real_ioctl)
        real_ioctl = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    if ((request & 0xffffffffUL) == PROBE_KVM_RUN &&
        !__atomic_exchange_n(&fired, 1, __ATOMIC_SEQ_CST))
        record();
    return real_ioctl(fd, request, arg);
}
