/*
 * LD_PRELOAD shim for the benchmark's Janus: getifaddrs() reports only the loopback interface, and
 * without its IFF_LOOPBACK flag. Janus skips loopback interfaces when it gathers ICE candidates, which
 * would otherwise force media onto the machine's network address; with this shim it gathers 127.0.0.1
 * only, so all benchmark traffic stays on 127.0.0.0/8.
 *
 * Entries are flagged down rather than unlinked: glibc frees the list as one block from its head.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <stddef.h>

int getifaddrs(struct ifaddrs **ifap) {
    static int (*real)(struct ifaddrs **) = NULL;
    if (real == NULL)
        real = (int (*)(struct ifaddrs **))dlsym(RTLD_NEXT, "getifaddrs");
    int rc = real(ifap);
    if (rc != 0)
        return rc;
    for (struct ifaddrs *ifa = *ifap; ifa != NULL; ifa = ifa->ifa_next) {
        if (ifa->ifa_flags & IFF_LOOPBACK)
            ifa->ifa_flags = (ifa->ifa_flags & ~IFF_LOOPBACK) | IFF_UP | IFF_RUNNING;
        else
            ifa->ifa_flags &= ~(IFF_UP | IFF_RUNNING);
    }
    return 0;
}
