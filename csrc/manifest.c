/* Walking SRC into a manifest, its shared text layout, and chunk-to-file mapping. */
#define _GNU_SOURCE
#include "manifest.h"
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void add(manifest_t *m, entry_t e)
{
    if (m->n == m->cap) {
        m->cap = m->cap ? 2 * m->cap : 64;
        m->e = realloc(m->e, m->cap * sizeof *m->e);
        if (!m->e) { perror("aegis-stage: realloc"); exit(1); }
    }
    m->e[m->n++] = e;
}

/* A relative link target that stays inside the tree when resolved from `rel`'s directory. */
static int link_is_internal(const char *rel, const char *target)
{
    if (target[0] == '/' || target[0] == '\0')
        return 0;
    int depth = 0;
    for (const char *p = rel; *p; p++)
        if (*p == '/') depth++;
    const char *p = target;
    while (*p) {
        const char *q = strchr(p, '/');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        if (n == 2 && p[0] == '.' && p[1] == '.') {
            if (--depth < 0) return 0;
        } else if (!(n == 0 || (n == 1 && p[0] == '.'))) {
            depth++;
        }
        p += n;
        if (*p == '/') p++;
    }
    return 1;
}

static int walk(const char *abs, const char *rel, manifest_t *m, char *err, size_t errlen)
{
    DIR *d = opendir(abs);
    if (!d) {
        snprintf(err, errlen, "cannot read directory %s: %s", abs, strerror(errno));
        return -1;
    }
    struct dirent *de;
    int rc = 0;
    while (rc == 0 && (de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        char *a, *r;
        if (asprintf(&a, "%s/%s", abs, de->d_name) < 0 ||
            asprintf(&r, rel[0] ? "%s/%s" : "%s%s", rel, de->d_name) < 0) {
            closedir(d);
            return -1;
        }
        struct stat st;
        entry_t e = {0};
        e.path = r;
        if (lstat(a, &st) != 0) {
            snprintf(err, errlen, "cannot stat %s: %s", a, strerror(errno));
            rc = -1;
        } else if (S_ISLNK(st.st_mode)) {
            char buf[4096];
            ssize_t n = readlink(a, buf, sizeof buf - 1);
            if (n < 0) {
                snprintf(err, errlen, "cannot read symlink %s: %s", a, strerror(errno));
                rc = -1;
            } else {
                buf[n] = '\0';
                if (link_is_internal(r, buf)) {
                    e.type = 'l'; e.mode = 0777; e.target = strdup(buf);
                    add(m, e);
                    r = NULL;
                } else if (stat(a, &st) != 0) {
                    snprintf(err, errlen, "symlink %s -> %s is dangling", a, buf);
                    rc = -1;
                } else if (!S_ISREG(st.st_mode)) {
                    snprintf(err, errlen, "symlink %s -> %s points outside SRC to something that is not a "
                             "regular file; stage that directory itself", a, buf);
                    rc = -1;
                } else {
                    e.type = 'f'; e.size = st.st_size; e.mode = st.st_mode & 07777;
                    e.mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
                    add(m, e);
                    r = NULL;
                }
            }
        } else if (S_ISDIR(st.st_mode)) {
            e.type = 'd'; e.mode = st.st_mode & 07777;
            add(m, e);
            rc = walk(a, r, m, err, errlen);
            r = NULL;
        } else if (S_ISREG(st.st_mode)) {
            e.type = 'f'; e.size = st.st_size; e.mode = st.st_mode & 07777;
            e.mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
            add(m, e);
            r = NULL;
        } else {
            snprintf(err, errlen, "%s is not a regular file, directory or symlink; remove it from SRC", a);
            rc = -1;
        }
        free(a);
        free(r);
    }
    closedir(d);
    return rc;
}

static int cmp_entry(const void *x, const void *y)
{
    return strcmp(((const entry_t *)x)->path, ((const entry_t *)y)->path);
}

void manifest_index(manifest_t *m)
{
    m->total = 0;
    m->nfiles = 0;
    m->nstream = 0;
    free(m->files);
    m->files = malloc((m->n + 1) * sizeof *m->files);
    for (size_t i = 0; i < m->n; i++) {
        entry_t *e = &m->e[i];
        if (e->type != 'f')
            continue;
        m->nfiles++;
        e->offset = m->total;
        m->total += e->size;
        if (e->size > 0)
            m->files[m->nstream++] = i;
    }
}

int manifest_walk(const char *src, const char *single_name, manifest_t *m, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    struct stat st;
    if (stat(src, &st) != 0) {
        snprintf(err, errlen, "cannot read SRC %s: %s", src, strerror(errno));
        return -1;
    }
    if (single_name) {
        if (!S_ISREG(st.st_mode)) {
            snprintf(err, errlen, "SRC %s is not a regular file", src);
            return -1;
        }
        entry_t e = {0};
        e.type = 'f'; e.size = st.st_size; e.mode = st.st_mode & 07777;
        e.mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec;
        e.path = strdup(single_name);
        add(m, e);
    } else if (walk(src, "", m, err, errlen) != 0) {
        return -1;
    }
    if (m->n)
        qsort(m->e, m->n, sizeof *m->e, cmp_entry);
    manifest_index(m);
    return 0;
}

/* Escape backslash, space and control bytes as in the Python version. */
static void put_escaped(char **out, size_t *len, size_t *cap, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*len + 8 > *cap) {
            *cap = *cap * 2 + 64;
            *out = realloc(*out, *cap);
        }
        if (*p == '\\' || *p <= 0x20 || *p == 0x7f)
            *len += sprintf(*out + *len, "\\x%02x", *p);
        else
            (*out)[(*len)++] = (char)*p;
    }
}

char *manifest_serialize(const manifest_t *m, size_t *len)
{
    size_t cap = 4096, n = 0;
    char *out = malloc(cap);
    n += sprintf(out, "aegis-manifest 1\n");
    for (size_t i = 0; i < m->n; i++) {
        const entry_t *e = &m->e[i];
        char head[128];
        int h = snprintf(head, sizeof head, "%c %llu %04o %lld ", e->type, (unsigned long long)e->size,
                         e->mode, (long long)e->mtime_ns);
        if (n + h + 8 > cap) { cap = cap * 2 + h; out = realloc(out, cap); }
        memcpy(out + n, head, h);
        n += h;
        put_escaped(&out, &n, &cap, e->path);
        if (e->type == 'l') {
            out[n++] = ' ';
            put_escaped(&out, &n, &cap, e->target);
        }
        if (n + 2 > cap) { cap *= 2; out = realloc(out, cap); }
        out[n++] = '\n';
    }
    out[n] = '\0';
    *len = n;
    return out;
}

static char *unescape(const char *s, size_t n)
{
    char *out = malloc(n + 1), *o = out;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\\' && i + 3 < n && s[i + 1] == 'x') {
            char hex[3] = {s[i + 2], s[i + 3], 0};
            *o++ = (char)strtol(hex, NULL, 16);
            i += 3;
        } else {
            *o++ = s[i];
        }
    }
    *o = '\0';
    return out;
}

int manifest_parse(const char *buf, size_t len, manifest_t *m)
{
    memset(m, 0, sizeof *m);
    const char *p = buf, *end = buf + len;
    const char *nl = memchr(p, '\n', end - p);
    if (!nl || strncmp(p, "aegis-manifest 1\n", 17) != 0)
        return -1;
    p = nl + 1;
    while (p < end) {
        nl = memchr(p, '\n', end - p);
        if (!nl) return -1;
        entry_t e = {0};
        unsigned long long size;
        long long mt;
        int consumed = 0;
        char type;
        if (sscanf(p, "%c %llu %o %lld %n", &type, &size, &e.mode, &mt, &consumed) != 4 || consumed == 0)
            return -1;
        e.type = type; e.size = size; e.mtime_ns = mt;
        const char *f = p + consumed;
        const char *sp = memchr(f, ' ', nl - f);
        if (e.type == 'l' && sp) {
            e.path = unescape(f, sp - f);
            e.target = unescape(sp + 1, nl - sp - 1);
        } else {
            e.path = unescape(f, nl - f);
        }
        add(m, e);
        p = nl + 1;
    }
    manifest_index(m);
    return 0;
}

int manifest_pieces(const manifest_t *m, uint64_t start, uint64_t end,
                    int (*fn)(const piece_t *, void *), void *arg)
{
    /* binary search the first stream file whose range contains `start` */
    size_t lo = 0, hi = m->nstream;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (m->e[m->files[mid]].offset <= start) lo = mid; else hi = mid;
    }
    uint64_t pos = start;
    for (size_t i = lo; i < m->nstream && pos < end; i++) {
        const entry_t *e = &m->e[m->files[i]];
        if (e->offset + e->size <= pos)
            continue;
        uint64_t off = pos - e->offset;
        uint64_t take = e->size - off;
        if (take > end - pos) take = end - pos;
        piece_t pc = {m->files[i], off, take, pos - start};
        int rc = fn(&pc, arg);
        if (rc) return rc;
        pos += take;
    }
    return 0;
}

void manifest_free(manifest_t *m)
{
    for (size_t i = 0; i < m->n; i++) {
        free(m->e[i].path);
        free(m->e[i].target);
    }
    free(m->e);
    free(m->files);
    memset(m, 0, sizeof *m);
}

void stream_build(const manifest_t *m, const unsigned char *pick, stream_t *s)
{
    s->n = 0;
    s->total = 0;
    s->files = malloc((m->nstream + 1) * sizeof *s->files);
    s->off = malloc((m->nstream + 1) * sizeof *s->off);
    for (size_t j = 0; j < m->nstream; j++) {
        size_t i = m->files[j];
        if (pick && !pick[i])
            continue;
        s->files[s->n] = i;
        s->off[s->n++] = s->total;
        s->total += m->e[i].size;
    }
}

int stream_pieces(const manifest_t *m, const stream_t *s, uint64_t start, uint64_t end,
                  int (*fn)(const piece_t *, void *), void *arg)
{
    size_t lo = 0, hi = s->n;
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (s->off[mid] <= start) lo = mid; else hi = mid;
    }
    uint64_t pos = start;
    for (size_t i = lo; i < s->n && pos < end; i++) {
        uint64_t size = m->e[s->files[i]].size;
        if (s->off[i] + size <= pos)
            continue;
        uint64_t off = pos - s->off[i];
        uint64_t take = size - off;
        if (take > end - pos) take = end - pos;
        piece_t pc = {s->files[i], off, take, pos - start};
        int rc = fn(&pc, arg);
        if (rc) return rc;
        pos += take;
    }
    return 0;
}

void stream_free(stream_t *s)
{
    free(s->files);
    free(s->off);
    memset(s, 0, sizeof *s);
}
