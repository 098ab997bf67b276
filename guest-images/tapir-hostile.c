/* tapir-hostile: plays a hostile virtio-net driver from the test guest's userspace, to check that
 * nothing a guest does to its NIC can hang, bloat or crash the VMM.
 *
 * It drives a virtio-mmio NIC's registers and rings itself through /dev/mem (the test kernel has
 * CONFIG_DEVMEM without STRICT_DEVMEM), so the guest's virtio_net driver must be unbound from the
 * device first (echo virtio0 > /sys/bus/virtio/drivers/virtio_net/unbind). Rings and buffers live
 * in guest RAM the kernel does not use: boot the guest with mem= below its real memory and pass
 * that address as --ram (default 0xc000000, i.e. mem=192M).
 *
 *   tapir-hostile [--mmio ADDR] [--ram ADDR] [--seconds N] [--hold N] PATTERN...
 *
 * --hold N keeps the device as the last pattern left it for N seconds (printing HOSTILE-QUIET and
 * HOSTILE-QUIET-END around them), for a look at what the VMM does meanwhile. On the way out the
 * device is always reset, as the kernel's own driver expects to find it.
 *
 * PATTERN is one of avail-ahead, unset-queue, stash-flood, long-chain, ctrl-zero-status,
 * features-after-ok, bad-heads, reset-storm, or all. Each prints a line
 * "HOSTILE <pattern> <what the device did>" and leaves the device reset, except avail-ahead,
 * which leaves it as the broken driver left it. unset-queue and ctrl-zero-status need a NIC with
 * several queue pairs (a control queue). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define R_MAGIC 0x000
#define R_DEVICE_ID 0x008
#define R_DEV_FEATURES 0x010
#define R_DEV_FEATURES_SEL 0x014
#define R_DRV_FEATURES 0x020
#define R_DRV_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INT_STATUS 0x060
#define R_INT_ACK 0x064
#define R_STATUS 0x070
#define R_DESC_LO 0x080
#define R_DESC_HI 0x084
#define R_AVAIL_LO 0x090
#define R_AVAIL_HI 0x094
#define R_USED_LO 0x0a0
#define R_USED_HI 0x0a4

#define S_ACK 1u
#define S_DRIVER 2u
#define S_DRIVER_OK 4u
#define S_FEATURES_OK 8u
#define S_NEEDS_RESET 0x40u

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

#define QSIZE 256
#define RAM_SPAN (8u << 20)
/* Per queue: descriptors at +0, avail ring at +0x1000, used ring at +0x2000. */
#define QUEUE_SPAN 0x4000u
#define BUF_OFF 0x100000u

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static volatile uint32_t *regs;
static uint8_t *ram;
static uint64_t ram_phys;
static unsigned nqueues;
static uint64_t dev_features;
static int seconds = 5;
static int hold;

static uint32_t rd(unsigned off) { return regs[off / 4]; }
static void wr(unsigned off, uint32_t v)
{
    __sync_synchronize();
    regs[off / 4] = v;
    __sync_synchronize();
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t phys(const void *p) { return ram_phys + (uint64_t)((const uint8_t *)p - ram); }
static struct desc *desc_table(unsigned q) { return (struct desc *)(ram + q * QUEUE_SPAN); }
static volatile uint16_t *avail(unsigned q) { return (volatile uint16_t *)(ram + q * QUEUE_SPAN + 0x1000); }
static volatile uint16_t *used(unsigned q) { return (volatile uint16_t *)(ram + q * QUEUE_SPAN + 0x2000); }
static uint8_t *buf(unsigned off) { return ram + BUF_OFF + off; }

static void publish(unsigned q, uint16_t head)
{
    volatile uint16_t *a = avail(q);
    uint16_t idx = a[1];
    a[2 + idx % QSIZE] = head;
    __sync_synchronize();
    a[1] = (uint16_t)(idx + 1);
    __sync_synchronize();
}

static void notify(unsigned q) { wr(R_QUEUE_NOTIFY, q); }

/* Waits up to `ms` for queue q's used index to reach `want`; returns whether it did. */
static int wait_used(unsigned q, uint16_t want, int ms)
{
    double end = now() + ms / 1000.0;
    while (now() < end) {
        __sync_synchronize();
        if ((uint16_t)(used(q)[1] - want) < 0x8000)
            return 1;
        usleep(1000);
    }
    return 0;
}

static void reset(void)
{
    wr(R_STATUS, 0);
    memset(ram, 0, (nqueues ? nqueues : 1) * QUEUE_SPAN);
}

static void set_queue(unsigned q)
{
    wr(R_QUEUE_SEL, q);
    wr(R_QUEUE_NUM, QSIZE);
    uint64_t d = phys(desc_table(q)), a = phys((void *)avail(q)), u = phys((void *)used(q));
    wr(R_DESC_LO, (uint32_t)d);
    wr(R_DESC_HI, (uint32_t)(d >> 32));
    wr(R_AVAIL_LO, (uint32_t)a);
    wr(R_AVAIL_HI, (uint32_t)(a >> 32));
    wr(R_USED_LO, (uint32_t)u);
    wr(R_USED_HI, (uint32_t)(u >> 32));
    wr(R_QUEUE_READY, 1);
}

/* Resets the device and starts it with the features in `want` that it offers, setting up the
 * queues whose bit is in `queue_mask`. Returns the status read back. */
static uint32_t start(uint64_t want, uint64_t queue_mask)
{
    reset();
    wr(R_STATUS, S_ACK | S_DRIVER);
    uint64_t f = dev_features & want;
    wr(R_DRV_FEATURES_SEL, 0);
    wr(R_DRV_FEATURES, (uint32_t)f);
    wr(R_DRV_FEATURES_SEL, 1);
    wr(R_DRV_FEATURES, (uint32_t)(f >> 32));
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    for (unsigned q = 0; q < nqueues; q++)
        if (queue_mask & (1ull << q))
            set_queue(q);
    wr(R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return rd(R_STATUS);
}

#define VERSION_1 (1ull << 32)
#define MRG_RXBUF (1ull << 15)
#define CTRL_VQ (1ull << 17)
#define MQ (1ull << 22)
#define GSO_RX ((1ull << 1) | (1ull << 7) | (1ull << 8)) /* GUEST_CSUM, GUEST_TSO4/6 */
#define INDIRECT (1ull << 28)
#define BASIC (VERSION_1 | MRG_RXBUF | INDIRECT)

/* Whether a start left the device running; says so when it did not (the pattern's findings would
 * mean nothing then). */
static int started(const char *pattern, uint32_t status)
{
    if ((status & (S_DRIVER_OK | S_NEEDS_RESET)) == S_DRIVER_OK)
        return 1;
    printf("HOSTILE %s: the device did not start (status %#x)\n", pattern, status);
    reset();
    return 0;
}

static const char *needs_reset(void)
{
    return rd(R_STATUS) & S_NEEDS_RESET ? "DEVICE_NEEDS_RESET" : "no-NEEDS_RESET";
}

static int pattern_avail_ahead(void)
{
    for (unsigned q = 1;; q = 0) {
        if (!started("avail-ahead", start(BASIC, 3)))
            return 1;
        avail(q)[1] = 300; /* 300 chains "available" in a queue of 256 */
        for (int i = 0; i < 1000; i++)
            notify(q);
        usleep(200000);
        printf("HOSTILE avail-ahead queue %u: %s\n", q, needs_reset());
        if (q == 0)
            break;
    }
    /* Left as it is: a device that spun on this would go on spinning after the pattern. */
    return 0;
}

static int pattern_bad_heads(void)
{
    if (!started("bad-heads", start(BASIC, 3)))
        return 1;
    publish(1, 4000);
    publish(1, 65535);
    notify(1);
    usleep(200000);
    printf("HOSTILE bad-heads: %s\n", needs_reset());
    reset();
    return 0;
}

static int pattern_unset_queue(void)
{
    if (nqueues < 5) {
        /* One pair: leaving TX unset must refuse the start, not serve address 0. */
        start(BASIC, 1);
        printf("HOSTILE unset-queue (one pair, TX unset): %s\n", needs_reset());
        reset();
        return 0;
    }
    uint8_t low[64], after[64];
    int fd = open("/dev/mem", O_RDONLY | O_SYNC);
    if (fd < 0 || pread(fd, low, sizeof low, 0) != (ssize_t)sizeof low) {
        perror("tapir-hostile: reading guest address 0");
        return 1;
    }
    /* Pair 0 and the control queue set up, pair 1 left as reset made it. */
    if (!started("unset-queue", start(BASIC | CTRL_VQ | MQ, 1 | 2 | (1u << (nqueues - 1)))))
        return 1;
    double end = now() + seconds / 2.0;
    unsigned long kicks = 0;
    while (now() < end) {
        for (int i = 0; i < 1000; i++, kicks++)
            notify(2 + (i & 1));
    }
    /* Ask for both pairs: the device must refuse (pair 1 has no queues). */
    unsigned cq = nqueues - 1;
    struct desc *d = desc_table(cq);
    uint8_t *cmd = buf(0), *ack = buf(64);
    cmd[0] = 4; /* VIRTIO_NET_CTRL_MQ */
    cmd[1] = 0; /* VQ_PAIRS_SET */
    cmd[2] = 2;
    cmd[3] = 0;
    *ack = 0xee;
    d[0] = (struct desc){ phys(cmd), 4, F_NEXT, 1 };
    d[1] = (struct desc){ phys(ack), 1, F_WRITE, 0 };
    publish(cq, 0);
    notify(cq);
    int answered = wait_used(cq, 1, 2000);
    if (pread(fd, after, sizeof after, 0) != (ssize_t)sizeof after) {
        perror("tapir-hostile: reading guest address 0");
        return 1;
    }
    close(fd);
    printf("HOSTILE unset-queue: %lu kicks; address 0 %s; VQ_PAIRS_SET 2 %s (%u)\n", kicks,
           memcmp(low, after, sizeof low) ? "CHANGED" : "untouched",
           !answered ? "unanswered" : *ack == 1 ? "refused" : *ack == 0 ? "ACCEPTED" : "odd", *ack);
    reset();
    return 0;
}

static int pattern_stash_flood(void)
{
    if (!started("stash-flood", start(BASIC | GSO_RX, 3)))
        return 1;
    /* One 12-byte buffer behind indirect tables of 1000 entries each, the same heads posted
     * again and again for as long as the pattern runs; the host side sends frames meanwhile. */
    struct desc *table = (struct desc *)buf(0x1000);
    uint8_t *tiny = buf(0);
    for (int i = 0; i < 1000; i++)
        table[i] = (struct desc){ phys(tiny), 12, F_WRITE | (i < 999 ? F_NEXT : 0), (uint16_t)(i + 1) };
    struct desc *d = desc_table(0);
    for (int i = 0; i < 8; i++)
        d[i] = (struct desc){ phys(table), 1000 * sizeof(struct desc), F_INDIRECT, 0 };
    double end = now() + seconds;
    unsigned long posted = 0;
    while (now() < end) {
        volatile uint16_t *a = avail(0);
        while ((uint16_t)(a[1] - used(0)[1]) < QSIZE) {
            publish(0, (uint16_t)(posted++ % 8));
        }
        notify(0);
        usleep(1000);
    }
    printf("HOSTILE stash-flood: %lu chains posted, %u used; %s\n", posted, used(0)[1], needs_reset());
    reset();
    return 0;
}

static int pattern_long_chain(void)
{
    if (!started("long-chain", start(BASIC, 3)))
        return 1;
    /* TX: a 12-byte header then 2000 one-byte pieces, behind an indirect table. */
    struct desc *table = (struct desc *)buf(0x1000);
    uint8_t *frame = buf(0);
    memset(frame, 0, 12);
    for (int i = 0; i < 2001; i++)
        table[i] = (struct desc){ phys(frame) + (i ? 12 + i % 64 : 0), i ? 1 : 12,
                                  i < 2000 ? F_NEXT : 0, (uint16_t)(i + 1) };
    desc_table(1)[0] = (struct desc){ phys(table), 2001 * sizeof(struct desc), F_INDIRECT, 0 };
    double end = now() + seconds / 2.0;
    unsigned long sent = 0, empty = 0;
    while (now() < end) {
        publish(1, 0);
        notify(1);
        sent++;
        if (!wait_used(1, (uint16_t)sent, 1000))
            break;
        volatile uint32_t *elem = (volatile uint32_t *)(used(1) + 2) + 2 * ((sent - 1) % QSIZE);
        empty += elem[1] == 0;
    }
    printf("HOSTILE long-chain: %lu chains of 2001 buffers, %lu returned with length 0; %s\n", sent,
           empty, needs_reset());
    reset();
    return 0;
}

static int pattern_ctrl_zero_status(void)
{
    if (nqueues < 5) {
        printf("HOSTILE ctrl-zero-status: skipped (no control queue: give the NIC queues=2)\n");
        return 0;
    }
    unsigned cq = nqueues - 1;
    if (!started("ctrl-zero-status", start(BASIC | CTRL_VQ | MQ, 1 | 2 | 4 | 8 | (1u << cq))))
        return 1;
    uint8_t *cmd = buf(0), *ack = buf(64);
    cmd[0] = 4;
    cmd[1] = 0;
    cmd[2] = 2;
    cmd[3] = 0;
    *ack = 0xee;
    struct desc *d = desc_table(cq);
    d[0] = (struct desc){ phys(cmd), 4, F_NEXT, 1 };
    d[1] = (struct desc){ phys(ack), 0, F_WRITE, 0 };
    publish(cq, 0);
    notify(cq);
    int answered = wait_used(cq, 1, 2000);
    volatile uint32_t *elem = (volatile uint32_t *)(used(cq) + 2);
    printf("HOSTILE ctrl-zero-status: %s, used length %u, status byte %s\n",
           answered ? "returned" : "NOT RETURNED", elem[1], *ack == 0xee ? "untouched" : "WRITTEN");
    reset();
    return 0;
}

static int pattern_features_after_ok(void)
{
    uint32_t running = start(BASIC, 3);
    if (!started("features-after-ok", running))
        return 1;
    wr(R_STATUS, S_ACK);
    wr(R_DRV_FEATURES_SEL, 0);
    wr(R_DRV_FEATURES, (uint32_t)(dev_features & GSO_RX));
    wr(R_STATUS, S_ACK | S_FEATURES_OK);
    uint32_t after = rd(R_STATUS);
    printf("HOSTILE features-after-ok: status %#x before, %#x after: %s\n", running, after,
           after == running ? "renegotiation ignored" : "RENEGOTIATED");
    reset();
    return 0;
}

static int pattern_reset_storm(void)
{
    double end = now() + seconds;
    unsigned long rounds = 0;
    unsigned long refused = 0;
    while (now() < end) {
        uint32_t status = start(BASIC, 3);
        refused += (status & (S_DRIVER_OK | S_NEEDS_RESET)) != S_DRIVER_OK;
        notify(0);
        notify(1);
        rounds++;
    }
    printf("HOSTILE reset-storm: %lu starts and resets in %d s, %lu refused\n", rounds, seconds, refused);
    reset();
    return 0;
}

static const struct {
    const char *name;
    int (*run)(void);
} patterns[] = {
    { "avail-ahead", pattern_avail_ahead },
    { "unset-queue", pattern_unset_queue },
    { "stash-flood", pattern_stash_flood },
    { "long-chain", pattern_long_chain },
    { "ctrl-zero-status", pattern_ctrl_zero_status },
    { "features-after-ok", pattern_features_after_ok },
    { "bad-heads", pattern_bad_heads },
    { "reset-storm", pattern_reset_storm },
};
#define NPATTERNS (sizeof patterns / sizeof patterns[0])

static void usage(FILE *to)
{
    fprintf(to, "usage: tapir-hostile [--mmio ADDR] [--ram ADDR] [--seconds N] [--hold N] PATTERN...\n"
                "patterns: all");
    for (unsigned i = 0; i < NPATTERNS; i++)
        fprintf(to, " %s", patterns[i].name);
    fprintf(to, "\n");
}

int main(int argc, char **argv)
{
    uint64_t mmio = 0xd0000000, ramaddr = 0xc000000;
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i += 2) {
        if (i + 1 >= argc) {
            usage(stderr);
            return 2;
        }
        if (!strcmp(argv[i], "--mmio"))
            mmio = strtoull(argv[i + 1], NULL, 0);
        else if (!strcmp(argv[i], "--ram"))
            ramaddr = strtoull(argv[i + 1], NULL, 0);
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--hold"))
            hold = atoi(argv[i + 1]);
        else {
            usage(stderr);
            return 2;
        }
    }
    if (i >= argc) {
        usage(stderr);
        return 2;
    }
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0) {
        perror("tapir-hostile: /dev/mem");
        return 1;
    }
    regs = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)mmio);
    ram = mmap(NULL, RAM_SPAN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)ramaddr);
    if (regs == MAP_FAILED || ram == MAP_FAILED) {
        perror("tapir-hostile: mapping /dev/mem");
        return 1;
    }
    ram_phys = ramaddr;
    if (rd(R_MAGIC) != 0x74726976 || rd(R_DEVICE_ID) != 1) {
        fprintf(stderr, "tapir-hostile: no virtio-net device at %#llx\n", (unsigned long long)mmio);
        return 1;
    }
    reset();
    for (nqueues = 0; nqueues < 64; nqueues++) {
        wr(R_QUEUE_SEL, nqueues);
        if (rd(R_QUEUE_NUM_MAX) == 0)
            break;
    }
    wr(R_DEV_FEATURES_SEL, 0);
    dev_features = rd(R_DEV_FEATURES);
    wr(R_DEV_FEATURES_SEL, 1);
    dev_features |= (uint64_t)rd(R_DEV_FEATURES) << 32;
    printf("HOSTILE device: %u queues, features %#llx\n", nqueues, (unsigned long long)dev_features);
    int failed = 0;
    for (; i < argc; i++) {
        int found = 0;
        for (unsigned p = 0; p < NPATTERNS; p++) {
            if (!strcmp(argv[i], "all") || !strcmp(argv[i], patterns[p].name)) {
                found = 1;
                fflush(stdout);
                failed |= patterns[p].run();
                fflush(stdout);
            }
        }
        if (!found) {
            usage(stderr);
            return 2;
        }
    }
    if (hold > 0) {
        printf("HOSTILE-QUIET\n");
        fflush(stdout);
        sleep((unsigned)hold);
        printf("HOSTILE-QUIET-END\n");
        fflush(stdout);
    }
    reset();
    return failed;
}
