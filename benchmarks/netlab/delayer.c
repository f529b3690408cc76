/*
 * netlab delayer: holds every packet that an iptables NFQUEUE rule hands it for a per-source one-way delay (plus
 * random jitter), drops a share of them (loss), then lets the rest through (verdict ACCEPT).
 *
 * It runs inside one lab host's network namespace and serves that namespace's ingress queue, so the delay is added
 * where the packet arrives: a packet from host A to host B waits in B's delayer for delay(A) + delay(B).
 *
 *   delayer QUEUE_NUM RULES_FILE [SEED]
 *
 * RULES_FILE has one rule per line, re-read on SIGHUP (no restart, queued packets keep their release times):
 *   default DELAY_US JITTER_US LOSS_PPM
 *   src A.B.C.D DELAY_US JITTER_US LOSS_PPM
 * Jitter is uniform in [0, JITTER_US]; a packet is never released before an earlier packet of the same source, so
 * jitter does not reorder packets of a flow (it bunches them instead, like a real queue behind a slow hop).
 *
 * Build: gcc -O2 -o delayer delayer.c -lnetfilter_queue -lnfnetlink
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <netinet/ip.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_RULES 256
#define MAX_HELD (1 << 20)

typedef struct {
    uint32_t src; /* network byte order; 0 = default */
    int64_t delay_us, jitter_us;
    uint32_t loss_ppm;
    int64_t last_release_us; /* keeps packets of one source in order */
} rule_t;

typedef struct {
    int64_t release_us;
    uint64_t seq;
    uint32_t id;
} held_t;

static rule_t rules[MAX_RULES];
static int n_rules = 0;
static rule_t default_rule = {0, 0, 0, 0, 0};
static held_t *heap;
static size_t heap_len = 0;
static uint64_t seq_counter = 0;
static volatile sig_atomic_t reload = 0, stop = 0;
static const char *rules_path;
static uint64_t rng_state;
static struct nfq_q_handle *qh;
static uint64_t n_accepted = 0, n_dropped = 0, n_overflow = 0;

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static uint64_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static void load_rules(void) {
    FILE *f = fopen(rules_path, "r");
    if (!f) {
        fprintf(stderr, "delayer: cannot open %s: %s\n", rules_path, strerror(errno));
        return;
    }
    rule_t fresh[MAX_RULES];
    int n = 0;
    rule_t fresh_default = {0, 0, 0, 0, 0};
    char line[256], kind[16], addr[64];
    long long d, j;
    unsigned long loss;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "default %lld %lld %lu", &d, &j, &loss) == 3) {
            fresh_default.delay_us = d;
            fresh_default.jitter_us = j;
            fresh_default.loss_ppm = (uint32_t)loss;
        } else if (sscanf(line, "%15s %63s %lld %lld %lu", kind, addr, &d, &j, &loss) == 5 && !strcmp(kind, "src") &&
                   n < MAX_RULES) {
            struct in_addr a;
            if (inet_pton(AF_INET, addr, &a) != 1) continue;
            fresh[n].src = a.s_addr;
            fresh[n].delay_us = d;
            fresh[n].jitter_us = j;
            fresh[n].loss_ppm = (uint32_t)loss;
            fresh[n].last_release_us = 0;
            /* keep the order guarantee across reloads for sources we already knew */
            for (int i = 0; i < n_rules; i++)
                if (rules[i].src == a.s_addr) fresh[n].last_release_us = rules[i].last_release_us;
            n++;
        }
    }
    fclose(f);
    fresh_default.last_release_us = default_rule.last_release_us;
    memcpy(rules, fresh, sizeof(rule_t) * n);
    n_rules = n;
    default_rule = fresh_default;
    fprintf(stderr, "delayer: %d source rules loaded (default %lld us)\n", n, (long long)default_rule.delay_us);
}

static rule_t *rule_for(uint32_t src) {
    for (int i = 0; i < n_rules; i++)
        if (rules[i].src == src) return &rules[i];
    return &default_rule;
}

static int earlier(const held_t *a, const held_t *b) {
    return a->release_us < b->release_us || (a->release_us == b->release_us && a->seq < b->seq);
}

static void heap_push(held_t item) {
    size_t i = heap_len++;
    heap[i] = item;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!earlier(&heap[i], &heap[parent])) break;
        held_t t = heap[i];
        heap[i] = heap[parent];
        heap[parent] = t;
        i = parent;
    }
}

static held_t heap_pop(void) {
    held_t top = heap[0];
    heap[0] = heap[--heap_len];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_len && earlier(&heap[l], &heap[m])) m = l;
        if (r < heap_len && earlier(&heap[r], &heap[m])) m = r;
        if (m == i) break;
        held_t t = heap[i];
        heap[i] = heap[m];
        heap[m] = t;
        i = m;
    }
    return top;
}

static int on_packet(struct nfq_q_handle *q, struct nfgenmsg *msg, struct nfq_data *nfa, void *data) {
    (void)msg;
    (void)data;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (!ph) return 0;
    uint32_t id = ntohl(ph->packet_id);
    unsigned char *payload;
    int len = nfq_get_payload(nfa, &payload);
    uint32_t src = 0;
    if (len >= (int)sizeof(struct iphdr) && (payload[0] >> 4) == 4) src = ((struct iphdr *)payload)->saddr;
    rule_t *rule = rule_for(src);
    if (rule->loss_ppm && (rng_next() % 1000000) < rule->loss_ppm) {
        n_dropped++;
        return nfq_set_verdict(q, id, NF_DROP, 0, NULL);
    }
    int64_t delay = rule->delay_us;
    if (rule->jitter_us > 0) delay += (int64_t)(rng_next() % (uint64_t)(rule->jitter_us + 1));
    int64_t now = now_us();
    int64_t release = now + delay;
    if (release < rule->last_release_us) release = rule->last_release_us;
    rule->last_release_us = release;
    if (release <= now) {
        n_accepted++;
        return nfq_set_verdict(q, id, NF_ACCEPT, 0, NULL);
    }
    if (heap_len >= MAX_HELD) {
        n_overflow++;
        return nfq_set_verdict(q, id, NF_DROP, 0, NULL);
    }
    held_t item = {release, seq_counter++, id};
    heap_push(item);
    return 0;
}

static void release_due(void) {
    int64_t now = now_us();
    while (heap_len > 0 && heap[0].release_us <= now) {
        held_t item = heap_pop();
        nfq_set_verdict(qh, item.id, NF_ACCEPT, 0, NULL);
        n_accepted++;
    }
}

static void on_hup(int sig) {
    (void)sig;
    reload = 1;
}

static void on_term(int sig) {
    (void)sig;
    stop = 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s QUEUE_NUM RULES_FILE [SEED]\n", argv[0]);
        return 2;
    }
    int queue_num = atoi(argv[1]);
    rules_path = argv[2];
    rng_state = argc > 3 ? strtoull(argv[3], NULL, 10) : (uint64_t)now_us();
    if (!rng_state) rng_state = 88172645463325252ULL;
    /* a real-time priority keeps the added delay exact on a busy machine (the loop sleeps between packets) */
    struct sched_param sp = {.sched_priority = 10};
    if (sched_setscheduler(0, SCHED_FIFO, &sp) != 0) fprintf(stderr, "delayer: no real-time priority\n");
    heap = malloc(sizeof(held_t) * MAX_HELD);
    if (!heap) return 1;
    load_rules();

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_hup;
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    struct nfq_handle *h = nfq_open();
    if (!h) {
        fprintf(stderr, "delayer: nfq_open failed\n");
        return 1;
    }
    qh = nfq_create_queue(h, (uint16_t)queue_num, &on_packet, NULL);
    if (!qh) {
        fprintf(stderr, "delayer: cannot bind queue %d (another delayer on it?)\n", queue_num);
        return 1;
    }
    /* only the IPv4 header is needed: the source address picks the rule */
    if (nfq_set_mode(qh, NFQNL_COPY_PACKET, sizeof(struct iphdr)) < 0) {
        fprintf(stderr, "delayer: cannot set copy mode\n");
        return 1;
    }
    nfq_set_queue_maxlen(qh, MAX_HELD);
    int fd = nfq_fd(h);
    nfnl_rcvbufsiz(nfq_nfnlh(h), 64 * 1024 * 1024);
    /* a full socket buffer must not stop us (ENOBUFS): the kernel then drops, which TCP handles */
    int one = 1;
    setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
    fprintf(stderr, "delayer: ready on queue %d\n", queue_num);
    fflush(stderr);

    char buf[65536] __attribute__((aligned));
    while (!stop) {
        if (reload) {
            reload = 0;
            load_rules();
        }
        int timeout_ms = -1;
        if (heap_len > 0) {
            int64_t wait = heap[0].release_us - now_us();
            timeout_ms = wait <= 0 ? 0 : (int)((wait + 999) / 1000);
        }
        struct pollfd pfd = {fd, POLLIN, 0};
        int ready;
        if (timeout_ms != 0) {
            /* a millisecond-granular poll would add up to 1 ms; sleep to the exact time for the last stretch */
            if (heap_len > 0 && timeout_ms <= 2) {
                ready = poll(&pfd, 1, 0);
                if (ready == 0) {
                    int64_t wait = heap[0].release_us - now_us();
                    if (wait > 0) {
                        struct timespec ts = {0, (long)(wait > 200 ? 200 : wait) * 1000};
                        nanosleep(&ts, NULL);
                    }
                }
            } else {
                ready = poll(&pfd, 1, timeout_ms > 2 ? timeout_ms - 1 : timeout_ms);
            }
        } else {
            ready = poll(&pfd, 1, 0);
        }
        if (ready > 0 && (pfd.revents & POLLIN)) {
            /* drain what is there without blocking */
            for (int i = 0; i < 256; i++) {
                ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
                if (n <= 0) break;
                nfq_handle_packet(h, buf, (int)n);
            }
        }
        release_due();
    }
    /* let the held packets go rather than dropping them */
    while (heap_len > 0) {
        held_t item = heap_pop();
        nfq_set_verdict(qh, item.id, NF_ACCEPT, 0, NULL);
    }
    fprintf(stderr, "delayer: stopped; accepted %llu, dropped %llu (loss), %llu (overflow)\n",
            (unsigned long long)n_accepted, (unsigned long long)n_dropped, (unsigned long long)n_overflow);
    nfq_destroy_queue(qh);
    nfq_close(h);
    return 0;
}
