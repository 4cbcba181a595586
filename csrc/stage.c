/* aegis-stage: broadcast a directory or file from a shared filesystem to node-local storage
 * over MPI. One rank per node writes; chunks flow around a ring of node leaders, every
 * leader reads its share of the source, several chunks are in flight at once and I/O
 * threads read, checksum and write while the main thread drives MPI.
 * The protocol, options and marker format match aegis/staging/mpi_stage.py; see docs/stage.md. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <getopt.h>
#include <limits.h>
#include <mpi.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "manifest.h"
#include "sha256.h"

#define TRAILER 16
#define MAX_FAIL_LINES 20
#define LOCK_REPORT_S 30 /* how often a staging waiting for another one says so */
#define HEARTBEAT_S 1    /* how often a lock holder writes its progress into the lock file */
#define SILENT_S 3       /* a holder whose heartbeat is this old is stopped or hung, not merely idle */

/* ---------------------------------------------------------------- options */
static struct {
    const char *src, *dest;
    uint64_t chunk;
    int window, threads, verify, force, unpack, json, per_rank;
    const char *hf_repo, *hf_revision;
    const char *private_dir; /* DEST's ancestor that must be this user's alone (0700) */
    int lock_timeout;        /* seconds to wait for another staging into DEST */
    int lock_stall;          /* give up early when that staging has made no progress for this long (0: never) */
} O = {NULL, NULL, 16ull << 20, 8, 4, 0, 0, 0, 0, 0, NULL, NULL, NULL, 1800, 300};

/* ---------------------------------------------------------------- node state */
typedef struct {
    int fd, done;
    uint64_t written;
    pthread_mutex_t mu;
} fstate_t;

static struct {
    int wrank, wsize, lrank, nleaders, leader;
    MPI_Comm leaders;
    char host[256];
    int single;            /* SRC is a single file */
    char dest[PATH_MAX];   /* DEST with {rank}/{node}/{host} expanded */
    char root[PATH_MAX];   /* directory the manifest paths are relative to */
    char marker[PATH_MAX];
    char record[PATH_MAX]; /* what aegis wrote into a directory DEST: the manifest (empty: a file DEST) */
    char hf_model[PATH_MAX], hf_rev[128];
    manifest_t m;
    char digest[65], key[65];
    stream_t full;         /* every file with bytes: what the marker's chunk CRCs cover */
    stream_t tx;           /* the files this staging sends over the ring (all on a first staging) */
    uint64_t K, KT;        /* chunks of full and of tx */
    uint32_t *crc;         /* CRC-32 of each chunk of full (the marker's) */
    uint32_t *txcrc;       /* CRC-32 of each chunk of tx, as its reader computed it */
    unsigned char *send;   /* send[i]: some node writes file i, so it goes over the ring */
    size_t files_sent;
    int sent;              /* the ring ran (not every node skipped) */
    unsigned char *known;  /* known[k]: this node's last marker holds the CRC-32 of chunk k (lastcrc[k]) */
    uint32_t *lastcrc;
    uint64_t summed;       /* chunks of files not sent whose CRC-32 was computed from SRC for the marker */
    fstate_t *fs;
    int *need;             /* need[i]: this node writes entry i (it is missing or differs at DEST) */
    int skip, failed, prepared, resend_all;
    int lock_fd, lock_lost; /* lock_lost: another staging holds the lock file */
    char lock_file[PATH_MAX];
    char reason[1024];
    pthread_mutex_t mu;
    double t_read, t_write, t_cksum, t_net, t_verify, t_total;
    long repaired;
    int corrupt_rank;
    int64_t corrupt_chunk;
    int write_delay_ms;    /* test hook: slow every chunk write down */
    uint64_t progress;     /* bytes this node has moved or checked so far (atomic), shown to a waiting staging */
    const char *phase;     /* what this node is doing (atomic); "peers": waiting for the other nodes */
} S = {.mu = PTHREAD_MUTEX_INITIALIZER, .phase = "start", .corrupt_chunk = -1, .corrupt_rank = -1, .lock_fd = -1};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Progress for the lock file's heartbeat (any thread). */
static void add_progress(uint64_t n)
{
    __atomic_add_fetch(&S.progress, n, __ATOMIC_RELAXED);
}

static void set_phase(const char *phase)
{
    __atomic_store_n(&S.phase, phase, __ATOMIC_RELAXED);
}

static void add_time(double *slot, double t0)
{
    double dt = now() - t0;
    pthread_mutex_lock(&S.mu);
    *slot += dt;
    pthread_mutex_unlock(&S.mu);
}

/* Mark this node failed; the first reason is kept. */
static void node_fail(const char *fmt, ...)
{
    pthread_mutex_lock(&S.mu);
    if (!S.failed) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(S.reason, sizeof S.reason, fmt, ap);
        va_end(ap);
        S.failed = 1;
    }
    pthread_mutex_unlock(&S.mu);
}

static int failed(void)
{
    pthread_mutex_lock(&S.mu);
    int f = S.failed;
    pthread_mutex_unlock(&S.mu);
    return f;
}

static void die_usage(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "aegis: error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static uint64_t stream_chunk_len(const stream_t *s, uint64_t k)
{
    uint64_t start = k * O.chunk;
    return s->total - start < O.chunk ? s->total - start : O.chunk;
}

/* Length of chunk k of the whole stream. */
static uint64_t chunk_len(uint64_t k)
{
    return stream_chunk_len(&S.full, k);
}

/* ---------------------------------------------------------------- paths */
static void join(char *out, const char *a, const char *b)
{
    if (snprintf(out, PATH_MAX, "%s/%s", a, b) >= PATH_MAX)
        out[PATH_MAX - 1] = '\0';
}

static void tmp_name(char *out, size_t i)
{
    const char *path = S.m.e[i].path, *slash = strrchr(path, '/');
    char rel[PATH_MAX];
    if (slash)
        snprintf(rel, sizeof rel, "%.*s/.aegis-part.%.8s.%zu", (int)(slash - path), path, S.digest, i);
    else
        snprintf(rel, sizeof rel, ".aegis-part.%.8s.%zu", S.digest, i);
    join(out, S.root, rel);
}

static int mkdirs(const char *path, char *err, size_t errlen)
{
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            if (mkdir(buf, 0755) != 0 && errno != EEXIST) {
                snprintf(err, errlen, "cannot create directory %s: %s", buf, strerror(errno));
                return -1;
            }
            struct stat st;
            if (stat(buf, &st) != 0) {
                snprintf(err, errlen, "cannot create directory %s: %s", buf, strerror(errno));
                return -1;
            }
            if (!S_ISDIR(st.st_mode)) {
                snprintf(err, errlen, "cannot create directory %s: a file is in the way", buf);
                return -1;
            }
            *p = c;
            if (c == '\0')
                break;
        }
    }
    return 0;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    return remove(p) == 0 || errno == ENOENT ? 0 : -1;
}

static int rm_rf(const char *path)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return 0;
    return nftw(path, rm_one, 32, FTW_DEPTH | FTW_PHYS);
}

/* Expand {rank}, {node} and {host} in DEST. */
static void expand_dest(const char *in, char *out)
{
    char *o = out, *end = out + PATH_MAX - 1;
    while (*in && o < end) {
        char val[300] = "";
        int skip = 0;
        if (!strncmp(in, "{rank}", 6)) { snprintf(val, sizeof val, "%d", S.wrank); skip = 6; }
        else if (!strncmp(in, "{node}", 6)) { snprintf(val, sizeof val, "%d", S.lrank); skip = 6; }
        else if (!strncmp(in, "{host}", 6)) { snprintf(val, sizeof val, "%s", S.host); skip = 6; }
        if (skip) {
            o += snprintf(o, end - o, "%s", val);
            in += skip;
        } else {
            *o++ = *in++;
        }
    }
    *o = '\0';
}

/* ---------------------------------------------------------------- reading chunks */
typedef struct { const char *base; int single; unsigned char *buf; char *err; size_t errlen; } rd_t;

static int read_piece(const piece_t *pc, void *arg)
{
    rd_t *r = arg;
    char path[PATH_MAX];
    if (r->single)
        snprintf(path, sizeof path, "%s", r->base);
    else
        join(path, r->base, S.m.e[pc->entry].path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        snprintf(r->err, r->errlen, "cannot open %s: %s", path, strerror(errno));
        return -1;
    }
    uint64_t done = 0;
    while (done < pc->len) {
        ssize_t n = pread(fd, r->buf + pc->buf_off + done, pc->len - done, pc->off + done);
        if (n <= 0) {
            snprintf(r->err, r->errlen, "cannot read %s: %s", path, n == 0 ? "file shrank while staging" : strerror(errno));
            close(fd);
            return -1;
        }
        done += n;
    }
    close(fd);
    return 0;
}

/* Read chunk k of stream st of the tree (or file) at base into buf. */
static int read_chunk(const stream_t *st, const char *base, int single, uint64_t k, unsigned char *buf, char *err,
                      size_t errlen)
{
    rd_t r = {base, single, buf, err, errlen};
    return stream_pieces(&S.m, st, k * O.chunk, k * O.chunk + stream_chunk_len(st, k), read_piece, &r);
}

static uint32_t crc_of(const unsigned char *buf, uint64_t len)
{
    uLong c = crc32(0L, Z_NULL, 0);
    while (len > 0) {
        uInt take = len > (1u << 30) ? (1u << 30) : (uInt)len;
        c = crc32(c, buf, take);
        buf += take;
        len -= take;
    }
    return (uint32_t)c;
}

/* ---------------------------------------------------------------- writing chunks */
typedef struct { const unsigned char *buf; } wr_t;

static int write_piece(const piece_t *pc, void *arg)
{
    wr_t *w = arg;
    fstate_t *f = &S.fs[pc->entry];
    const entry_t *e = &S.m.e[pc->entry];
    char tmp[PATH_MAX];
    if (!S.need[pc->entry])
        return 0; /* already at DEST as SRC has it */
    pthread_mutex_lock(&f->mu);
    if (f->fd < 0 && !f->done) {
        tmp_name(tmp, pc->entry);
        f->fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (f->fd < 0) {
            pthread_mutex_unlock(&f->mu);
            node_fail("cannot create %s: %s", tmp, strerror(errno));
            return -1;
        }
        int rc = posix_fallocate(f->fd, 0, (off_t)e->size);
        if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL) {
            pthread_mutex_unlock(&f->mu);
            node_fail("cannot allocate %llu bytes for %s: %s", (unsigned long long)e->size, tmp, strerror(rc));
            return -1;
        }
    }
    int fd = f->fd;
    pthread_mutex_unlock(&f->mu);
    uint64_t done = 0;
    while (done < pc->len) {
        ssize_t n = pwrite(fd, w->buf + pc->buf_off + done, pc->len - done, pc->off + done);
        if (n < 0) {
            tmp_name(tmp, pc->entry);
            node_fail("cannot write %s: %s", tmp, strerror(errno));
            return -1;
        }
        done += n;
    }
    pthread_mutex_lock(&f->mu);
    f->written += pc->len;
    if (f->written == e->size && f->fd >= 0) {
        if (close(f->fd) != 0) {
            tmp_name(tmp, pc->entry);
            node_fail("cannot write %s: %s", tmp, strerror(errno));
        }
        f->fd = -1;
        f->done = 1;
    }
    pthread_mutex_unlock(&f->mu);
    return 0;
}

static int need_piece(const piece_t *pc, void *arg)
{
    (void)arg;
    return S.need[pc->entry];
}

/* Does this node write any byte of chunk k of the ring's stream? */
static int chunk_needed(uint64_t k)
{
    return stream_pieces(&S.m, &S.tx, k * O.chunk, k * O.chunk + stream_chunk_len(&S.tx, k), need_piece, NULL) != 0;
}

/* ---------------------------------------------------------------- I/O threads */
enum { JOB_READ = 1, JOB_WRITE = 2 };
typedef struct { int type, slot; } job_t;

typedef struct {
    unsigned char *buf;
    int64_t k;
    int reading, receiving, sending, writing;
} slot_t;

static slot_t *slots;
static job_t *jobq, *doneq;
static size_t jq_head, jq_n, dq_n, q_cap;
static int pool_stop;
static pthread_mutex_t qmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qcv = PTHREAD_COND_INITIALIZER, dcv = PTHREAD_COND_INITIALIZER;

static void push_job(int type, int slot)
{
    pthread_mutex_lock(&qmu);
    jobq[(jq_head + jq_n++) % q_cap] = (job_t){type, slot};
    pthread_cond_signal(&qcv);
    pthread_mutex_unlock(&qmu);
}

static void do_read(slot_t *s)
{
    uint64_t len = stream_chunk_len(&S.tx, s->k);
    uint32_t flags = 0, crc = 0;
    char err[300] = "";
    double t0 = now();
    if (read_chunk(&S.tx, O.src, S.single, s->k, s->buf, err, sizeof err) != 0) {
        flags = 1;
        char msg[400];
        snprintf(msg, sizeof msg, "rank %d on %s: %s", S.wrank, S.host, err);
        memset(s->buf, 0, len);
        memcpy(s->buf, msg, strlen(msg) + 1 < len ? strlen(msg) + 1 : len);
    }
    add_time(&S.t_read, t0);
    t0 = now();
    crc = crc_of(s->buf, len);
    add_time(&S.t_cksum, t0);
    if (s->k == S.corrupt_chunk && (S.corrupt_rank < 0 || S.corrupt_rank == S.wrank) && len > 0)
        s->buf[len / 2] ^= 0x5a; /* test hook: damage the data after the checksum was taken */
    uint64_t k = (uint64_t)s->k;
    memcpy(s->buf + len, &k, 8);
    memcpy(s->buf + len + 8, &crc, 4);
    memcpy(s->buf + len + 12, &flags, 4);
}

static void do_write(slot_t *s)
{
    uint64_t len = stream_chunk_len(&S.tx, s->k), k;
    uint32_t crc, flags;
    memcpy(&k, s->buf + len, 8);
    memcpy(&crc, s->buf + len + 8, 4);
    memcpy(&flags, s->buf + len + 12, 4);
    S.txcrc[s->k] = crc;
    if (k != (uint64_t)s->k) {
        node_fail("protocol error: expected chunk %lld, received %llu", (long long)s->k, (unsigned long long)k);
        return;
    }
    if (S.skip || failed())
        return;
    if (flags & 1) {
        char msg[300];
        snprintf(msg, sizeof msg, "%.*s", (int)(len < 299 ? len : 299), (const char *)s->buf);
        node_fail("SRC could not be read (%s)", msg);
        return;
    }
    if (!chunk_needed((uint64_t)s->k))
        return;
    if (S.write_delay_ms > 0)
        usleep(S.write_delay_ms * 1000);
    double t0 = now();
    uint32_t got = crc_of(s->buf, len);
    add_time(&S.t_cksum, t0);
    const unsigned char *data = s->buf;
    unsigned char *fix = NULL;
    if (got != crc) {
        /* Damaged in transit: re-read this chunk from SRC (a shared filesystem) here. */
        char err[300] = "";
        fix = malloc(len ? len : 1);
        if (!fix || read_chunk(&S.tx, O.src, S.single, s->k, fix, err, sizeof err) != 0) {
            node_fail("chunk %lld failed its checksum and could not be re-read from SRC: %s",
                      (long long)s->k, err);
            free(fix);
            return;
        }
        if (crc_of(fix, len) != crc) {
            node_fail("chunk %lld failed its checksum and SRC now differs too (SRC changed while staging?)",
                      (long long)s->k);
            free(fix);
            return;
        }
        fprintf(stderr, "aegis-stage: %s (rank %d): chunk %lld failed its checksum; re-read from SRC\n",
                S.host, S.wrank, (long long)s->k);
        pthread_mutex_lock(&S.mu);
        S.repaired++;
        pthread_mutex_unlock(&S.mu);
        data = fix;
    }
    t0 = now();
    wr_t w = {data};
    stream_pieces(&S.m, &S.tx, s->k * O.chunk, s->k * O.chunk + len, write_piece, &w);
    add_time(&S.t_write, t0);
    free(fix);
}

static void *worker(void *arg)
{
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&qmu);
        while (jq_n == 0 && !pool_stop)
            pthread_cond_wait(&qcv, &qmu);
        if (jq_n == 0 && pool_stop) {
            pthread_mutex_unlock(&qmu);
            return NULL;
        }
        job_t j = jobq[jq_head];
        jq_head = (jq_head + 1) % q_cap;
        jq_n--;
        pthread_mutex_unlock(&qmu);
        if (j.type == JOB_READ)
            do_read(&slots[j.slot]);
        else
            do_write(&slots[j.slot]);
        pthread_mutex_lock(&qmu);
        doneq[dq_n++] = j;
        pthread_cond_signal(&dcv);
        pthread_mutex_unlock(&qmu);
    }
}

/* ---------------------------------------------------------------- the ring transfer */
static void transfer(void)
{
    int W = O.window, n = S.nleaders;
    int left = (S.lrank + n - 1) % n, right = (S.lrank + 1) % n;
    q_cap = 2 * (size_t)W + 4;
    slots = calloc(W, sizeof *slots);
    jobq = calloc(q_cap, sizeof *jobq);
    doneq = calloc(q_cap, sizeof *doneq);
    job_t *done_local = calloc(q_cap, sizeof *done_local);
    MPI_Request *req = malloc(2 * W * sizeof *req);
    int *idx = malloc(2 * W * sizeof *idx);
    for (int i = 0; i < W; i++) {
        if (posix_memalign((void **)&slots[i].buf, 4096, O.chunk + TRAILER) != 0) {
            fprintf(stderr, "aegis: error: out of memory for %d chunk buffers of %llu bytes; lower --window or "
                    "--chunk-size\n", W, (unsigned long long)O.chunk);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        slots[i].k = -1;
        req[i] = req[W + i] = MPI_REQUEST_NULL;
    }
    pthread_t *th = calloc(O.threads, sizeof *th);
    pool_stop = 0;
    for (int i = 0; i < O.threads; i++)
        pthread_create(&th[i], NULL, worker, NULL);
    int poll_us = getenv("AEGIS_STAGE_POLL_US") ? atoi(getenv("AEGIS_STAGE_POLL_US")) : 50;

    double t0 = now();
    uint64_t next = 0, finished = 0;
    while (finished < S.KT) {
        int progress = 0;
        while (next < S.KT) {
            int i = (int)(next % W);
            slot_t *s = &slots[i];
            if (s->k >= 0)
                break;
            s->k = (int64_t)next;
            if ((int)(next % n) == S.lrank) {
                s->reading = 1;
                push_job(JOB_READ, i);
            } else {
                s->receiving = 1;
                MPI_Irecv(s->buf, (int)(stream_chunk_len(&S.tx, next) + TRAILER), MPI_BYTE, left, (int)(next % 32768),
                          S.leaders, &req[i]);
            }
            next++;
            progress = 1;
        }
        int outcount = 0;
        MPI_Testsome(2 * W, req, &outcount, idx, MPI_STATUSES_IGNORE);
        for (int j = 0; outcount != MPI_UNDEFINED && j < outcount; j++) {
            int i = idx[j] % W;
            slot_t *s = &slots[i];
            progress = 1;
            if (idx[j] >= W) {
                s->sending = 0;
                continue;
            }
            s->receiving = 0;
            if ((int)(s->k % n) != right) {
                s->sending = 1;
                MPI_Isend(s->buf, (int)(stream_chunk_len(&S.tx, s->k) + TRAILER), MPI_BYTE, right, (int)(s->k % 32768),
                          S.leaders, &req[W + i]);
            }
            s->writing = 1;
            push_job(JOB_WRITE, i);
        }
        pthread_mutex_lock(&qmu);
        if (dq_n == 0 && !progress) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += poll_us * 1000L;
            if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
            pthread_cond_timedwait(&dcv, &qmu, &ts);
        }
        size_t nd = dq_n;
        memcpy(done_local, doneq, nd * sizeof *doneq);
        dq_n = 0;
        pthread_mutex_unlock(&qmu);
        for (size_t j = 0; j < nd; j++) {
            slot_t *s = &slots[done_local[j].slot];
            if (done_local[j].type == JOB_READ) {
                s->reading = 0;
                if (n > 1) {
                    s->sending = 1;
                    MPI_Isend(s->buf, (int)(stream_chunk_len(&S.tx, s->k) + TRAILER), MPI_BYTE, right,
                              (int)(s->k % 32768), S.leaders, &req[W + done_local[j].slot]);
                }
                s->writing = 1;
                push_job(JOB_WRITE, done_local[j].slot);
            } else {
                s->writing = 0;
            }
        }
        for (int i = 0; i < W; i++) {
            slot_t *s = &slots[i];
            if (s->k >= 0 && !s->reading && !s->receiving && !s->sending && !s->writing) {
                add_progress(stream_chunk_len(&S.tx, (uint64_t)s->k));
                s->k = -1;
                finished++;
                progress = 1;
            }
        }
    }
    S.t_net = now() - t0;
    pthread_mutex_lock(&qmu);
    pool_stop = 1;
    pthread_cond_broadcast(&qcv);
    pthread_mutex_unlock(&qmu);
    for (int i = 0; i < O.threads; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < W; i++)
        free(slots[i].buf);
    free(slots); free(jobq); free(doneq); free(done_local); free(req); free(idx); free(th);
}

/* ---------------------------------------------------------------- checksum passes */
typedef struct {
    const char *base;
    int single, stride, first, nthreads, tid;
    uint64_t K;
    uint32_t *out;
    int64_t bad; /* verify: first differing chunk */
    const uint32_t *expect;
    const unsigned char *only; /* only the chunks k with only[k] (NULL: all) */
    char err[300];
} pass_t;

static void *pass_worker(void *arg)
{
    pass_t *p = arg;
    unsigned char *buf = malloc(O.chunk ? O.chunk : 1);
    for (uint64_t k = p->first + (uint64_t)p->stride * p->tid; k < p->K; k += (uint64_t)p->stride * p->nthreads) {
        if (p->only && !p->only[k])
            continue;
        if (read_chunk(&S.full, p->base, p->single, k, buf, p->err, sizeof p->err) != 0) {
            p->bad = (int64_t)k;
            break;
        }
        uint32_t c = crc_of(buf, chunk_len(k));
        add_progress(chunk_len(k));
        if (p->out)
            p->out[k] = c;
        if (p->expect && p->expect[k] != c) {
            p->bad = (int64_t)k;
            snprintf(p->err, sizeof p->err, "chunk %llu differs from what was sent", (unsigned long long)k);
            break;
        }
    }
    free(buf);
    return NULL;
}

/* Checksum chunks first, first+stride, ... of the stream at base (those in only, when given); compare with
 * expect when given. Returns -1 on success, else the first bad chunk (err filled). */
static int64_t crc_pass(const char *base, int single, int stride, int first, uint32_t *out,
                        const uint32_t *expect, const unsigned char *only, char *err, size_t errlen)
{
    int T = O.threads;
    pthread_t *th = calloc(T, sizeof *th);
    pass_t *ps = calloc(T, sizeof *ps);
    for (int t = 0; t < T; t++) {
        ps[t] = (pass_t){base, single, stride, first, T, t, S.K, out, -1, expect, only, ""};
        pthread_create(&th[t], NULL, pass_worker, &ps[t]);
    }
    int64_t bad = -1;
    for (int t = 0; t < T; t++) {
        pthread_join(th[t], NULL);
        if (ps[t].bad >= 0 && (bad < 0 || ps[t].bad < bad)) {
            bad = ps[t].bad;
            snprintf(err, errlen, "%s", ps[t].err);
        }
    }
    free(th);
    free(ps);
    return bad;
}

/* ---------------------------------------------------------------- marker */
static char *crc_hex(const uint32_t *crc, uint64_t K)
{
    char *s = malloc(8 * K + 1);
    for (uint64_t k = 0; k < K; k++)
        snprintf(s + 8 * k, 9, "%08x", crc[k]);
    s[8 * K] = '\0';
    return s;
}

static void content_key(void)
{
    char *hex = crc_hex(S.crc, S.K);
    size_t n = strlen(hex) + 64;
    char *buf = malloc(n);
    int len = snprintf(buf, n, "%llu %llu %s", (unsigned long long)S.m.total, (unsigned long long)O.chunk, hex);
    sha256_hex(buf, len, S.key);
    free(buf);
    free(hex);
}

/* Write len bytes to path under a temporary name, then rename it into place. */
static int write_atomic(const char *path, const char *text, size_t len)
{
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s.aegis-part", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return -1;
    size_t put = fwrite(text, 1, len, f);
    if (fclose(f) != 0 || put != len || rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        errno = e;
        return -1;
    }
    return 0;
}

static int write_marker(const char *path)
{
    char *hex = crc_hex(S.crc, S.K), *text;
    int len = asprintf(&text, "{\"aegis_stage\": 1, \"manifest_sha256\": \"%s\", \"content_key\": \"%s\", "
                       "\"bytes\": %llu, \"files\": %zu, \"chunk_size\": %llu, \"crc32\": \"%s\"}\n",
                       S.digest, S.key, (unsigned long long)S.m.total, S.m.nfiles, (unsigned long long)O.chunk, hex);
    free(hex);
    if (len < 0)
        return -1;
    int rc = write_atomic(path, text, (size_t)len);
    free(text);
    return rc;
}

/* The record of what aegis wrote into a directory DEST: this staging's manifest, written before any
 * file of it is (so it always covers what may be there), read by the next staging to remove what SRC
 * no longer has. */
static int write_record(void)
{
    size_t len;
    char *text = manifest_serialize(&S.m, &len);
    int rc = write_atomic(S.record, text, len);
    free(text);
    return rc;
}

/* The record's manifest (and, with digest, the SHA-256 of its bytes). */
static int read_record(manifest_t *old, char *digest)
{
    memset(old, 0, sizeof *old);
    FILE *f = S.record[0] ? fopen(S.record, "r") : NULL;
    if (!f)
        return -1;
    struct stat st;
    char *text = fstat(fileno(f), &st) == 0 ? malloc(st.st_size + 1) : NULL;
    size_t got = text ? fread(text, 1, st.st_size, f) : 0;
    fclose(f);
    int rc = text && got == (size_t)st.st_size ? manifest_parse(text, got, old) : -1;
    if (rc == 0 && digest)
        sha256_hex(text, got, digest);
    free(text);
    return rc;
}

/* Read a string or integer field from a marker written by write_marker (or json.dumps). */
static char *marker_field(const char *text, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(text, pat);
    if (!p)
        return NULL;
    p += strlen(pat);
    const char *q;
    if (*p == '"') {
        p++;
        q = strchr(p, '"');
    } else {
        q = p + strspn(p, "0123456789");
    }
    return q ? strndup(p, q - p) : NULL;
}

typedef struct { char *digest, *key, *crc; uint64_t chunk; } marker_t;

static int read_marker(const char *path, marker_t *mk)
{
    memset(mk, 0, sizeof *mk);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    struct stat st;
    fstat(fileno(f), &st);
    char *text = calloc(1, st.st_size + 1);
    size_t got = fread(text, 1, st.st_size, f);
    fclose(f);
    text[got] = '\0';
    mk->digest = marker_field(text, "manifest_sha256");
    mk->key = marker_field(text, "content_key");
    mk->crc = marker_field(text, "crc32");
    char *c = marker_field(text, "chunk_size");
    mk->chunk = c ? strtoull(c, NULL, 10) : 0;
    free(c);
    free(text);
    return mk->digest && mk->key && mk->crc && mk->chunk ? 0 : -1;
}

/* Where a verify pass reads the staged copy: the root directory, or the single file. */
static void dest_base(char *out)
{
    if (S.single)
        join(out, S.root, S.m.e[0].path);
    else
        snprintf(out, PATH_MAX, "%s", S.root);
}

static void free_marker(marker_t *mk)
{
    free(mk->digest); free(mk->key); free(mk->crc);
}

/* Does every manifest entry exist at the destination with the recorded size and mtime? */
static int tree_matches(void)
{
    for (size_t i = 0; i < S.m.n; i++) {
        const entry_t *e = &S.m.e[i];
        char p[PATH_MAX];
        struct stat st;
        join(p, S.root, e->path);
        if (lstat(p, &st) != 0)
            return 0;
        if (e->type == 'd' && !S_ISDIR(st.st_mode))
            return 0;
        if (e->type == 'f' && (!S_ISREG(st.st_mode) || (uint64_t)st.st_size != e->size ||
                               (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec != e->mtime_ns))
            return 0;
        if (e->type == 'l') {
            char buf[4096];
            ssize_t n = readlink(p, buf, sizeof buf - 1);
            if (n < 0)
                return 0;
            buf[n] = '\0';
            if (strcmp(buf, e->target))
                return 0;
        }
    }
    return 1;
}

static uint32_t *parse_crcs(const char *hex, uint64_t K)
{
    if (strlen(hex) != 8 * K)
        return NULL;
    uint32_t *c = malloc((K ? K : 1) * sizeof *c);
    for (uint64_t k = 0; k < K; k++) {
        char h[9];
        memcpy(h, hex + 8 * k, 8);
        h[8] = '\0';
        c[k] = (uint32_t)strtoul(h, NULL, 16);
    }
    return c;
}

/* ---------------------------------------------------------------- node-local steps */
static void setup_paths(void)
{
    expand_dest(O.dest, S.dest);
    if (O.unpack) {
        /* the tarball is staged next to DEST, unpacked, then swapped into place */
        char d[PATH_MAX];
        snprintf(d, sizeof d, "%s", S.dest);
        char *slash = strrchr(d, '/');
        if (slash == d) snprintf(S.root, sizeof S.root, "/");
        else if (slash) { *slash = '\0'; snprintf(S.root, sizeof S.root, "%s", d); }
        else snprintf(S.root, sizeof S.root, ".");
        join(S.marker, S.dest, ".aegis-stage.json");
    } else if (S.single) {
        snprintf(S.root, sizeof S.root, "%s", S.dest);
        char *slash = strrchr(S.root, '/');
        if (slash == S.root) S.root[1] = '\0';
        else if (slash) *slash = '\0';
        else snprintf(S.root, sizeof S.root, ".");
        char mk[PATH_MAX];
        snprintf(mk, sizeof mk, ".aegis-stage.%s.json", S.m.e[0].path);
        join(S.marker, S.root, mk);
    } else if (O.hf_repo) {
        char repo[512], *p;
        snprintf(repo, sizeof repo, "models--%s", O.hf_repo);
        while ((p = strchr(repo, '/')))
            memmove(p + 2, p + 1, strlen(p + 1) + 1), p[0] = '-', p[1] = '-';
        join(S.hf_model, S.dest, repo);
        snprintf(S.hf_rev, sizeof S.hf_rev, "%.40s", O.hf_revision ? O.hf_revision : S.digest);
        char snap[PATH_MAX];
        snprintf(snap, sizeof snap, "%s/snapshots/%s", S.hf_model, S.hf_rev);
        snprintf(S.root, sizeof S.root, "%s", snap);
        join(S.marker, S.root, ".aegis-stage.json");
        join(S.record, S.root, ".aegis-stage.manifest");
    } else {
        snprintf(S.root, sizeof S.root, "%s", S.dest);
        join(S.marker, S.root, ".aegis-stage.json");
        join(S.record, S.root, ".aegis-stage.manifest");
    }
}

/* Create DIR 0700, or fail this node when an existing DIR is not ours alone (another owner, group or
 * other permissions, a link). */
static void check_private_dir(const char *dir)
{
    char err[400], parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", dir);
    char *slash = strrchr(parent, '/');
    if (slash && slash != parent) {
        *slash = 0;
        if (mkdirs(parent, err, sizeof err) != 0) {
            node_fail("%s", err);
            return;
        }
    }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) {
        node_fail("cannot create the private directory %s: %s", dir, strerror(errno));
        return;
    }
    struct stat st;
    if (lstat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        node_fail("%s is not a directory (a link or a file is in the way); remove it", dir);
        return;
    }
    if (st.st_uid != geteuid() || (st.st_mode & 077))
        node_fail("%s is not private (owner uid %u, mode %04o; this user is uid %u and needs 0700): another "
                  "user may have put files there; remove it", dir, (unsigned)st.st_uid,
                  (unsigned)(st.st_mode & 07777), (unsigned)geteuid());
}

/* Remove temporaries an earlier, interrupted staging of other content left in DEST. */
static int drop_stale_part(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    const char *name = path + ftw->base;
    char mine[32];
    snprintf(mine, sizeof mine, ".aegis-part.%.8s.", S.digest);
    if (flag == FTW_F && !strncmp(name, ".aegis-part.", 12) && strncmp(name, mine, strlen(mine)) != 0)
        unlink(path);
    return 0;
}

/* The directory holding root-relative `rel`, opened without following any link below root; *last is
 * rel's last component. -1 when rel is not a plain relative path or a component is not a directory
 * (a link, a file): nothing there is aegis's to touch. */
static int open_parent(const char *rel, const char **last)
{
    int fd = open(S.root, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    const char *p = rel;
    while (fd >= 0) {
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        if (n == 0 || n > NAME_MAX || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
            break;
        if (!slash) {
            *last = p;
            return fd;
        }
        char comp[NAME_MAX + 1];
        memcpy(comp, p, n);
        comp[n] = '\0';
        int sub = openat(fd, comp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        close(fd);
        fd = sub;
        p = slash + 1;
    }
    if (fd >= 0)
        close(fd);
    return -1;
}

/* Bytes that removing the regular file at rel frees (0 for anything else, or a file with other links). */
static uint64_t freeable(const char *rel)
{
    const char *last;
    int fd = open_parent(rel, &last);
    if (fd < 0)
        return 0;
    struct stat st;
    uint64_t n = 0;
    if (fstatat(fd, last, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 1)
        n = (uint64_t)st.st_blocks * 512;
    close(fd);
    return n;
}

/* Remove rel inside root: a file or a link itself, a directory only when empty; never follows a link. */
static void remove_rel(const char *rel)
{
    const char *last;
    int fd = open_parent(rel, &last);
    if (fd < 0)
        return;
    if (unlinkat(fd, last, 0) != 0 && (errno == EISDIR || errno == EPERM))
        unlinkat(fd, last, AT_REMOVEDIR);
    close(fd);
}

static const entry_t *find_entry(const char *path)
{
    size_t lo = 0, hi = S.m.n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(S.m.e[mid].path, path);
        if (!c)
            return &S.m.e[mid];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

/* An entry of the last staging that this one does not have (by path and type). */
static int gone(const entry_t *old)
{
    const entry_t *e = find_entry(old->path);
    return !e || e->type != old->type;
}

/* Is regular file i already at DEST as SRC has it (same size and mtime)? */
static int file_current(size_t i)
{
    const entry_t *e = &S.m.e[i];
    char p[PATH_MAX];
    struct stat st;
    join(p, S.root, e->path);
    return lstat(p, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size == e->size &&
           (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec == e->mtime_ns;
}

/* "1.23 MB": units chosen so that the figures of one message stay distinguishable. */
static void fmt_bytes(char *out, size_t n, uint64_t b)
{
    static const char *unit[] = {"kB", "MB", "GB", "TB"};
    if (b < 1000) {
        snprintf(out, n, "%llu B", (unsigned long long)b);
        return;
    }
    double v = b / 1e3;
    int u = 0;
    while (v >= 1000 && u < 3) {
        v /= 1e3;
        u++;
    }
    snprintf(out, n, "%.2f %s", v, unit[u]);
}

/* Fail this node when writing `want` bytes (nwant files) cannot fit, counting what removing old versions
 * frees first. */
static void check_space(uint64_t want, size_t nwant, uint64_t freed)
{
    struct statvfs vs;
    if (statvfs(S.root, &vs) != 0)
        return;
    uint64_t avail = (uint64_t)vs.f_bavail * vs.f_frsize;
    if (avail + freed >= want)
        return;
    char w[32], a[32], f[32], s[32], plus[80] = "";
    fmt_bytes(w, sizeof w, want);
    fmt_bytes(a, sizeof a, avail);
    fmt_bytes(s, sizeof s, want - avail - freed);
    if (freed) {
        fmt_bytes(f, sizeof f, freed);
        snprintf(plus, sizeof plus, " plus %s in old versions it replaces or removes", f);
    }
    node_fail("not enough space in %s: writing %zu of %zu files needs %s, %s free%s (short by %s); free space "
              "there or stage to another DEST", S.root, nwant, S.m.nfiles, w, a, plus, s);
}

/* Which files must be written (need[i]): missing or different at DEST, or all with --force. */
static void plan_files(uint64_t *want, size_t *nwant, uint64_t *freed)
{
    for (size_t i = 0; i < S.m.n; i++) {
        const entry_t *e = &S.m.e[i];
        if (e->type != 'f')
            continue;
        S.need[i] = O.force || O.unpack || S.resend_all || !file_current(i);
        if (S.need[i]) {
            *want += e->size;
            (*nwant)++;
            *freed += freeable(e->path);
        }
    }
}

/* Create the directories of the manifest (after what is gone was removed). */
static void make_dirs(void)
{
    for (size_t i = 0; i < S.m.n && !failed(); i++) {
        if (S.m.e[i].type != 'd')
            continue;
        char p[PATH_MAX];
        join(p, S.root, S.m.e[i].path);
        struct stat st;
        if (mkdir(p, 0700) != 0 && errno != EEXIST)
            node_fail("cannot create directory %s: %s", p, strerror(errno));
        else if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))
            node_fail("cannot create directory %s: something else is in the way", p);
        else
            chmod(p, st.st_mode | 0700);
    }
}

/* Get DEST ready for the files this node writes: check it is writable and has room for them (nothing
 * is changed when it has not), then remove the marker, what the last staging wrote and SRC no longer
 * has, and the old versions of the files to rewrite; record the new manifest. */
static void prepare(void)
{
    char err[400];
    S.prepared = 1;
    if (mkdirs(S.root, err, sizeof err) != 0) {
        node_fail("%s", err);
        return;
    }
    char probe[PATH_MAX];
    char pname[64];
    snprintf(pname, sizeof pname, ".aegis-part.%.8s.probe", S.digest);
    join(probe, S.root, pname);
    int fd = open(probe, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        node_fail("cannot write in %s: %s", S.root, strerror(errno));
        return;
    }
    close(fd);
    unlink(probe);
    nftw(S.root, drop_stale_part, 32, FTW_PHYS);
    manifest_t old;
    int have_old = read_record(&old, NULL) == 0;
    uint64_t want = 0, freed = 0;
    size_t nwant = 0;
    plan_files(&want, &nwant, &freed);
    for (size_t i = 0; have_old && i < old.n; i++)
        if (old.e[i].type == 'f' && gone(&old.e[i]))
            freed += freeable(old.e[i].path);
    check_space(want, nwant, freed);
    if (!failed()) {
        unlink(S.marker);
        for (size_t i = old.n; have_old && i-- > 0;) /* children before their directory */
            if (gone(&old.e[i]))
                remove_rel(old.e[i].path);
        for (size_t i = 0; i < S.m.n; i++)
            if (S.need[i])
                remove_rel(S.m.e[i].path);
        make_dirs();
    }
    if (!failed() && S.record[0] && write_record() != 0)
        node_fail("cannot write %s: %s", S.record, strerror(errno));
    if (have_old)
        manifest_free(&old);
}

/* Which files go over the ring: those that at least one node writes (need[], OR over the nodes); a file
 * every node already holds as SRC has it is not sent. send[n]: some node writes at all. */
static void plan_send(void)
{
    size_t n = S.m.n;
    unsigned char *mine = calloc(n + 1, 1);
    int writes = !S.skip && !failed();
    for (size_t i = 0; i < n; i++)
        mine[i] = writes && S.need[i];
    mine[n] = (unsigned char)writes;
    MPI_Allreduce(mine, S.send, (int)n + 1, MPI_UNSIGNED_CHAR, MPI_MAX, S.leaders);
    free(mine);
    for (size_t i = 0; i < n; i++)
        S.files_sent += S.m.e[i].type == 'f' && S.send[i];
    stream_build(&S.m, S.send, &S.tx);
    S.KT = (S.tx.total + O.chunk - 1) / O.chunk;
    S.txcrc = calloc(S.KT ? S.KT : 1, sizeof *S.txcrc);
    S.sent = 1;
}

/* Pieces of one chunk, to compare a chunk of this staging's stream with the same chunk of the last one's. */
typedef struct { size_t n, cap; piece_t *p; } plist_t;

static int collect_piece(const piece_t *pc, void *arg)
{
    plist_t *l = arg;
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 16;
        l->p = realloc(l->p, l->cap * sizeof *l->p);
    }
    l->p[l->n++] = *pc;
    return 0;
}

/* Which chunks' CRC-32 this node's last complete staging recorded (known[], lastcrc[]): the marker's list
 * covers the stream of the manifest it names (this one, or the record when that is the record's digest),
 * and chunk k is the same bytes now when, with the same chunk size, it covers the same pieces of the same
 * files (path, size, mtime: what "unchanged" means for a re-stage). Read before prepare() removes them. */
static void last_crcs(void)
{
    S.known = calloc(S.K ? S.K : 1, 1);
    S.lastcrc = calloc(S.K ? S.K : 1, sizeof *S.lastcrc);
    marker_t mk;
    if (failed() || O.force || O.unpack)
        return;
    if (read_marker(S.marker, &mk) != 0) {
        free_marker(&mk);
        return;
    }
    manifest_t rec = {0};
    char digest[65] = "";
    const manifest_t *last = NULL;
    if (!strcmp(mk.digest, S.digest))
        last = &S.m;
    else if (read_record(&rec, digest) == 0 && !strcmp(digest, mk.digest))
        last = &rec;
    uint64_t lastK = last ? (last->total + mk.chunk - 1) / mk.chunk : 0;
    uint32_t *crcs = last && mk.chunk == O.chunk ? parse_crcs(mk.crc, lastK) : NULL;
    if (crcs) {
        stream_t ls;
        plist_t a = {0}, b = {0};
        stream_build(last, NULL, &ls);
        for (uint64_t k = 0; k < S.K && k < lastK; k++) {
            a.n = b.n = 0;
            stream_pieces(&S.m, &S.full, k * O.chunk, k * O.chunk + chunk_len(k), collect_piece, &a);
            stream_pieces(last, &ls, k * O.chunk, k * O.chunk + stream_chunk_len(&ls, k), collect_piece, &b);
            int same = a.n == b.n;
            for (size_t j = 0; same && j < a.n; j++) {
                const entry_t *x = &S.m.e[a.p[j].entry], *y = &last->e[b.p[j].entry];
                same = a.p[j].off == b.p[j].off && a.p[j].len == b.p[j].len && a.p[j].buf_off == b.p[j].buf_off &&
                       x->size == y->size && x->mtime_ns == y->mtime_ns && !strcmp(x->path, y->path);
            }
            S.known[k] = (unsigned char)same;
            S.lastcrc[k] = same ? crcs[k] : 0;
        }
        free(a.p);
        free(b.p);
        stream_free(&ls);
        free(crcs);
    }
    if (last == &rec)
        manifest_free(&rec);
    free_marker(&mk);
}

/* The marker's CRC-32 of every chunk of the whole stream. When the ring carried all of it, these are the
 * readers' CRCs. Otherwise (files every node had were not sent) a chunk's CRC comes from a last marker that
 * holds it (any node's), else the leaders compute it from SRC, each its share (chunk k on leader k mod N):
 * only CRCs travel. */
static void full_crcs(void)
{
    if (S.tx.n == S.full.n) {
        memcpy(S.crc, S.txcrc, S.K * sizeof *S.crc);
        return;
    }
    if (!S.send[S.m.n])
        return; /* no node writes a marker */
    size_t K1 = S.K ? S.K : 1;
    unsigned char *todo = calloc(K1, 1);
    uint32_t *part = calloc(K1, sizeof *part), *known = calloc(K1, sizeof *known);
    MPI_Allreduce(S.known, todo, (int)S.K, MPI_UNSIGNED_CHAR, MPI_MAX, S.leaders);
    MPI_Allreduce(S.lastcrc, known, (int)S.K, MPI_UINT32_T, MPI_MAX, S.leaders);
    for (uint64_t k = 0; k < S.K; k++) {
        todo[k] = !todo[k];
        S.summed += todo[k];
    }
    char err[300] = "", msg[400] = "";
    double t0 = now();
    int64_t bad = crc_pass(O.src, S.single, S.nleaders, S.lrank, part, NULL, todo, err, sizeof err);
    add_time(&S.t_read, t0);
    set_phase("peers");
    MPI_Allreduce(part, S.crc, (int)S.K, MPI_UINT32_T, MPI_SUM, S.leaders);
    for (uint64_t k = 0; k < S.K; k++)
        if (!todo[k])
            S.crc[k] = known[k];
    free(part);
    free(known);
    free(todo);
    int first = bad >= 0 ? S.lrank : INT_MAX, who;
    MPI_Allreduce(&first, &who, 1, MPI_INT, MPI_MIN, S.leaders);
    if (who == INT_MAX)
        return;
    if (who == S.lrank)
        snprintf(msg, sizeof msg, "rank %d on %s: %s", S.wrank, S.host, err);
    MPI_Bcast(msg, sizeof msg, MPI_CHAR, who, S.leaders);
    if (!S.skip)
        node_fail("SRC could not be read (%s)", msg);
}

static void cleanup_tmp(void)
{
    for (size_t i = 0; i < S.m.n; i++) {
        if (S.m.e[i].type == 'd')
            continue;
        if (S.fs && S.fs[i].fd >= 0) {
            close(S.fs[i].fd);
            S.fs[i].fd = -1;
        }
        char tmp[PATH_MAX];
        tmp_name(tmp, i);
        unlink(tmp);
    }
}

static int drop_piece_file(const piece_t *pc, void *arg)
{
    (void)arg;
    remove_rel(S.m.e[pc->entry].path);
    return 0;
}

/* Remove the files of chunk k at DEST (it failed --verify), so that the next staging rewrites them. */
static void drop_chunk_files(uint64_t k)
{
    stream_pieces(&S.m, &S.full, k * O.chunk, k * O.chunk + chunk_len(k), drop_piece_file, NULL);
}

/* Rename what this node wrote into place (files, then links, then directory modes). */
static void finalize(void)
{
    for (size_t i = 0; i < S.m.n && !failed(); i++) {
        const entry_t *e = &S.m.e[i];
        char tmp[PATH_MAX], fin[PATH_MAX];
        if (e->type == 'd')
            continue;
        tmp_name(tmp, i);
        join(fin, S.root, e->path);
        if (e->type == 'f' && !S.need[i]) { /* already in place; only its mode may have changed */
            if (chmod(fin, e->mode) != 0)
                node_fail("cannot set the mode of %s: %s", fin, strerror(errno));
            continue;
        }
        if (e->type == 'f') {
            if (e->size == 0) {
                int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
                if (fd < 0) { node_fail("cannot create %s: %s", tmp, strerror(errno)); break; }
                close(fd);
            } else if (!S.fs[i].done) {
                node_fail("internal error: %s incomplete (%llu of %llu bytes)", e->path,
                          (unsigned long long)S.fs[i].written, (unsigned long long)e->size);
                break;
            }
            struct timespec ts[2] = {{e->mtime_ns / 1000000000LL, e->mtime_ns % 1000000000LL},
                                     {e->mtime_ns / 1000000000LL, e->mtime_ns % 1000000000LL}};
            if (chmod(tmp, e->mode) != 0 || utimensat(AT_FDCWD, tmp, ts, 0) != 0) {
                node_fail("cannot set mode/mtime of %s: %s", tmp, strerror(errno));
                break;
            }
        } else {
            unlink(tmp);
            if (symlink(e->target, tmp) != 0) {
                node_fail("cannot create symlink %s: %s", tmp, strerror(errno));
                break;
            }
        }
        if (rename(tmp, fin) != 0) {
            node_fail("cannot rename %s to %s: %s", tmp, fin, strerror(errno));
            break;
        }
    }
    for (size_t i = S.m.n; i-- > 0 && !failed();) {
        if (S.m.e[i].type != 'd')
            continue;
        char p[PATH_MAX];
        join(p, S.root, S.m.e[i].path);
        chmod(p, S.m.e[i].mode | 0700);
    }
}

static int run_tar(const char *tarball, const char *dir, char *err, size_t errlen)
{
    pid_t pid = fork();
    if (pid == 0) {
        execlp("tar", "tar", "-x", "-f", tarball, "-C", dir, (char *)NULL);
        _exit(127);
    }
    int st = 0;
    pid_t got = pid;
    uint64_t seen = 0;
    while (pid > 0 && (got = waitpid(pid, &st, WNOHANG)) == 0) {
        /* tar's reads and writes are this node's progress while it unpacks (can't tell: count it) */
        char io[64], line[128];
        unsigned long long v, sum = 0;
        snprintf(io, sizeof io, "/proc/%d/io", (int)pid);
        FILE *f = fopen(io, "r");
        while (f && fgets(line, sizeof line, f))
            if (sscanf(line, "rchar: %llu", &v) == 1 || sscanf(line, "wchar: %llu", &v) == 1)
                sum += v;
        if (f)
            fclose(f);
        add_progress(f ? sum - seen : 1);
        seen = f ? sum : seen;
        usleep(100000);
    }
    if (pid < 0 || got < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        snprintf(err, errlen, "tar -x -f %s failed (status %d)", tarball, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        return -1;
    }
    return 0;
}

/* Unpack the staged tarball into a fresh directory and swap it in for DEST. */
static void unpack(void)
{
    char tarball[PATH_MAX], fresh[PATH_MAX], old[PATH_MAX], err[400];
    const char *base = strrchr(S.dest, '/') ? strrchr(S.dest, '/') + 1 : S.dest;
    join(tarball, S.root, S.m.e[0].path);
    char name[PATH_MAX];
    snprintf(name, sizeof name, ".aegis-unpack.%s", base);
    join(fresh, S.root, name);
    snprintf(name, sizeof name, ".aegis-old.%s", base);
    join(old, S.root, name);
    rm_rf(fresh);
    rm_rf(old);
    if (mkdir(fresh, 0755) != 0) {
        node_fail("cannot create %s: %s", fresh, strerror(errno));
    } else if (run_tar(tarball, fresh, err, sizeof err) != 0) {
        node_fail("%s", err);
    } else {
        char mk[PATH_MAX];
        join(mk, fresh, ".aegis-stage.json");
        struct stat st;
        if (write_marker(mk) != 0)
            node_fail("cannot write %s: %s", mk, strerror(errno));
        else if (lstat(S.dest, &st) == 0 && rename(S.dest, old) != 0)
            node_fail("cannot move the stale %s aside: %s", S.dest, strerror(errno));
        else if (rename(fresh, S.dest) != 0)
            node_fail("cannot rename %s to %s: %s", fresh, S.dest, strerror(errno));
    }
    rm_rf(old);
    if (failed())
        rm_rf(fresh);
    unlink(tarball);
}

/* ---------------------------------------------------------------- one staging per DEST at a time */
/* DEST made absolute, repeated and trailing slashes dropped (lexically: it may not exist yet). */
static void normal_dest(char *out)
{
    char abs[PATH_MAX], cwd[PATH_MAX] = "";
    if (S.dest[0] != '/' && !getcwd(cwd, sizeof cwd))
        cwd[0] = '\0';
    snprintf(abs, sizeof abs, S.dest[0] == '/' ? "%s%s" : "%s/%s", S.dest[0] == '/' ? "" : cwd, S.dest);
    char *o = out;
    for (const char *p = abs; *p; p++)
        if (!(*p == '/' && o > out && o[-1] == '/'))
            *o++ = *p;
    *o = '\0';
    while (o - out > 1 && o[-1] == '/')
        *--o = '\0';
}

/* The lock file of DEST: .aegis-lock.<sha256 of DEST, 16 hex> in the private directory, else beside DEST. */
static void lock_path(char *out, char *dir, char *dest)
{
    char hex[65];
    normal_dest(dest);
    sha256_hex(dest, strlen(dest), hex);
    if (O.private_dir) {
        expand_dest(O.private_dir, dir);
    } else {
        snprintf(dir, PATH_MAX, "%s", dest);
        char *slash = strrchr(dir, '/');
        if (slash == dir) dir[1] = '\0';
        else if (slash) *slash = '\0';
    }
    char name[64];
    snprintf(name, sizeof name, ".aegis-lock.%.16s", hex);
    join(out, dir, name);
}

/* What the holder of a lock wrote into the lock file: "pid host since DEST", then, from a staging that reports
 * its progress, "progress BYTES CHANGED ALIVE PHASE" (unix times of its last progress and its last heartbeat). */
typedef struct {
    int pid, has_progress;
    char host[256], phase[16];
    long long since, changed, alive;
    unsigned long long bytes;
} holder_t;

static int read_holder(holder_t *h)
{
    char buf[PATH_MAX + 512];
    memset(h, 0, sizeof *h);
    ssize_t got = pread(S.lock_fd, buf, sizeof buf - 1, 0);
    buf[got > 0 ? got : 0] = '\0';
    if (sscanf(buf, "%d %255s %lld", &h->pid, h->host, &h->since) != 3)
        return -1;
    const char *nl = strchr(buf, '\n');
    h->has_progress = nl && sscanf(nl + 1, "progress %llu %lld %lld %15s", &h->bytes, &h->changed, &h->alive,
                                   h->phase) == 4;
    return 0;
}

/* "pid 123 on host since 2026-01-01T00:00:00Z", from the holder's line in the lock file. */
static void lock_holder(char *out, size_t n)
{
    holder_t h;
    if (read_holder(&h) != 0) {
        snprintf(out, n, "another process");
        return;
    }
    time_t tt = (time_t)h.since;
    struct tm tm;
    char when[32];
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", gmtime_r(&tt, &tm));
    snprintf(out, n, "pid %d on %s since %s", h.pid, h.host, when);
}

/* The holder's heartbeat: a thread that rewrites the progress line in place every HEARTBEAT_S. */
static struct {
    pthread_t th;
    int running, stop;
    off_t at; /* offset of the progress line */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} HB = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static void *heartbeat(void *arg)
{
    (void)arg;
    uint64_t last = 0;
    const char *last_phase = NULL;
    long long changed = 0;
    pthread_mutex_lock(&HB.mu);
    while (!HB.stop) {
        pthread_mutex_unlock(&HB.mu);
        uint64_t bytes = __atomic_load_n(&S.progress, __ATOMIC_RELAXED);
        const char *phase = __atomic_load_n(&S.phase, __ATOMIC_RELAXED);
        long long t = (long long)time(NULL);
        if (bytes != last || phase != last_phase || !changed) {
            last = bytes;
            last_phase = phase;
            changed = t;
        }
        char line[96];
        int len = snprintf(line, sizeof line, "progress %20llu %12lld %12lld %-8.8s\n", (unsigned long long)bytes,
                           changed, t, phase);
        if (pwrite(S.lock_fd, line, len, HB.at) != len) {
            /* nothing to do: a waiting staging sees the heartbeat stop */
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += HEARTBEAT_S;
        pthread_mutex_lock(&HB.mu);
        if (!HB.stop)
            pthread_cond_timedwait(&HB.cv, &HB.mu, &ts);
    }
    pthread_mutex_unlock(&HB.mu);
    return NULL;
}

static void lock_write_holder(const char *dest)
{
    char line[PATH_MAX + 400];
    int len = snprintf(line, sizeof line, "%d %s %lld %s\n", (int)getpid(), S.host, (long long)time(NULL), dest);
    if (ftruncate(S.lock_fd, 0) != 0 || pwrite(S.lock_fd, line, len, 0) != len) {
        fprintf(stderr, "aegis-stage: %s (rank %d): cannot write the lock file: %s\n", S.host, S.wrank,
                strerror(errno));
        return;
    }
    HB.at = len;
    set_phase("check");
    HB.running = pthread_create(&HB.th, NULL, heartbeat, NULL) == 0;
}

static void lock_open(const char *path)
{
    S.lock_fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (S.lock_fd < 0)
        node_fail("cannot open the lock file %s: %s; remove it, or pass --private-dir", path, strerror(errno));
}

/* Lock the file at path; a holder removes it as it finishes, so a lock on a removed file does not count. */
static int lock_try(const char *path)
{
    while (S.lock_fd >= 0 && flock(S.lock_fd, LOCK_EX | LOCK_NB) == 0) {
        struct stat a, b;
        if (fstat(S.lock_fd, &a) == 0 && lstat(path, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev)
            return 1;
        close(S.lock_fd);
        lock_open(path);
    }
    return failed(); /* a lock file that cannot be opened fails the node, which then waits for nothing */
}

/* Remove the lock file, then release the lock (the other order could let a newcomer lock a file that is
 * about to go). */
static void lock_release(void)
{
    if (HB.running) {
        pthread_mutex_lock(&HB.mu);
        HB.stop = 1;
        pthread_cond_signal(&HB.cv);
        pthread_mutex_unlock(&HB.mu);
        pthread_join(HB.th, NULL);
        HB.running = 0;
    }
    if (S.lock_fd < 0)
        return;
    if (!S.lock_lost)
        unlink(S.lock_file);
    close(S.lock_fd);
    S.lock_fd = -1;
}

/* Has the holder of this node's lock stopped moving (why filled)? Only a holder that reports its progress
 * and is alive is judged (a dead one's line is stale: the kernel freed its lock): by its heartbeat (a stopped
 * process, or one hung on the filesystem of the lock file, writes none) and by its progress (none while it
 * works; not judged while it waits for the other nodes of its own staging). */
static int holder_stalled(holder_t *h, char *why, size_t n)
{
    if (O.lock_stall <= 0 || read_holder(h) != 0 || !h->has_progress)
        return 0;
    if (!strcmp(h->host, S.host) && kill(h->pid, 0) != 0 && errno == ESRCH)
        return 0;
    long long t = (long long)time(NULL), quiet = t - h->alive, idle = t - h->changed;
    char done[32];
    fmt_bytes(done, sizeof done, h->bytes);
    if (quiet < O.lock_stall && (!strcmp(h->phase, "peers") || idle < O.lock_stall))
        return 0;
    if (quiet >= SILENT_S)
        snprintf(why, n, "has shown no sign of life for %lld s (stopped, or hung on its filesystem; last progress "
                 "%lld s ago, %s done)", quiet, idle, done);
    else
        snprintf(why, n, "has made no progress for %lld s (while in phase %s; %s done)", idle, h->phase, done);
    return 1;
}

static void lock_report(double waited, int nwait)
{
    char holder[400], prog[120] = "", stall[80] = "";
    holder_t h;
    lock_holder(holder, sizeof holder);
    if (read_holder(&h) == 0 && h.has_progress) {
        char done[32];
        fmt_bytes(done, sizeof done, h.bytes);
        snprintf(prog, sizeof prog, "; its last progress %lld s ago, %s done", (long long)time(NULL) - h.changed,
                 done);
    }
    if (O.lock_stall > 0)
        snprintf(stall, sizeof stall, ", or after %d s without progress, --lock-stall", O.lock_stall);
    if (waited < 1)
        fprintf(stderr, "aegis-stage: %s (rank %d): %s is being staged by %s; waiting for it to finish (%d of %d "
                "nodes wait; giving up after %d s, --lock-timeout%s%s)\n", S.host, S.wrank, S.dest, holder, nwait,
                S.nleaders, O.lock_timeout, stall, prog);
    else
        fprintf(stderr, "aegis-stage: %s (rank %d): still waiting for %s to finish staging %s (%.0f of %d s; %d of "
                "%d nodes wait%s)\n", S.host, S.wrank, holder, S.dest, waited, O.lock_timeout, nwait, S.nleaders,
                prog);
}

/* Take the lock of DEST on every node (flock: the kernel drops it when the process ends). A node whose
 * lock another staging holds makes all wait: the others release theirs and all retry together, so two
 * stagings sharing nodes never hold part each and wait for the rest. After --lock-timeout, or as soon as a
 * node finds its holder stalled (--lock-stall), the nodes still without their lock fail, naming the holder;
 * the others go on. */
static void take_lock(void)
{
    char dir[PATH_MAX], dest[PATH_MAX], err[400];
    const char *path = S.lock_file;
    lock_path(S.lock_file, dir, dest);
    if (!failed() && mkdirs(dir, err, sizeof err) != 0)
        node_fail("%s", err);
    if (!failed())
        lock_open(path);
    srand((unsigned)getpid() ^ (unsigned)time(NULL));
    double t0 = now(), report_at = 0;
    for (;;) {
        int got = failed() || lock_try(path);
        char why[200] = "";
        holder_t h;
        int stalled = !got && holder_stalled(&h, why, sizeof why), in_time = now() - t0 < O.lock_timeout;
        int in[3] = {got, in_time && !stalled, got ? INT_MAX : S.lrank}, all[3], wait = !got, nwait;
        MPI_Allreduce(in, all, 3, MPI_INT, MPI_MIN, S.leaders);
        MPI_Allreduce(&wait, &nwait, 1, MPI_INT, MPI_SUM, S.leaders);
        if (all[0]) /* every node holds its lock */
            break;
        if (!all[1]) { /* time is up, or a holder hangs: who holds a lock keeps it */
            if (!got) {
                S.lock_lost = 1; /* the file is the holder's */
                char holder[400];
                lock_holder(holder, sizeof holder);
                if (stalled)
                    node_fail("%s is being staged by %s (lock %s), which %s; gave up after %.0f s (--lock-stall %d): "
                              "if it hangs, end it (kill -KILL %d on %s, or cancel its job) and run again", S.dest,
                              holder, path, why, now() - t0, O.lock_stall, h.pid, h.host);
                else if (!in_time)
                    node_fail("%s is being staged by %s (lock %s); gave up after %d s: let that staging finish and "
                              "run again, stop it, or raise --lock-timeout", S.dest, holder, path, O.lock_timeout);
                else
                    node_fail("%s is being staged by %s (lock %s); gave up after %.0f s with the other nodes of this "
                              "staging, as another node's holder hangs (see its line)", S.dest, holder, path,
                              now() - t0);
            }
            break;
        }
        if (got && !failed())
            flock(S.lock_fd, LOCK_UN);
        if (all[2] == S.lrank && now() - t0 >= report_at) {
            lock_report(now() - t0, nwait);
            report_at += LOCK_REPORT_S;
        }
        usleep(200000 + rand() % 300000);
    }
    if (S.lock_fd >= 0 && !failed())
        lock_write_holder(dest);
}

/* ---------------------------------------------------------------- reporting */
typedef struct {
    int failed, skipped;
    long repaired;
    double t[6]; /* read, network, write, checksum, verify, total */
    char host[64];
    int rank;
    char reason[1024];
} report_t;

static void json_str(const char *s)
{
    putchar('"');
    for (const char *p = s; *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
}

static void print_size(char *out, size_t n, double b)
{
    snprintf(out, n, "%.2f GB", b / 1e9);
}

static int report(double t_start)
{
    report_t me = {0}, *all = NULL;
    me.failed = S.failed;
    me.skipped = S.skip;
    me.repaired = S.repaired;
    S.t_total = now() - t_start;
    double t[6] = {S.t_read, S.t_net, S.t_write, S.t_cksum, S.t_verify, S.t_total};
    memcpy(me.t, t, sizeof t);
    snprintf(me.host, sizeof me.host, "%s", S.host);
    me.rank = S.wrank;
    snprintf(me.reason, sizeof me.reason, "%s", S.reason);
    if (S.lrank == 0)
        all = calloc(S.nleaders, sizeof *all);
    MPI_Gather(&me, sizeof me, MPI_BYTE, all, sizeof me, MPI_BYTE, 0, S.leaders);
    if (S.lrank != 0)
        return 0;
    int nfail = 0, nskip = 0;
    long rep = 0;
    double mx[6] = {0};
    for (int i = 0; i < S.nleaders; i++) {
        nfail += all[i].failed;
        nskip += all[i].skipped;
        rep += all[i].repaired;
        for (int j = 0; j < 6; j++)
            if (all[i].t[j] > mx[j]) mx[j] = all[i].t[j];
    }
    double secs = mx[5] > 0 ? mx[5] : 1e-9;
    uint64_t sent = S.sent ? S.tx.total : 0;
    double moved = (double)sent;
    if (O.json) {
        printf("{\"impl\": \"native\", \"src\": ");
        json_str(O.src);
        printf(", \"dest\": ");
        json_str(O.dest);
        printf(", \"bytes\": %llu, \"files\": %zu, \"bytes_sent\": %llu, \"bytes_skipped\": %llu, "
               "\"files_sent\": %zu, \"chunks_sent\": %llu, \"chunks_summed\": %llu, \"nodes\": %d, "
               "\"ranks\": %d, \"seconds\": %.6f, \"gbps_per_node\": %.6f, \"skipped_nodes\": %d, "
               "\"failed_nodes\": %d, \"repaired_chunks\": %ld, \"chunk_size\": %llu, \"window\": %d, "
               "\"threads\": %d, \"chunks\": %llu, \"manifest_sha256\": \"%s\", \"phases\": {\"read\": %.6f, "
               "\"network\": %.6f, \"write\": %.6f, \"checksum\": %.6f, \"verify\": %.6f}, \"failures\": [",
               (unsigned long long)S.m.total, S.m.nfiles, (unsigned long long)sent,
               (unsigned long long)(S.m.total - sent), S.files_sent, (unsigned long long)(S.sent ? S.KT : 0),
               (unsigned long long)S.summed, S.nleaders, S.wsize, secs,
               moved / secs / 1e9, nskip, nfail, rep, (unsigned long long)O.chunk, O.window, O.threads,
               (unsigned long long)S.K, S.digest, mx[0], mx[1], mx[2], mx[3], mx[4]);
        int first = 1;
        for (int i = 0; i < S.nleaders; i++) {
            if (!all[i].failed)
                continue;
            printf("%s{\"host\": ", first ? "" : ", ");
            json_str(all[i].host);
            printf(", \"rank\": %d, \"reason\": ", all[i].rank);
            json_str(all[i].reason);
            printf("}");
            first = 0;
        }
        printf("]}\n");
    } else {
        char sz[32];
        print_size(sz, sizeof sz, (double)S.m.total);
        if (nskip == S.nleaders)
            printf("aegis stage: %s in %zu files already staged on all %d nodes at %s (%.2f s) [native]\n", sz,
                   S.m.nfiles, S.nleaders, O.dest, secs);
        else {
            char part[160] = "", b[32];
            if (S.send[S.m.n] && S.files_sent < S.m.nfiles) {
                fmt_bytes(b, sizeof b, sent);
                snprintf(part, sizeof part, "; sent %s (%zu of %zu files; the others were on every node already)",
                         b, S.files_sent, S.m.nfiles);
            }
            printf("aegis stage: %s in %zu files to %d nodes in %.2f s (%.2f GB/s per node)%s; read %.2f s, "
                   "network %.2f s, write %.2f s, checksum %.2f s, verify %.2f s; %d skipped, %d failed, "
                   "%ld chunks repaired [native]\n",
                   sz, S.m.nfiles, S.nleaders, secs, moved / secs / 1e9, part, mx[0], mx[1], mx[2], mx[3], mx[4],
                   nskip, nfail, rep);
        }
        if (O.hf_repo && nfail < S.nleaders)
            printf("aegis stage: set HF_HUB_CACHE=%s and HF_HUB_OFFLINE=1, then serve the model as %s\n",
                   O.dest, O.hf_repo);
    }
    fflush(stdout);
    int shown = 0;
    for (int i = 0; i < S.nleaders; i++) {
        if (!all[i].failed)
            continue;
        if (shown++ < MAX_FAIL_LINES)
            fprintf(stderr, "aegis: error: %s (rank %d): %s\n", all[i].host, all[i].rank, all[i].reason);
    }
    if (shown > MAX_FAIL_LINES)
        fprintf(stderr, "aegis: error: ... and %d more nodes failed\n", shown - MAX_FAIL_LINES);
    if (nfail)
        fprintf(stderr, "aegis: error: staging failed on %d of %d nodes (listed above); %s\n", nfail, S.nleaders,
                nfail < S.nleaders ? "the other nodes hold a complete copy" : "no node holds a complete copy");
    free(all);
    return nfail ? 1 : 0;
}

/* ---------------------------------------------------------------- main */
static uint64_t parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    uint64_t mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1ull << 10; end++; break;
    case 'm': case 'M': mul = 1ull << 20; end++; break;
    case 'g': case 'G': mul = 1ull << 30; end++; break;
    case '\0': break;
    default: return 0;
    }
    if (*end == 'i' && end[1] == 'B') end += 2;
    else if (*end == 'B') end++;
    if (*end || v <= 0)
        return 0;
    return (uint64_t)(v * mul);
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: aegis-stage [options] SRC DEST   (run under mpiexec/srun, one or more ranks per node)\n"
            "  --chunk-size SIZE   bytes per chunk (default 16M; 64K..1G)\n"
            "  --window N          chunks in flight per node (default 8)\n"
            "  --threads N         I/O threads per node (default 4)\n"
            "  --verify            re-read the destination and compare checksums\n"
            "  --force             re-send even where the completion marker matches\n"
            "  --unpack            SRC is a tar archive: unpack it into DEST once per node\n"
            "  --hf-repo ORG/NAME  write DEST as a Hugging Face hub cache (models--ORG--NAME/snapshots/REV)\n"
            "  --hf-revision REV   snapshot name (default: the manifest digest)\n"
            "  --json              print the summary as one JSON object\n"
            "  --private-dir DIR   DEST's ancestor that must be this user's alone (created 0700, else refused)\n"
            "  --lock-timeout S    wait at most S seconds for another staging into DEST (default 1800)\n"
            "  --lock-stall S      give up at once when that staging has made no progress for S seconds\n"
            "                      (default 300; 0: wait for --lock-timeout)\n"
            "  --per-rank          testing only: every rank acts as its own node\n"
            "DEST may contain {rank}, {node} and {host}.\n");
}

static void parse_args(int argc, char **argv)
{
    static struct option lo[] = {
        {"chunk-size", required_argument, 0, 'c'}, {"window", required_argument, 0, 'w'},
        {"threads", required_argument, 0, 't'},    {"verify", no_argument, 0, 'v'},
        {"force", no_argument, 0, 'f'},            {"unpack", no_argument, 0, 'u'},
        {"hf-repo", required_argument, 0, 'r'},    {"hf-revision", required_argument, 0, 'R'},
        {"json", no_argument, 0, 'j'},             {"per-rank", no_argument, 0, 'p'},
        {"private-dir", required_argument, 0, 'P'}, {"lock-timeout", required_argument, 0, 'L'},
        {"lock-stall", required_argument, 0, 'T'},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'c':
            O.chunk = parse_size(optarg);
            if (O.chunk < (64u << 10) || O.chunk > (1u << 30))
                die_usage("--chunk-size %s is not a size between 64K and 1G (e.g. 16M)", optarg);
            break;
        case 'w':
            O.window = atoi(optarg);
            if (O.window < 1 || O.window > 1024) die_usage("--window must be between 1 and 1024");
            break;
        case 't':
            O.threads = atoi(optarg);
            if (O.threads < 1 || O.threads > 256) die_usage("--threads must be between 1 and 256");
            break;
        case 'v': O.verify = 1; break;
        case 'f': O.force = 1; break;
        case 'u': O.unpack = 1; break;
        case 'r': O.hf_repo = optarg; break;
        case 'R': O.hf_revision = optarg; break;
        case 'j': O.json = 1; break;
        case 'p': O.per_rank = 1; break;
        case 'P': O.private_dir = optarg; break;
        case 'L': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || end == optarg || v < 0 || v > 86400 * 7)
                die_usage("--lock-timeout %s is not a number of seconds (0 to 604800)", optarg);
            O.lock_timeout = (int)v;
            break;
        }
        case 'T': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*end || end == optarg || v < 0 || v > 86400 * 7)
                die_usage("--lock-stall %s is not a number of seconds (0 to 604800)", optarg);
            O.lock_stall = (int)v;
            break;
        }
        case 'h': usage(stdout); exit(0);
        default: die_usage("unknown option %s; see aegis-stage --help", argv[optind - 1]);
        }
    }
    if (argc - optind != 2)
        die_usage("expected SRC and DEST; see aegis-stage --help");
    O.src = argv[optind];
    O.dest = argv[optind + 1];
    if (O.hf_repo) {
        const char *slash = strchr(O.hf_repo, '/');
        if (!slash || strchr(slash + 1, '/') || slash == O.hf_repo || !slash[1] || strstr(O.hf_repo, ".."))
            die_usage("--hf-repo %s is not of the form ORG/NAME", O.hf_repo);
        if (O.unpack) die_usage("--hf-repo and --unpack cannot be combined");
    }
    if (O.private_dir) {
        size_t n = strlen(O.private_dir);
        while (n > 1 && O.private_dir[n - 1] == '/') n--;
        if (strncmp(O.dest, O.private_dir, n) != 0 || O.dest[n] != '/')
            die_usage("--private-dir %s must hold DEST (%s)", O.private_dir, O.dest);
    }
    if (O.hf_revision && (strchr(O.hf_revision, '/') || !O.hf_revision[0] || strstr(O.hf_revision, "..")))
        die_usage("--hf-revision %s must be a plain name", O.hf_revision);
    const char *delay = getenv("AEGIS_STAGE_TEST_WRITE_DELAY_MS");
    S.write_delay_ms = delay ? atoi(delay) : 0;
    const char *corrupt = getenv("AEGIS_STAGE_TEST_CORRUPT");
    if (corrupt && *corrupt) {
        S.corrupt_chunk = atoll(corrupt);
        const char *at = strchr(corrupt, '@');
        if (at) S.corrupt_rank = atoi(at + 1);
    }
}

static void wait_request(MPI_Request *r, int sleep_us)
{
    int flag = 0;
    for (;;) {
        MPI_Test(r, &flag, MPI_STATUS_IGNORE);
        if (flag) return;
        usleep(sleep_us);
    }
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    double t_start = now();
    MPI_Comm_rank(MPI_COMM_WORLD, &S.wrank);
    MPI_Comm_size(MPI_COMM_WORLD, &S.wsize);
    gethostname(S.host, sizeof S.host - 1);
    MPI_Comm node = MPI_COMM_SELF;
    int local = 0;
    if (!O.per_rank) {
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, S.wrank, MPI_INFO_NULL, &node);
        MPI_Comm_rank(node, &local);
    }
    S.leader = local == 0;
    MPI_Comm_split(MPI_COMM_WORLD, S.leader ? 0 : MPI_UNDEFINED, S.wrank, &S.leaders);
    int status = 0;
    MPI_Request sreq;
    if (!S.leader) {
        /* extra ranks on a node only wait for the outcome, without spinning */
        MPI_Ibcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD, &sreq);
        wait_request(&sreq, 2000);
        MPI_Finalize();
        return status;
    }
    MPI_Comm_rank(S.leaders, &S.lrank);
    MPI_Comm_size(S.leaders, &S.nleaders);

    /* 1. manifest, walked once on leader 0 and broadcast */
    char *mbuf = NULL;
    int64_t hdr[2] = {0, 0};
    char err[512] = "";
    if (S.lrank == 0) {
        struct stat st;
        int single = stat(O.src, &st) == 0 && S_ISREG(st.st_mode);
        if (O.unpack && !single) {
            snprintf(err, sizeof err, "--unpack needs SRC to be a tar archive, %s is not a regular file", O.src);
        } else if (O.hf_repo && single) {
            snprintf(err, sizeof err, "--hf-repo needs SRC to be a directory, %s is a file", O.src);
        } else {
            char name[PATH_MAX];
            const char *slash = strrchr(O.dest, '/');
            const char *base = slash ? slash + 1 : O.dest;
            if (O.unpack)
                snprintf(name, sizeof name, ".aegis-tar.%s", base);
            else
                snprintf(name, sizeof name, "%s", base);
            if (single && !*base)
                snprintf(err, sizeof err, "DEST %s must name the file to create", O.dest);
            else if (manifest_walk(O.src, single ? name : NULL, &S.m, err, sizeof err) == 0) {
                size_t len;
                mbuf = manifest_serialize(&S.m, &len);
                hdr[0] = (int64_t)len;
                hdr[1] = single;
            }
        }
        if (err[0]) {
            hdr[0] = -1;
            mbuf = strdup(err);
            hdr[1] = (int64_t)strlen(err) + 1;
        }
    }
    MPI_Bcast(hdr, 2, MPI_INT64_T, 0, S.leaders);
    size_t blen = hdr[0] < 0 ? (size_t)hdr[1] : (size_t)hdr[0];
    if (S.lrank != 0)
        mbuf = malloc(blen + 1);
    MPI_Bcast(mbuf, (int)blen, MPI_BYTE, 0, S.leaders);
    if (hdr[0] < 0) {
        mbuf[blen - 1] = '\0';
        if (S.wrank == 0)
            fprintf(stderr, "aegis: error: %s\n", mbuf);
        status = 1;
        MPI_Ibcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD, &sreq);
        wait_request(&sreq, 100);
        MPI_Finalize();
        return 1;
    }
    S.single = (int)hdr[1];
    if (S.lrank != 0 && manifest_parse(mbuf, blen, &S.m) != 0) {
        fprintf(stderr, "aegis: error: internal: cannot parse the manifest\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    sha256_hex(mbuf, blen, S.digest);
    free(mbuf);
    S.K = (S.m.total + O.chunk - 1) / O.chunk;
    S.crc = calloc(S.K ? S.K : 1, sizeof *S.crc);
    S.fs = calloc(S.m.n ? S.m.n : 1, sizeof *S.fs);
    S.need = calloc(S.m.n ? S.m.n : 1, sizeof *S.need);
    S.send = calloc(S.m.n + 1, 1);
    stream_build(&S.m, NULL, &S.full);
    for (size_t i = 0; i < S.m.n; i++) {
        S.fs[i].fd = -1;
        pthread_mutex_init(&S.fs[i].mu, NULL);
    }
    setup_paths();

    /* 2. which nodes already hold exactly this content? */
    marker_t mk = {0};
    int have = 0;
    char vbase[PATH_MAX];
    dest_base(vbase);
    /* only in a directory that is ours alone: a marker and files planted by another user never count */
    if (O.private_dir) {
        char priv[PATH_MAX];
        expand_dest(O.private_dir, priv);
        check_private_dir(priv);
    }
    take_lock();
    if (!O.force && !S.failed && read_marker(S.marker, &mk) == 0) {
        have = !strcmp(mk.digest, S.digest);
        if (have && !O.unpack)
            have = tree_matches();
        if (have && O.unpack) {
            struct stat st;
            have = stat(S.dest, &st) == 0 && S_ISDIR(st.st_mode) && mk.chunk == O.chunk;
        }
        if (have && O.verify && !O.unpack) {
            uint64_t saved = O.chunk;
            O.chunk = mk.chunk;
            S.K = (S.m.total + O.chunk - 1) / O.chunk;
            uint32_t *exp = parse_crcs(mk.crc, S.K);
            double t0 = now();
            have = exp && crc_pass(vbase, S.single, 1, 0, NULL, exp, NULL, err, sizeof err) < 0;
            S.t_verify += now() - t0;
            if (!have) {
                fprintf(stderr, "aegis-stage: %s (rank %d): the existing copy differs (%s); re-sending\n", S.host,
                        S.wrank, exp ? err : "bad marker");
                S.resend_all = 1; /* sizes and mtimes cannot tell which file it is */
            }
            free(exp);
            O.chunk = saved;
            S.K = (S.m.total + O.chunk - 1) / O.chunk;
        }
    }
    if (O.unpack) {
        /* candidates hold an unpacked copy of a tarball with this name, size and mtime:
         * confirm by content key, read in parallel from SRC without any transfer */
        int any = 0;
        set_phase("peers");
        MPI_Allreduce(&have, &any, 1, MPI_INT, MPI_MAX, S.leaders);
        if (any) {
            uint32_t *part = calloc(S.K ? S.K : 1, sizeof *part);
            double t0 = now();
            set_phase("checksum");
            int64_t bad = crc_pass(O.src, 1, S.nleaders, S.lrank, part, NULL, NULL, err, sizeof err);
            S.t_read += now() - t0;
            if (bad >= 0)
                node_fail("%s", err);
            set_phase("peers");
            MPI_Allreduce(part, S.crc, (int)S.K, MPI_UINT32_T, MPI_SUM, S.leaders);
            free(part);
            content_key();
            if (have)
                have = !strcmp(mk.key, S.key);
        }
    }
    free_marker(&mk);
    S.skip = have;
    int all_have = 0;
    set_phase("peers");
    MPI_Allreduce(&have, &all_have, 1, MPI_INT, MPI_MIN, S.leaders);

    if (!all_have) {
        /* 3. prepare, transfer, finalize */
        set_phase("prepare");
        last_crcs();
        if (!S.skip && !failed())
            prepare();
        set_phase("peers");
        plan_send();
        set_phase("transfer");
        transfer();
        set_phase("checksum");
        full_crcs();
        content_key();
        set_phase("finish");
        if (!S.skip && !failed()) {
            double t0 = now();
            finalize();
            add_time(&S.t_write, t0);
        }
        if (!S.skip && !failed() && O.verify) {
            double t0 = now();
            set_phase("verify");
            int64_t bad = crc_pass(vbase, S.single, 1, 0, NULL, S.crc, NULL, err, sizeof err);
            if (bad >= 0) {
                node_fail("verify: %s; its files were removed: run again to rewrite them", err);
                drop_chunk_files((uint64_t)bad);
            }
            S.t_verify += now() - t0;
        }
        if (!S.skip && !failed()) {
            if (O.unpack) {
                double t0 = now();
                set_phase("unpack");
                unpack();
                add_time(&S.t_write, t0);
            } else if (write_marker(S.marker) != 0) {
                node_fail("cannot write the completion marker %s: %s", S.marker, strerror(errno));
            } else if (O.hf_repo) {
                char refs[PATH_MAX], ref[PATH_MAX];
                snprintf(refs, sizeof refs, "%s/refs", S.hf_model);
                join(ref, refs, "main");
                FILE *f = mkdirs(refs, err, sizeof err) == 0 ? fopen(ref, "w") : NULL;
                if (!f || fputs(S.hf_rev, f) < 0 || fclose(f) != 0)
                    node_fail("cannot write %s: %s", ref, strerror(errno));
            }
        }
        if (S.prepared && failed())
            cleanup_tmp();
    }

    /* 4. one summary, one exit status everywhere */
    set_phase("peers");
    status = report(t_start);
    lock_release();
    MPI_Ibcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD, &sreq);
    wait_request(&sreq, 100);
    MPI_Finalize();
    return status;
}
