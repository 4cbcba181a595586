/* The manifest: every entry of SRC (path, type, size, mode, mtime) in one byte layout
 * shared with the mpi4py implementation (aegis/staging/manifest.py). */
#ifndef AEGIS_MANIFEST_H
#define AEGIS_MANIFEST_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    char type;         /* 'd' directory, 'f' regular file, 'l' symlink kept as a link */
    uint64_t size;     /* bytes ('f' only) */
    unsigned mode;     /* permission bits */
    int64_t mtime_ns;  /* 'f' only */
    char *path;        /* relative to the staging root */
    char *target;      /* 'l' only */
    uint64_t offset;   /* 'f': offset of its first byte in the chunk stream */
} entry_t;

typedef struct {
    entry_t *e;
    size_t n, cap;
    uint64_t total;    /* bytes of all 'f' entries */
    size_t nfiles;
    size_t *files;     /* indexes of 'f' entries with size > 0, in stream order */
    size_t nstream;
} manifest_t;

/* Walk SRC (a directory, or a single file staged under the name `single_name`).
 * Returns 0, or -1 with a one-line reason in err. */
int manifest_walk(const char *src, const char *single_name, manifest_t *m, char *err, size_t errlen);
/* Serialize (malloc'd, *len set) / parse the shared text layout. */
char *manifest_serialize(const manifest_t *m, size_t *len);
int manifest_parse(const char *buf, size_t len, manifest_t *m);
/* Compute offsets and the stream index after a walk or a parse. */
void manifest_index(manifest_t *m);
/* A piece of the stream: bytes [off, off+len) of entry `entry`, at `buf_off` in a chunk. */
typedef struct { size_t entry; uint64_t off; uint64_t len; uint64_t buf_off; } piece_t;
/* Call fn for each piece of stream range [start, end); stops at the first non-zero return. */
int manifest_pieces(const manifest_t *m, uint64_t start, uint64_t end,
                    int (*fn)(const piece_t *, void *), void *arg);
void manifest_free(manifest_t *m);

/* A byte stream over some of the regular files of a manifest, in manifest order: all of them (what the
 * marker's chunk CRCs cover) or only those a re-stage sends. */
typedef struct {
    size_t n;          /* files with bytes in the stream */
    size_t *files;     /* their entry indexes */
    uint64_t *off;     /* their offsets in the stream */
    uint64_t total;
} stream_t;

/* The stream of the files i with size > 0 and (pick == NULL or pick[i]). */
void stream_build(const manifest_t *m, const unsigned char *pick, stream_t *s);
/* Like manifest_pieces, over stream s. */
int stream_pieces(const manifest_t *m, const stream_t *s, uint64_t start, uint64_t end,
                  int (*fn)(const piece_t *, void *), void *arg);
void stream_free(stream_t *s);
#endif
