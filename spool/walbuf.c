/*
 * walbuf — the spool's SQLite VFS: the default one, except that a
 * connection's writes to the write-ahead log are gathered in memory and
 * reach the file in a few large writes per transaction instead of two per
 * page.
 *
 * SQLite writes a log frame as two calls, its 24-byte header and then the
 * page, so a group commit of 40 pages made 80 pwrite calls; on a machine
 * where a system call costs about a microsecond, a quarter of the spool
 * threads' CPU samples. Here consecutive writes to the log are appended to
 * a buffer, and the buffer is written:
 *   - when a commit frame's header (one whose "database size" field is not
 *     zero) has been appended; that frame's page then goes straight to the
 *     file. So a transaction is in the file before the xWrite of its last
 *     page returns, before SQLite publishes the commit in the shared
 *     wal-index, where other connections (the checkpointer, the dispatcher)
 *     look for frames. Nothing is kept once a commit header is, because
 *     SQLite may rewrite a commit frame's header alone when it recomputes
 *     the checksums of frames a transaction wrote twice. A failed write is
 *     that xWrite's error, and SQLite rolls back as it would for a failed
 *     pwrite;
 *   - before anything else is done with the file (read, size, truncate,
 *     sync, file controls, close) and before a write that does not follow
 *     the buffer, so the file always reads as if every write had gone
 *     straight through;
 *   - before it would pass WALBUF_MAX bytes.
 * Frames of a transaction that is rolled back may still be written: they
 * lie past the log's last commit, where SQLite would have written them too
 * and where nothing reads them. A kill loses only frames of a transaction
 * that had not committed. Every other file (the database, its wal-index)
 * is the default VFS's own, untouched.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "spool_int.h"

#define WAL_HEADER_BYTES 32       /* the log's own header, at offset 0 */
#define WAL_FRAME_HEADER_BYTES 24 /* before each page */
/* The default VFS writes at most 128 KiB - 1 bytes per call (os_unix.c
 * masks the length with 0x1ffff), so a buffer is written before it would
 * pass that. */
#define WALBUF_MAX (124 * 1024)

typedef struct wal_file {
    sqlite3_file base;  /* pMethods = &wal_methods */
    sqlite3_file *real; /* the default VFS's file: the same allocation, after this struct */
    unsigned char *buf; /* WALBUF_MAX bytes, from the first write; pending: [off, off + len) */
    size_t len;
    sqlite3_int64 off;
    sqlite3_int64 commit_page_at; /* where the page of the last commit frame goes, or -1 */
} wal_file;

static sqlite3_vfs *base_vfs; /* the default VFS */
static sqlite3_vfs spool_vfs;

static int flush(wal_file *w) {
    if (w->len == 0)
        return SQLITE_OK;
    size_t n = w->len;
    w->len = 0;
    return w->real->pMethods->xWrite(w->real, w->buf, (int)n, w->off);
}

/* Bytes 4..7 of a frame header: the database's size after the commit it
 * ends, or 0 when it ends none. */
static bool ends_commit(const unsigned char *h) {
    return (h[4] | h[5] | h[6] | h[7]) != 0;
}

static int wal_write(sqlite3_file *f, const void *data, int amt, sqlite3_int64 ofst) {
    wal_file *w = (wal_file *)f;
    size_t n = (size_t)amt;
    if (w->len && (ofst != w->off + (sqlite3_int64)w->len || w->len + n > WALBUF_MAX)) {
        int rc = flush(w);
        if (rc != SQLITE_OK)
            return rc;
    }
    /* Straight through, nothing being pending then: the commit frame's page
     * (its header went out with everything before it), a write too big to
     * gather (what was pending has just been written), or no buffer. */
    if (ofst == w->commit_page_at || n > WALBUF_MAX ||
        (!w->buf && !(w->buf = malloc(WALBUF_MAX)))) {
        w->commit_page_at = -1;
        return w->real->pMethods->xWrite(w->real, data, amt, ofst);
    }
    if (w->len == 0)
        w->off = ofst;
    memcpy(w->buf + w->len, data, n);
    w->len += n;
    if (n == WAL_FRAME_HEADER_BYTES && ofst >= WAL_HEADER_BYTES && ends_commit(data)) {
        w->commit_page_at = ofst + WAL_FRAME_HEADER_BYTES;
        return flush(w);
    }
    return SQLITE_OK;
}

static int wal_close(sqlite3_file *f) {
    wal_file *w = (wal_file *)f;
    int rc = flush(w);
    int rc2 = w->real->pMethods->xClose(w->real);
    free(w->buf);
    w->buf = NULL;
    return rc != SQLITE_OK ? rc : rc2;
}

static sqlite3_file *real_of(sqlite3_file *f) {
    return ((wal_file *)f)->real;
}

/* The rest: what is pending goes to the file first, then the default VFS's
 * method. */
static int wal_read(sqlite3_file *f, void *data, int amt, sqlite3_int64 ofst) {
    int rc = flush((wal_file *)f);
    return rc != SQLITE_OK ? rc : real_of(f)->pMethods->xRead(real_of(f), data, amt, ofst);
}
static int wal_truncate(sqlite3_file *f, sqlite3_int64 size) {
    int rc = flush((wal_file *)f);
    return rc != SQLITE_OK ? rc : real_of(f)->pMethods->xTruncate(real_of(f), size);
}
static int wal_sync(sqlite3_file *f, int flags) {
    int rc = flush((wal_file *)f);
    return rc != SQLITE_OK ? rc : real_of(f)->pMethods->xSync(real_of(f), flags);
}
static int wal_file_size(sqlite3_file *f, sqlite3_int64 *size) {
    int rc = flush((wal_file *)f);
    return rc != SQLITE_OK ? rc : real_of(f)->pMethods->xFileSize(real_of(f), size);
}
static int wal_file_control(sqlite3_file *f, int op, void *arg) {
    int rc = flush((wal_file *)f);
    return rc != SQLITE_OK ? rc : real_of(f)->pMethods->xFileControl(real_of(f), op, arg);
}

/* Locks are the database file's business; the log's are passed on as is. */
static int wal_lock(sqlite3_file *f, int level) {
    return real_of(f)->pMethods->xLock(real_of(f), level);
}
static int wal_unlock(sqlite3_file *f, int level) {
    return real_of(f)->pMethods->xUnlock(real_of(f), level);
}
static int wal_check_reserved(sqlite3_file *f, int *out) {
    return real_of(f)->pMethods->xCheckReservedLock(real_of(f), out);
}
static int wal_sector_size(sqlite3_file *f) {
    return real_of(f)->pMethods->xSectorSize(real_of(f));
}
static int wal_device(sqlite3_file *f) {
    return real_of(f)->pMethods->xDeviceCharacteristics(real_of(f));
}

static const sqlite3_io_methods wal_methods = {
    .iVersion = 1, /* a log is never memory-mapped and has no wal-index of its own */
    .xClose = wal_close,
    .xRead = wal_read,
    .xWrite = wal_write,
    .xTruncate = wal_truncate,
    .xSync = wal_sync,
    .xFileSize = wal_file_size,
    .xLock = wal_lock,
    .xUnlock = wal_unlock,
    .xCheckReservedLock = wal_check_reserved,
    .xFileControl = wal_file_control,
    .xSectorSize = wal_sector_size,
    .xDeviceCharacteristics = wal_device,
};

static int vfs_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags,
                    int *out_flags) {
    (void)vfs;
    if (!(flags & SQLITE_OPEN_WAL)) /* any other file: the default VFS's, in place */
        return base_vfs->xOpen(base_vfs, name, f, flags, out_flags);
    wal_file *w = (wal_file *)f;
    memset(w, 0, sizeof *w);
    w->real = (sqlite3_file *)(w + 1);
    w->commit_page_at = -1;
    int rc = base_vfs->xOpen(base_vfs, name, w->real, flags, out_flags);
    if (rc != SQLITE_OK) {
        if (w->real->pMethods)
            w->real->pMethods->xClose(w->real);
        return rc; /* base.pMethods stays NULL: SQLite will not close it */
    }
    w->base.pMethods = &wal_methods;
    return SQLITE_OK;
}

static void register_vfs(void) {
    base_vfs = sqlite3_vfs_find(NULL);
    if (!base_vfs)
        return;
    /* The default VFS's methods, which take what they need from the
     * sqlite3_vfs they are given (pAppData, mxPathname): copied with it. */
    spool_vfs = *base_vfs;
    spool_vfs.zName = "amp-spool";
    spool_vfs.szOsFile = (int)sizeof(wal_file) + base_vfs->szOsFile;
    spool_vfs.pNext = NULL;
    spool_vfs.xOpen = vfs_open;
    if (sqlite3_vfs_register(&spool_vfs, 0) != SQLITE_OK)
        base_vfs = NULL;
}

const char *amp_spool_vfs(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_vfs);
    return base_vfs ? spool_vfs.zName : NULL; /* NULL: SQLite's default */
}
