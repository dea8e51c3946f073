/* An optional Redis module for the index's presence writes: KVI.HOLDERS does in C, on
 * one hash, what indexer/index/lua/holders.lua's holders_set / holders_clear do in Lua
 * for each key of an op, so apply.lua hands it a whole run of keys in one call.
 *
 *   KVI.HOLDERS <hash> <bx> <op> <bit position> <keys>
 *
 * op       S / C: set / clear in a model's group-0 bucket (a field holding '' has its
 *          value in `bx`, written by earlier versions: it is read there, and the next
 *          write moves it back to the bucket); T / K: set / clear in a plain hash (`bx`
 *          is not read; '' is an empty holder list)
 * bit      slot id * 4 + tier, 0 <= bit < 2^32
 * keys     a packed run of 8-byte block keys, applied in order
 *
 * A value is the sorted list of its holders, u32 little-endian `slot * 16 + tier bits`;
 * no holder left: the field is deleted. A stored value whose length is not a multiple of
 * 4 is left as it is (the index never writes one).
 *
 * Reply: [fields added, fields deleted] (apply.lua keeps the bucket's block count).
 * The effects are replicated as HSET / HDEL, so replicas and the AOF need no module. */
#include <stdint.h>
#include <string.h>

#include "redismodule.h"

#define KEY_BYTES 8
#define ENTRY_BYTES 4

static uint32_t read_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void write_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* holders.lua's holder_find: the index of `slot`'s entry (1, *entry set) or where it
 * would go (0); the same binary search, so an unsorted list gives the same answer. */
static int holder_find(const unsigned char *v, size_t n, uint64_t slot, size_t *at,
                       uint32_t *entry) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        uint32_t e = read_u32(v + mid * ENTRY_BYTES);
        uint64_t s = e >> 4;
        if (s < slot) {
            lo = mid + 1;
        } else if (s > slot) {
            hi = mid;
        } else {
            *at = mid;
            *entry = e;
            return 1;
        }
    }
    *at = lo;
    return 0;
}

/* A value built from `v`: its first `at` entries, then `mid` (if `with_mid`), then its
 * entries from `rest` on. */
static RedisModuleString *splice(RedisModuleCtx *ctx, const unsigned char *v, size_t n,
                                 size_t at, int with_mid, uint32_t mid, size_t rest) {
    size_t len = (at + (with_mid ? 1 : 0) + (n - rest)) * ENTRY_BYTES;
    unsigned char stack[256];
    unsigned char *buf = len <= sizeof stack ? stack : RedisModule_Alloc(len);
    unsigned char *p = buf;
    memcpy(p, v, at * ENTRY_BYTES);
    p += at * ENTRY_BYTES;
    if (with_mid) {
        write_u32(p, mid);
        p += ENTRY_BYTES;
    }
    memcpy(p, v + rest * ENTRY_BYTES, (n - rest) * ENTRY_BYTES);
    RedisModuleString *out = RedisModule_CreateString(ctx, (const char *)buf, len);
    if (buf != stack) RedisModule_Free(buf);
    return out;
}

/* holders_set: the value with tier bit `m` of `slot` set, or NULL when it was set (or
 * the value is malformed). `v` NULL: no value. */
static RedisModuleString *holders_set(RedisModuleCtx *ctx, const unsigned char *v,
                                      size_t len, uint64_t slot, uint32_t m) {
    uint32_t fresh = (uint32_t)(slot * 16 + m);  /* struct.pack('<I4') keeps 32 bits */
    if (v == NULL) {
        unsigned char one[ENTRY_BYTES];
        write_u32(one, fresh);
        return RedisModule_CreateString(ctx, (const char *)one, ENTRY_BYTES);
    }
    if (len % ENTRY_BYTES != 0) return NULL;
    size_t n = len / ENTRY_BYTES, at;
    uint32_t e;
    if (holder_find(v, n, slot, &at, &e)) {
        if ((e / m) % 2 == 1) return NULL;
        return splice(ctx, v, n, at, 1, e + m, at + 1);
    }
    return splice(ctx, v, n, at, 1, fresh, at);
}

/* holders_clear: the value with tier bit `m` of `slot` cleared (empty when no holder is
 * left), or NULL when it was not set (or there is no value, or it is malformed). */
static RedisModuleString *holders_clear(RedisModuleCtx *ctx, const unsigned char *v,
                                        size_t len, uint64_t slot, uint32_t m) {
    if (v == NULL || len % ENTRY_BYTES != 0) return NULL;
    size_t n = len / ENTRY_BYTES, at;
    uint32_t e;
    if (!holder_find(v, n, slot, &at, &e) || (e / m) % 2 == 0) return NULL;
    if ((uint64_t)(e - m) == slot * 16) return splice(ctx, v, n, at, 0, 0, at + 1);
    return splice(ctx, v, n, at, 1, e - m, at + 1);
}

/* What one call changes, kept for the replication of its effects. */
typedef struct {
    RedisModuleString **sets;     /* field, value, ... of the hash */
    RedisModuleString **dels;     /* fields deleted from the hash */
    RedisModuleString **bx_dels;  /* fields deleted from bx */
    size_t n_sets, n_dels, n_bx_dels;
    long long added, deleted;
    RedisModuleString *fresh;  /* the op's one-holder value, shared by the keys it adds */
} Changes;

typedef struct {
    RedisModuleKey *hash, *bx;  /* bx NULL: a plain hash */
    uint64_t slot;
    uint32_t m;
    int set;
} Op;

/* The value of `field` in the op's store (NULL: none), and whether it is in bx. */
static RedisModuleString *store_get(const Op *op, RedisModuleString *field, int *big) {
    RedisModuleString *v = NULL;
    *big = 0;
    RedisModule_HashGet(op->hash, REDISMODULE_HASH_NONE, field, &v, NULL);
    if (v != NULL && op->bx != NULL) {
        size_t len;
        RedisModule_StringPtrLen(v, &len);
        if (len == 0) {
            RedisModule_FreeString(NULL, v);
            v = NULL;
            *big = 1;
            RedisModule_HashGet(op->bx, REDISMODULE_HASH_NONE, field, &v, NULL);
        }
    }
    return v;
}

/* Apply the op to one key; `field` is kept by `ch` or freed. */
static void apply_key(RedisModuleCtx *ctx, const Op *op, RedisModuleString *field,
                      Changes *ch) {
    int big;
    RedisModuleString *old = store_get(op, field, &big);
    const unsigned char *v = NULL;
    size_t len = 0;
    if (old != NULL) v = (const unsigned char *)RedisModule_StringPtrLen(old, &len);
    RedisModuleString *now;
    if (op->set && old == NULL) {  /* most stored blocks are new: one value for all */
        if (ch->fresh == NULL) ch->fresh = holders_set(ctx, NULL, 0, op->slot, op->m);
        RedisModule_RetainString(NULL, ch->fresh);
        now = ch->fresh;
    } else {
        now = op->set ? holders_set(ctx, v, len, op->slot, op->m)
                      : holders_clear(ctx, v, len, op->slot, op->m);
    }
    if (old != NULL) RedisModule_FreeString(NULL, old);
    if (now == NULL) {
        RedisModule_FreeString(NULL, field);
        return;
    }
    size_t now_len;
    RedisModule_StringPtrLen(now, &now_len);
    if (now_len == 0) {
        RedisModule_FreeString(NULL, now);
        RedisModule_HashSet(op->hash, REDISMODULE_HASH_NONE, field, REDISMODULE_HASH_DELETE,
                            NULL);
        ch->dels[ch->n_dels++] = field;
        ch->deleted++;
    } else {
        RedisModule_HashSet(op->hash, REDISMODULE_HASH_NONE, field, now, NULL);
        ch->sets[ch->n_sets++] = field;
        ch->sets[ch->n_sets++] = now;
        if (old == NULL) ch->added++;
    }
    if (big) {
        RedisModule_HashSet(op->bx, REDISMODULE_HASH_NONE, field, REDISMODULE_HASH_DELETE,
                            NULL);
        RedisModule_RetainString(NULL, field);
        ch->bx_dels[ch->n_bx_dels++] = field;
    }
}

static void free_all(RedisModuleString **v, size_t n) {
    for (size_t i = 0; i < n; i++) RedisModule_FreeString(NULL, v[i]);
}

/* Replicate what changed as HSET / HDEL (sets first: a hash losing its last fields while
 * gaining others is never deleted on a replica), notify, and free the strings. */
static void publish(RedisModuleCtx *ctx, RedisModuleString *hash, RedisModuleString *bx,
                    Changes *ch) {
    if (ch->n_sets > 0) {
        RedisModule_Replicate(ctx, "HSET", "sv", hash, ch->sets, ch->n_sets);
        RedisModule_NotifyKeyspaceEvent(ctx, REDISMODULE_NOTIFY_HASH, "hset", hash);
    }
    if (ch->n_dels > 0) {
        RedisModule_Replicate(ctx, "HDEL", "sv", hash, ch->dels, ch->n_dels);
        RedisModule_NotifyKeyspaceEvent(ctx, REDISMODULE_NOTIFY_HASH, "hdel", hash);
    }
    if (ch->n_bx_dels > 0) {
        RedisModule_Replicate(ctx, "HDEL", "sv", bx, ch->bx_dels, ch->n_bx_dels);
        RedisModule_NotifyKeyspaceEvent(ctx, REDISMODULE_NOTIFY_HASH, "hdel", bx);
    }
    free_all(ch->sets, ch->n_sets);
    free_all(ch->dels, ch->n_dels);
    free_all(ch->bx_dels, ch->n_bx_dels);
    if (ch->fresh != NULL) RedisModule_FreeString(NULL, ch->fresh);
}

static int is_hash_or_empty(RedisModuleKey *key) {
    int type = RedisModule_KeyType(key);
    return type == REDISMODULE_KEYTYPE_EMPTY || type == REDISMODULE_KEYTYPE_HASH;
}

/* Parse op letter and bit position; 0 on malformed input. */
static int parse_op(RedisModuleString *kind_arg, RedisModuleString *bit_arg, Op *op,
                    int *bucket) {
    size_t len;
    const char *kind = RedisModule_StringPtrLen(kind_arg, &len);
    long long bit;
    if (len != 1 || RedisModule_StringToLongLong(bit_arg, &bit) != REDISMODULE_OK
        || bit < 0 || bit > 0xFFFFFFFFLL) {
        return 0;
    }
    switch (kind[0]) {
    case 'S': op->set = 1; *bucket = 1; break;
    case 'C': op->set = 0; *bucket = 1; break;
    case 'T': op->set = 1; *bucket = 0; break;
    case 'K': op->set = 0; *bucket = 0; break;
    default: return 0;
    }
    op->slot = (uint64_t)bit / 4;
    op->m = 1u << (bit % 4);
    return 1;
}

static int run_op(RedisModuleCtx *ctx, RedisModuleString **argv, Op *op,
                  const char *keys, size_t count) {
    Changes ch = {0};
    ch.sets = RedisModule_Alloc(sizeof(RedisModuleString *) * (2 * count + 1));
    ch.dels = RedisModule_Alloc(sizeof(RedisModuleString *) * (count + 1));
    ch.bx_dels = RedisModule_Alloc(sizeof(RedisModuleString *) * (count + 1));
    for (size_t i = 0; i < count; i++) {
        RedisModuleString *field =
            RedisModule_CreateString(ctx, keys + i * KEY_BYTES, KEY_BYTES);
        apply_key(ctx, op, field, &ch);
    }
    publish(ctx, argv[1], argv[2], &ch);
    RedisModule_Free(ch.sets);
    RedisModule_Free(ch.dels);
    RedisModule_Free(ch.bx_dels);
    RedisModule_ReplyWithArray(ctx, 2);
    RedisModule_ReplyWithLongLong(ctx, ch.added);
    RedisModule_ReplyWithLongLong(ctx, ch.deleted);
    return REDISMODULE_OK;
}

static int holders_command(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 6) return RedisModule_WrongArity(ctx);
    Op op = {0};
    int bucket;
    if (!parse_op(argv[3], argv[4], &op, &bucket)) {
        return RedisModule_ReplyWithError(
            ctx, "ERR KVI.HOLDERS wants op S, C, T or K and a bit position 0..2^32-1");
    }
    size_t keys_len;
    const char *keys = RedisModule_StringPtrLen(argv[5], &keys_len);
    if (keys_len % KEY_BYTES != 0) {
        return RedisModule_ReplyWithError(
            ctx, "ERR KVI.HOLDERS keys must be a run of 8-byte keys");
    }
    if (bucket && RedisModule_StringCompare(argv[1], argv[2]) == 0) {
        /* two handles on one key: a field deleted through one could free the hash the
         * other still points to */
        return RedisModule_ReplyWithError(ctx, "ERR KVI.HOLDERS wants a bucket and bx apart");
    }
    int mode = REDISMODULE_READ | REDISMODULE_WRITE;
    op.hash = RedisModule_OpenKey(ctx, argv[1], mode);
    if (bucket) op.bx = RedisModule_OpenKey(ctx, argv[2], mode);
    int ok = is_hash_or_empty(op.hash) && (op.bx == NULL || is_hash_or_empty(op.bx));
    int rc = ok ? run_op(ctx, argv, &op, keys, keys_len / KEY_BYTES)
                : RedisModule_ReplyWithError(ctx, REDISMODULE_ERRORMSG_WRONGTYPE);
    RedisModule_CloseKey(op.hash);
    if (op.bx != NULL) RedisModule_CloseKey(op.bx);
    return rc;
}

/* Keys 1 and 2 (the hash and bx), read and written: Redis Cluster routes by them. */
static int set_command_info(RedisModuleCommand *command) {
    RedisModuleCommandKeySpec specs[] = {
        {.flags = REDISMODULE_CMD_KEY_RW | REDISMODULE_CMD_KEY_ACCESS
                  | REDISMODULE_CMD_KEY_UPDATE,
         .begin_search_type = REDISMODULE_KSPEC_BS_INDEX,
         .bs.index = {.pos = 1},
         .find_keys_type = REDISMODULE_KSPEC_FK_RANGE,
         .fk.range = {.lastkey = 1, .keystep = 1, .limit = 0}},
        {0}};
    RedisModuleCommandInfo info = {
        .version = REDISMODULE_COMMAND_INFO_VERSION,
        .summary = "Set or clear a holder's tier bit in a run of presence fields",
        .since = "1.0.0",
        .arity = 6,
        .key_specs = specs,
    };
    return RedisModule_SetCommandInfo(command, &info);
}

int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    if (RedisModule_Init(ctx, "kvi", 1, REDISMODULE_APIVER_1) == REDISMODULE_ERR) {
        return REDISMODULE_ERR;
    }
    if (RedisModule_CreateCommand(ctx, "kvi.holders", holders_command, "write deny-oom", 1,
                                  2, 1) == REDISMODULE_ERR) {
        return REDISMODULE_ERR;
    }
    RedisModuleCommand *command = RedisModule_GetCommand(ctx, "kvi.holders");
    if (command == NULL || set_command_info(command) == REDISMODULE_ERR) {
        return REDISMODULE_ERR;
    }
    return REDISMODULE_OK;
}
