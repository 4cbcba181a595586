/* SHA-256 (FIPS 180-4), used for the manifest digest and the content key. */
#ifndef AEGIS_SHA256_H
#define AEGIS_SHA256_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t nbytes;
    unsigned char block[64];
    size_t used;
} sha256_ctx;

void sha256_init(sha256_ctx *c);
void sha256_update(sha256_ctx *c, const void *data, size_t len);
void sha256_final(sha256_ctx *c, unsigned char out[32]);
/* hex digest of a buffer into out[65] */
void sha256_hex(const void *data, size_t len, char out[65]);
#endif
