/*
 * _milter.c -- thin binding of Sendmail's libmilter for Python.
 *
 * The C layer only translates: libmilter callbacks become method calls on the
 * Python handler object of the SMTP connection, and libmilter actions become
 * methods of a Context object.  Policy (what to negotiate, what to answer on an
 * exception) lives in the Python layer, libmilter_ext/__init__.py.  Every
 * stage callback is a small function that packs libmilter's arguments and
 * hands them to dispatch(), which runs the stage: GIL, carried verdict,
 * handler method, verdict and no-reply rules.
 *
 * Threading: Debian's libmilter runs one connection's callbacks on whichever
 * worker thread is free, so every callback takes the GIL with PyGILState_Ensure
 * and gives it back before returning; nothing thread-specific is kept per
 * connection.  Every libmilter call that may block (smfi_main, writes to the MTA)
 * runs with the GIL released.
 *
 * Each GIL hand-off between libmilter's threads costs futex calls and context
 * switches, so callbacks that need no Python answer without the GIL: a
 * negotiation whose answer the class's template gives (the context from a
 * pool, the handler made at the first stage that enters Python: make_handler),
 * deferred stages (answer CONTINUE, arguments copied, the method run by the
 * next stage that takes the GIL: run_pending), filtered header fields, and a
 * close whose Python work can wait (the context queued for release_closed).
 * For the same reason eom's header changes do not each release the GIL to
 * write: they are queued on the context and sent with the next other write,
 * or after eom returned and gave the GIL back (perform, write_at_eom).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <libmilter/mfapi.h>
#include <libmilter/mfdef.h>

/* Stages: index into stage_names and the method called on the handler. */
enum stage {
    ST_IDLE = 0,
    ST_NEGOTIATE,
    ST_CONNECT,
    ST_HELO,
    ST_ENVFROM,
    ST_ENVRCPT,
    ST_DATA,
    ST_UNKNOWN,
    ST_HEADER,
    ST_EOH,
    ST_BODY,
    ST_EOM,
    ST_ABORT,
    ST_CLOSE,
    ST_COUNT
};

static const char *const stage_names[ST_COUNT] = {
    "idle", "negotiate", "connect", "helo", "envfrom", "envrcpt", "data",
    "unknown", "header", "eoh", "body", "eom", "abort", "close",
};

/* The no-reply protocol bit of each stage (0: the stage always replies). */
static const unsigned long stage_nr_bit[ST_COUNT] = {
    [ST_CONNECT] = SMFIP_NR_CONN, [ST_HELO] = SMFIP_NR_HELO,
    [ST_ENVFROM] = SMFIP_NR_MAIL, [ST_ENVRCPT] = SMFIP_NR_RCPT,
    [ST_DATA] = SMFIP_NR_DATA,    [ST_UNKNOWN] = SMFIP_NR_UNKN,
    [ST_HEADER] = SMFIP_NR_HDR,   [ST_EOH] = SMFIP_NR_EOH,
    [ST_BODY] = SMFIP_NR_BODY,
};

#define NO_VERDICT (-1)

/* Process-wide state: libmilter itself is a process-wide singleton. */
struct entry;

static struct {
    PyObject *error_hook;  /* callable(handler, stage, exc) -> verdict */
    PyObject *method_names[ST_COUNT];
    PyObject *negotiate_name;
    PyObject *error;       /* libmilter_ext._milter.MilterError */
    PyObject *stage_error; /* ... .StageError(MilterError) */
    char *name;            /* registered filter name (libmilter keeps the pointer) */
    PyObject *parked;      /* {SMFICTX address: closed Context}: what SMFIC_QUIT_NC keeps */
} S;

struct pending;
struct change;

typedef struct ContextObject {
    PyObject_HEAD
    SMFICTX *ctx;          /* NULL once the connection is closed */
    PyObject *handler;
    unsigned long actions; /* negotiated SMFIF_* */
    unsigned long protocol;/* negotiated SMFIP_* */
    int stage;             /* callback running now, ST_IDLE between callbacks */
    /* Verdicts carried from no-reply stages, answered at every later stage that
     * replies (without calling Python) until their scope ends, as if the stage
     * had replied itself: */
    int conn_verdict;      /* connect/helo/unknown: the rest of the SMTP session */
    int msg_verdict;       /* a message stage: until abort, the next MAIL or eom */
    int neg_verdict;       /* negotiation failed: every session on the milter connection */
    PyObject *header_filter; /* set_header_filter's bytes, owning what filter points to */
    const char *filter;    /* "name\0name\0\0" (lower case) or NULL: all fields */
    struct entry *entry;   /* the factory (and class) the connection negotiated with */
    int lazy;              /* the handler is made at the first stage that enters Python */
    /* Deferred stages (SMFIP_NR_* bits of connect, helo, data, unknown): answered
     * in C at once; the handler method runs later, in the GIL hold of the next
     * stage that enters Python (see run_pending). */
    unsigned long deferred;
    struct pending *pending;    /* deferred calls not run yet, oldest first */
    struct pending **pending_end;
    int npending;
    size_t pending_text;   /* octets of text the pending calls hold */
    int close_deferred;    /* close() runs after the callback, at the next GIL hold */
    SMFICTX *closed_ctx;   /* while queued for release: the SMFICTX it was parked under */
    struct ContextObject *release_next;
    /* Header changes made in eom, not sent yet, in call order (see perform). */
    struct change *changes;
    struct change **changes_end;
} ContextObject;

/* One deferred stage call, its arguments copied out of libmilter's buffers. */
struct pending {
    struct pending *next;
    int stage;
    int has_text;          /* text is the hostname / HELO name / command, not NULL */
    size_t value_at;       /* header: the value starts at text + value_at (the name at text) */
    int has_addr;
    struct sockaddr_storage addr;
    char text[];
};

/* At most this many deferred calls, holding at most this many octets of copied
 * text, wait per connection; one more runs them. */
#define MAX_PENDING 16
#define MAX_PENDING_TEXT 65536

static PyTypeObject Context_Type;

/* ---- factories and negotiation templates -------------------------------- */

/*
 * The factory of new connections, with the class it makes (if the Python
 * layer knows it) and, per offer from the MTA, that class's negotiation
 * answer: a template.  With a template, negotiate answers without the GIL
 * (the context comes from a pool filled at other GIL holds) and the handler
 * is made at the first stage that enters Python, by the factory entry the
 * connection negotiated with -- also after set_factory() replaced it.  An
 * entry lives while the current pointer or a context holds it; its Python
 * references go (GIL held) with the last.
 */
#define MAX_SYMLISTS 8

struct template {
    struct template *next;
    unsigned long offer_actions, offer_protocol;
    unsigned long actions, protocol, deferred;
    int close_deferred;
    int nsyms;
    struct {
        int where;
        char *names;
    } syms[MAX_SYMLISTS];
    char *filter;          /* NULL: all header fields reach header() */
};

struct entry {
    atomic_long refs;
    PyObject *make;        /* callable(ctx) -> handler */
    PyObject *cls;         /* the class make returns, or NULL: negotiate in Python */
    _Atomic(struct template *) templates; /* written with the GIL, read without */
};

static pthread_mutex_t entry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct entry *current_entry;   /* under entry_lock */

/* The current entry with a reference for the caller, or NULL.  No GIL needed. */
static struct entry *
entry_get(void)
{
    struct entry *e;

    pthread_mutex_lock(&entry_lock);
    if ((e = current_entry) != NULL)
        atomic_fetch_add(&e->refs, 1);
    pthread_mutex_unlock(&entry_lock);
    return e;
}

/* Drop a reference; GIL held. */
static void
entry_put(struct entry *e)
{
    struct template *t, *next;
    int i;

    if (e == NULL || atomic_fetch_sub(&e->refs, 1) != 1)
        return;
    for (t = atomic_load(&e->templates); t != NULL; t = next) {
        next = t->next;
        for (i = 0; i < t->nsyms; i++)
            PyMem_RawFree(t->syms[i].names);
        PyMem_RawFree(t->filter);
        PyMem_RawFree(t);
    }
    Py_XDECREF(e->make);
    Py_XDECREF(e->cls);
    PyMem_RawFree(e);
}

static const struct template *
find_template(struct entry *e, unsigned long actions, unsigned long protocol)
{
    const struct template *t = atomic_load(&e->templates);

    for (; t != NULL; t = t->next)
        if (t->offer_actions == actions && t->offer_protocol == protocol)
            return t;
    return NULL;
}

/* Contexts made at GIL holds for negotiations that run without the GIL. */
#define POOL_SIZE 32
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ContextObject *pool[POOL_SIZE];
static atomic_int pool_n;
static void pool_fill(void);

/* ---- the GIL on libmilter's threads ------------------------------------ */

/*
 * PyGILState_Ensure on a thread without a Python thread state makes one and
 * Release destroys it again: per callback that is an mmap/munmap of a frame
 * stack (and a TLB shootdown).  So the first callback on each libmilter thread
 * takes one extra reference that keeps the thread's state until the thread
 * ends.  That is per OS thread, never per connection: Debian's libmilter moves
 * a connection between threads freely.
 */
static pthread_key_t keep_key;

/*
 * Shutdown: once smfi_main has returned, the interpreter is about to finalize
 * while libmilter's threads may still deliver a callback (a connection closing,
 * say).  shutdown() closes the gate and waits for those already inside; later
 * ones answer without touching Python (an ending thread never does).
 */
static atomic_int closing;
static atomic_int inflight;

/* GIL acquisitions by libmilter callbacks since the module was loaded: read by
 * tests and benchmarks through _gil_entries(). */
static atomic_ulong gil_entries;

/* Times a Context action let go of the GIL around a libmilter call that writes
 * to the MTA: read through _gil_releases(). */
static atomic_ulong gil_releases;
#define COUNT_RELEASE() atomic_fetch_add_explicit(&gil_releases, 1, memory_order_relaxed)

/* eoms whose queued header changes failed to go out after eom returned: read
 * through _eom_write_failures(). */
static atomic_ulong eom_write_failures;

/* Closed contexts whose references are dropped (and whose deferred close()
 * runs) at the next GIL hold of any callback, or at shutdown: a close that
 * needs no Python then answers without taking the GIL.  A lock-free stack. */
static _Atomic(void *) release_head;
static void release_closed(void);

/* Thread exit: queue the kept state for deletion by the next callback that
 * holds the GIL (delete_dead_states), so an ending thread does not queue for
 * the GIL itself: under load libmilter's pool starts and ends workers all the
 * time, and each such GIL hand-off costs futex calls and context switches.
 * glibc has already cleared Python's own thread-local pointer by now, so the
 * state comes from our key's value.  A state queued once the gate is closed
 * is left to the interpreter's finalization, which deletes every state. */
struct dead_state {
    PyThreadState *ts;
    struct dead_state *next;
};
static _Atomic(struct dead_state *) dead_head;

static void
drop_kept_state(void *state)
{
    struct dead_state *d;

    if (state == NULL || (d = malloc(sizeof(*d))) == NULL)
        return; /* without memory the state is left to finalization */
    d->ts = state;
    d->next = atomic_load(&dead_head);
    while (!atomic_compare_exchange_weak(&dead_head, &d->next, d))
        ;
}

/* Delete the states of ended threads; GIL held, their threads are gone. */
static void
delete_dead_states(void)
{
    struct dead_state *d = atomic_exchange(&dead_head, NULL), *next;

    for (; d != NULL; d = next) {
        next = d->next;
        PyThreadState_Clear(d->ts);
        PyThreadState_Delete(d->ts);
        free(d);
    }
}

/* Take the GIL for a callback; 0 (and no GIL) once the module is shutting down. */
static int
gil_enter(PyGILState_STATE *gs)
{
    atomic_fetch_add(&inflight, 1);
    if (atomic_load(&closing)) {
        atomic_fetch_sub(&inflight, 1);
        return 0;
    }
    *gs = PyGILState_Ensure();
    if (pthread_getspecific(keep_key) == NULL) {
        (void)PyGILState_Ensure();
        (void)pthread_setspecific(keep_key, PyThreadState_Get());
    }
    atomic_fetch_add_explicit(&gil_entries, 1, memory_order_relaxed);
    if (atomic_load_explicit(&release_head, memory_order_relaxed) != NULL)
        release_closed();
    if (atomic_load_explicit(&dead_head, memory_order_relaxed) != NULL)
        delete_dead_states();
    if (atomic_load_explicit(&pool_n, memory_order_relaxed) < POOL_SIZE / 2)
        pool_fill();
    return 1;
}

static void
gil_leave(PyGILState_STATE gs)
{
    PyGILState_Release(gs);
    atomic_fetch_sub(&inflight, 1);
}

/* ---- helpers ---------------------------------------------------------- */

static PyObject *
decode(const char *s, Py_ssize_t len)
{
    if (s == NULL)
        Py_RETURN_NONE;
    if (len < 0)
        len = (Py_ssize_t)strlen(s);
    return PyUnicode_DecodeUTF8(s, len, "surrogateescape");
}

/* Convert str (UTF-8, surrogateescape) or bytes to a new bytes object without NULs. */
static PyObject *
encode(PyObject *obj, const char *what)
{
    PyObject *b;

    if (PyUnicode_Check(obj))
        b = PyUnicode_AsEncodedString(obj, "utf-8", "surrogateescape");
    else if (PyBytes_Check(obj)) {
        b = obj;
        Py_INCREF(b);
    } else {
        PyErr_Format(PyExc_TypeError, "%s must be str or bytes, not %.100s", what,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (b != NULL && memchr(PyBytes_AS_STRING(b), '\0', PyBytes_GET_SIZE(b)) != NULL) {
        Py_DECREF(b);
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL characters", what);
        return NULL;
    }
    return b;
}

/* Optional str/bytes argument: None gives NULL with *out = NULL and success. */
static int
encode_opt(PyObject *obj, const char *what, PyObject **out)
{
    *out = NULL;
    if (obj == NULL || obj == Py_None)
        return 0;
    *out = encode(obj, what);
    return *out == NULL ? -1 : 0;
}

static PyObject *
check_result(int rc, const char *call)
{
    if (rc != MI_SUCCESS) {
        PyErr_Format(S.error, "%s failed", call);
        return NULL;
    }
    Py_RETURN_NONE;
}

static const char *
action_flag_name(unsigned long flag)
{
    switch (flag) {
    case SMFIF_ADDHDRS: return "SMFIF_ADDHDRS";
    case SMFIF_CHGBODY: return "SMFIF_CHGBODY";
    case SMFIF_ADDRCPT: return "SMFIF_ADDRCPT";
    case SMFIF_DELRCPT: return "SMFIF_DELRCPT";
    case SMFIF_CHGHDRS: return "SMFIF_CHGHDRS";
    case SMFIF_QUARANTINE: return "SMFIF_QUARANTINE";
    case SMFIF_CHGFROM: return "SMFIF_CHGFROM";
    case SMFIF_ADDRCPT_PAR: return "SMFIF_ADDRCPT_PAR";
    default: return "an action";
    }
}

/* The context may act now: inside a callback of the given stages (a mask of
 * 1 << stage, 0: any) with the given SMFIF_* action (0: none) negotiated. */
static int
usable(ContextObject *self, const char *action, unsigned int stages, unsigned long flag)
{
    if (self->ctx == NULL) {
        PyErr_Format(S.stage_error, "%s: the connection is closed", action);
        return 0;
    }
    if (self->stage == ST_IDLE) {
        PyErr_Format(S.stage_error, "%s: only callable inside a milter callback", action);
        return 0;
    }
    if (stages != 0 && (stages & (1u << self->stage)) == 0) {
        PyErr_Format(S.stage_error, "%s is not allowed in %s (%s)", action,
                     stage_names[self->stage],
                     stages == (1u << ST_EOM) ? "only in eom"
                     : stages == (1u << ST_NEGOTIATE) ? "only in negotiate"
                                                     : "wrong stage");
        return 0;
    }
    if (flag != 0 && (self->actions & flag) == 0) {
        PyErr_Format(S.stage_error, "%s needs the %s action, which was not negotiated",
                     action, action_flag_name(flag));
        return 0;
    }
    return 1;
}

#define EOM_ONLY (1u << ST_EOM)
#define ANY_STAGE 0u

/* ---- Context methods: the libmilter actions ---------------------------- */

static PyObject *
Context_getsymval(ContextObject *self, PyObject *arg)
{
    PyObject *b, *res;
    char *v;

    if (!usable(self, "getsymval", ANY_STAGE, 0))
        return NULL;
    if ((b = encode(arg, "macro name")) == NULL)
        return NULL;
    v = smfi_getsymval(self->ctx, PyBytes_AS_STRING(b));
    res = decode(v, -1);
    Py_DECREF(b);
    return res;
}

static PyObject *
Context_setsymlist(ContextObject *self, PyObject *args)
{
    int where;
    PyObject *macros, *b;
    int rc;

    if (!PyArg_ParseTuple(args, "iO:setsymlist", &where, &macros))
        return NULL;
    if (!usable(self, "setsymlist", 1u << ST_NEGOTIATE, 0))
        return NULL;
    if ((b = encode(macros, "macro list")) == NULL)
        return NULL;
    rc = smfi_setsymlist(self->ctx, where, PyBytes_AS_STRING(b));
    Py_DECREF(b);
    return check_result(rc, "smfi_setsymlist");
}

/* setreply(rcode, xcode=None, *lines): one line -> smfi_setreply, several ->
 * smfi_setmlreply.  Text must already be safe (the Python layer makes it so). */
static PyObject *
Context_setreply(ContextObject *self, PyObject *args)
{
    Py_ssize_t n = PyTuple_GET_SIZE(args), i, nlines;
    PyObject *rcode = NULL, *xcode = NULL, *lines[32] = {0};
    const char *l[33] = {0};
    int rc = MI_FAILURE;
    PyObject *res = NULL;

    if (n < 1) {
        PyErr_SetString(PyExc_TypeError, "setreply() needs at least the reply code");
        return NULL;
    }
    nlines = n > 2 ? n - 2 : 0;
    if (nlines > 32) {
        PyErr_SetString(PyExc_ValueError, "setreply: at most 32 lines");
        return NULL;
    }
    if (!usable(self, "setreply", ANY_STAGE, 0))
        return NULL;
    if ((rcode = encode(PyTuple_GET_ITEM(args, 0), "rcode")) == NULL)
        goto done;
    if (n > 1 && encode_opt(PyTuple_GET_ITEM(args, 1), "xcode", &xcode) < 0)
        goto done;
    for (i = 0; i < nlines; i++) {
        if ((lines[i] = encode(PyTuple_GET_ITEM(args, i + 2), "reply line")) == NULL)
            goto done;
        l[i] = PyBytes_AS_STRING(lines[i]);
    }
    if (nlines <= 1)
        rc = smfi_setreply(self->ctx, PyBytes_AS_STRING(rcode),
                           xcode ? PyBytes_AS_STRING(xcode) : NULL, (char *)l[0]);
    else
        rc = smfi_setmlreply(self->ctx, PyBytes_AS_STRING(rcode),
                             xcode ? PyBytes_AS_STRING(xcode) : NULL, l[0], l[1], l[2],
                             l[3], l[4], l[5], l[6], l[7], l[8], l[9], l[10], l[11], l[12],
                             l[13], l[14], l[15], l[16], l[17], l[18], l[19], l[20], l[21],
                             l[22], l[23], l[24], l[25], l[26], l[27], l[28], l[29], l[30],
                             l[31], (char *)NULL);
    res = check_result(rc, nlines <= 1 ? "smfi_setreply" : "smfi_setmlreply");
done:
    Py_XDECREF(rcode);
    Py_XDECREF(xcode);
    for (i = 0; i < nlines; i++)
        Py_XDECREF(lines[i]);
    return res;
}

/* ---- writes to the MTA -------------------------------------------------- */

/*
 * The libmilter calls that write to the MTA, as data.  Header changes made in
 * eom do not write at once: they wait on the context, in call order, and go
 * out with the next other write (before it, in the same GIL release) or, if
 * none comes, after eom returned and gave the GIL back (write_at_eom).  So eom
 * lets go of the GIL once per other write at most, not once per header change:
 * each hand-off costs futex calls and context switches on a busy milter.
 */
enum write_kind {
    W_ADDHEADER, W_INSHEADER, W_CHGHEADER, W_ADDRCPT, W_ADDRCPT_PAR, W_DELRCPT,
    W_CHGFROM, W_REPLACEBODY, W_QUARANTINE, W_PROGRESS,
};

static const char *const write_calls[] = {
    "smfi_addheader", "smfi_insheader", "smfi_chgheader", "smfi_addrcpt",
    "smfi_addrcpt_par", "smfi_delrcpt", "smfi_chgfrom", "smfi_replacebody",
    "smfi_quarantine", "smfi_progress",
};

struct write {
    int kind;
    int idx;                 /* insheader, chgheader */
    const char *s1, *s2;     /* name, value; address, ESMTP args; reason (s2 may be NULL) */
    const unsigned char *body;
    int len;
};

/* A header change queued in eom; its strings live in text. */
struct change {
    struct change *next;
    struct write w;
    char text[];
};

/* One libmilter call; no GIL. */
static int
write_one(SMFICTX *ctx, const struct write *w)
{
    char *s1 = (char *)w->s1, *s2 = (char *)w->s2;

    switch (w->kind) {
    case W_ADDHEADER: return smfi_addheader(ctx, s1, s2);
    case W_INSHEADER: return smfi_insheader(ctx, w->idx, s1, s2);
    case W_CHGHEADER: return smfi_chgheader(ctx, s1, w->idx, s2);
    case W_ADDRCPT: return smfi_addrcpt(ctx, s1);
    case W_ADDRCPT_PAR: return smfi_addrcpt_par(ctx, s1, s2);
    case W_DELRCPT: return smfi_delrcpt(ctx, s1);
    case W_CHGFROM: return smfi_chgfrom(ctx, s1, s2);
    case W_REPLACEBODY: return smfi_replacebody(ctx, (unsigned char *)w->body, w->len);
    case W_QUARANTINE: return smfi_quarantine(ctx, s1);
    case W_PROGRESS: return smfi_progress(ctx);
    }
    return MI_FAILURE;
}

/* Send the queued changes in order, then w (if not NULL).  Returns the first
 * write that failed (those after it are not sent: the connection is broken),
 * or NULL.  No GIL. */
static const struct write *
write_all(SMFICTX *ctx, const struct change *q, const struct write *w)
{
    for (; q != NULL; q = q->next)
        if (write_one(ctx, &q->w) != MI_SUCCESS)
            return &q->w;
    return w != NULL && write_one(ctx, w) != MI_SUCCESS ? w : NULL;
}

/* The context's queued changes, handed to the caller; GIL held. */
static struct change *
take_changes(ContextObject *c)
{
    struct change *q = c->changes;

    c->changes = NULL;
    c->changes_end = &c->changes;
    return q;
}

/* No GIL needed. */
static void
free_changes(struct change *q)
{
    struct change *next;

    for (; q != NULL; q = next) {
        next = q->next;
        PyMem_RawFree(q);
    }
}

/* MilterError for a queued change that failed to go out; `when` says when. */
static void
queued_failed(const struct write *w, const char *when, const char *before)
{
    PyErr_Format(S.error, "%s failed for '%s' (a header change queued in eom, sent %s%s%s)",
                 write_calls[w->kind], w->s1, when, before,
                 *before ? ", which was not sent" : "");
}

/* An action that writes: the queued header changes, then w, with the GIL
 * released once.  A queued change that fails is raised here. */
static PyObject *
perform(ContextObject *self, const struct write *w)
{
    SMFICTX *ctx = self->ctx;
    struct change *q = take_changes(self);
    const struct write *failed;

    COUNT_RELEASE();
    Py_BEGIN_ALLOW_THREADS
    failed = write_all(ctx, q, w);
    Py_END_ALLOW_THREADS
    if (failed == w)
        PyErr_Format(S.error, "%s failed", write_calls[w->kind]);
    else if (failed != NULL)
        queued_failed(failed, "before ", write_calls[w->kind]);
    free_changes(q);
    if (failed != NULL)
        return NULL;
    Py_RETURN_NONE;
}

/*
 * Queue a header change made in eom (GIL held).  What libmilter would refuse
 * before writing (an empty name, a negative index) is refused now, with the
 * error it gave when the change was written at once.
 */
static PyObject *
queue_change(ContextObject *self, int kind, int idx, PyObject *name, PyObject *value)
{
    size_t ln = (size_t)PyBytes_GET_SIZE(name) + 1;
    size_t lv = value != NULL ? (size_t)PyBytes_GET_SIZE(value) + 1 : 0;
    struct change *ch;

    if (ln == 1 || (kind != W_ADDHEADER && idx < 0))
        return check_result(MI_FAILURE, write_calls[kind]);
    if ((ch = PyMem_RawMalloc(sizeof *ch + ln + lv)) == NULL)
        return PyErr_NoMemory();
    memcpy(ch->text, PyBytes_AS_STRING(name), ln);
    if (value != NULL)
        memcpy(ch->text + ln, PyBytes_AS_STRING(value), lv);
    ch->w = (struct write){.kind = kind, .idx = idx, .s1 = ch->text,
                           .s2 = value != NULL ? ch->text + ln : NULL};
    ch->next = NULL;
    *self->changes_end = ch;
    self->changes_end = &ch->next;
    Py_RETURN_NONE;
}

/* addheader(name, value, idx=-1): queued (see above) */
static PyObject *
Context_addheader(ContextObject *self, PyObject *args)
{
    PyObject *name, *value, *bn, *bv, *res = NULL;
    int idx = -1;

    if (!PyArg_ParseTuple(args, "OO|i:addheader", &name, &value, &idx))
        return NULL;
    if (!usable(self, "addheader", EOM_ONLY, SMFIF_ADDHDRS))
        return NULL;
    if ((bn = encode(name, "header name")) == NULL)
        return NULL;
    if ((bv = encode(value, "header value")) != NULL)
        res = queue_change(self, idx < 0 ? W_ADDHEADER : W_INSHEADER, idx, bn, bv);
    Py_DECREF(bn);
    Py_XDECREF(bv);
    return res;
}

/* chgheader(name, idx, value=None): queued (see above) */
static PyObject *
Context_chgheader(ContextObject *self, PyObject *args)
{
    PyObject *name, *value = Py_None, *bn, *bv, *res = NULL;
    int idx;

    if (!PyArg_ParseTuple(args, "Oi|O:chgheader", &name, &idx, &value))
        return NULL;
    if (!usable(self, "chgheader", EOM_ONLY, SMFIF_CHGHDRS))
        return NULL;
    if ((bn = encode(name, "header name")) == NULL)
        return NULL;
    if (encode_opt(value, "header value", &bv) == 0)
        res = queue_change(self, W_CHGHEADER, idx, bn, bv);
    Py_DECREF(bn);
    Py_XDECREF(bv);
    return res;
}

/* The actions on an address with optional ESMTP arguments. */
static PyObject *
address_write(ContextObject *self, int kind, PyObject *addr, PyObject *esmtp)
{
    PyObject *ba, *be, *res = NULL;
    struct write w = {.kind = kind};

    if ((ba = encode(addr, "address")) == NULL)
        return NULL;
    if (encode_opt(esmtp, "ESMTP arguments", &be) == 0) {
        w.s1 = PyBytes_AS_STRING(ba);
        w.s2 = be != NULL ? PyBytes_AS_STRING(be) : NULL;
        res = perform(self, &w);
    }
    Py_DECREF(ba);
    Py_XDECREF(be);
    return res;
}

static PyObject *
Context_addrcpt(ContextObject *self, PyObject *args)
{
    PyObject *addr, *esmtp = Py_None;

    if (!PyArg_ParseTuple(args, "O|O:addrcpt", &addr, &esmtp))
        return NULL;
    if (!usable(self, "addrcpt", EOM_ONLY, esmtp == Py_None ? SMFIF_ADDRCPT : SMFIF_ADDRCPT_PAR))
        return NULL;
    return address_write(self, esmtp == Py_None ? W_ADDRCPT : W_ADDRCPT_PAR, addr, esmtp);
}

static PyObject *
Context_chgfrom(ContextObject *self, PyObject *args)
{
    PyObject *addr, *esmtp = Py_None;

    if (!PyArg_ParseTuple(args, "O|O:chgfrom", &addr, &esmtp))
        return NULL;
    if (!usable(self, "chgfrom", EOM_ONLY, SMFIF_CHGFROM))
        return NULL;
    return address_write(self, W_CHGFROM, addr, esmtp);
}

static PyObject *
Context_delrcpt(ContextObject *self, PyObject *arg)
{
    if (!usable(self, "delrcpt", EOM_ONLY, SMFIF_DELRCPT))
        return NULL;
    return address_write(self, W_DELRCPT, arg, Py_None);
}

static PyObject *
Context_replacebody(ContextObject *self, PyObject *arg)
{
    Py_buffer buf;
    PyObject *res;
    struct write w = {.kind = W_REPLACEBODY};

    if (!usable(self, "replacebody", EOM_ONLY, SMFIF_CHGBODY))
        return NULL;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (buf.len > INT_MAX) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "replacebody: chunk too large");
        return NULL;
    }
    w.body = buf.buf;
    w.len = (int)buf.len;
    res = perform(self, &w);
    PyBuffer_Release(&buf);
    return res;
}

static PyObject *
Context_quarantine(ContextObject *self, PyObject *arg)
{
    PyObject *b, *res;
    struct write w = {.kind = W_QUARANTINE};

    if (!usable(self, "quarantine", EOM_ONLY, SMFIF_QUARANTINE))
        return NULL;
    if ((b = encode(arg, "reason")) == NULL)
        return NULL;
    w.s1 = PyBytes_AS_STRING(b);
    res = perform(self, &w);
    Py_DECREF(b);
    return res;
}

/* progress(): reaches the MTA at once (with the queued changes before it). */
static PyObject *
Context_progress(ContextObject *self, PyObject *Py_UNUSED(ignored))
{
    struct write w = {.kind = W_PROGRESS};

    if (!usable(self, "progress", EOM_ONLY, 0))
        return NULL;
    return perform(self, &w);
}

/* Only header fields with these names reach Python; the others are answered in
 * C without the GIL.  None: every field. */
static PyObject *
Context_set_header_filter(ContextObject *self, PyObject *names)
{
    PyObject *blob = NULL;

    if (names != Py_None) {
        const char *p, *end;

        if (!PyBytes_Check(names)) {
            PyErr_SetString(PyExc_TypeError, "set_header_filter: bytes or None");
            return NULL;
        }
        /* Non-empty names, each NUL-terminated, then one more NUL: header_wanted
         * walks it without a length. */
        p = end = PyBytes_AS_STRING(names);
        if (PyBytes_GET_SIZE(names) > 0)
            end += PyBytes_GET_SIZE(names) - 1;
        while (p < end && *p != '\0')
            p += strlen(p) + 1;
        if (PyBytes_GET_SIZE(names) == 0 || p != end || *end != '\0') {
            PyErr_SetString(PyExc_ValueError,
                            "set_header_filter: want b'name\\0name\\0\\0' (non-empty names)");
            return NULL;
        }
        blob = names;
        Py_INCREF(blob);
    }
    Py_XSETREF(self->header_filter, blob);
    self->filter = blob != NULL ? PyBytes_AS_STRING(blob) : NULL;
    Py_RETURN_NONE;
}

/* Stages whose handler method runs deferred: SMFIP_NR_* bits of connect,
 * helo, data and unknown (the Python layer decides which). */
static PyObject *
Context_set_deferred(ContextObject *self, PyObject *arg)
{
    const unsigned long allowed = SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_HDR | SMFIP_NR_DATA
                                  | SMFIP_NR_UNKN;
    unsigned long v = PyLong_AsUnsignedLong(arg);

    if (v == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if ((v & ~allowed) != 0) {
        PyErr_SetString(PyExc_ValueError, "set_deferred: only SMFIP_NR_CONN, SMFIP_NR_HELO, "
                        "SMFIP_NR_HDR, SMFIP_NR_DATA and SMFIP_NR_UNKN");
        return NULL;
    }
    self->deferred = v;
    Py_RETURN_NONE;
}

/* True: close() runs after libmilter's close callback returned, at the next
 * GIL hold by any callback (or at shutdown), with the context already closed. */
static PyObject *
Context_set_close_deferred(ContextObject *self, PyObject *arg)
{
    int v = PyObject_IsTrue(arg);

    if (v < 0)
        return NULL;
    self->close_deferred = v;
    Py_RETURN_NONE;
}

static PyMethodDef Context_methods[] = {
    {"set_deferred", (PyCFunction)Context_set_deferred, METH_O,
     "SMFIP_NR_* bits of the stages (connect, helo, header, data, unknown) that run deferred."},
    {"set_close_deferred", (PyCFunction)Context_set_close_deferred, METH_O,
     "True: close() runs at the next GIL hold, after the connection is gone."},
    {"set_header_filter", (PyCFunction)Context_set_header_filter, METH_O,
     "Header names (b'a\\0b\\0\\0', lower case) that reach header(); None: all."},
    {"getsymval", (PyCFunction)Context_getsymval, METH_O, "Value of a macro, or None."},
    {"setsymlist", (PyCFunction)Context_setsymlist, METH_VARARGS,
     "Macros wanted at a stage (negotiate only)."},
    {"setreply", (PyCFunction)Context_setreply, METH_VARARGS,
     "setreply(rcode, xcode=None, *lines): SMTP reply for a reject/tempfail."},
    {"addheader", (PyCFunction)Context_addheader, METH_VARARGS,
     "addheader(name, value, idx=-1): append, or insert at idx."},
    {"chgheader", (PyCFunction)Context_chgheader, METH_VARARGS,
     "chgheader(name, idx, value=None): change the idx-th (1-based) field; None deletes."},
    {"addrcpt", (PyCFunction)Context_addrcpt, METH_VARARGS, "addrcpt(rcpt, args=None)."},
    {"delrcpt", (PyCFunction)Context_delrcpt, METH_O, "delrcpt(rcpt)."},
    {"chgfrom", (PyCFunction)Context_chgfrom, METH_VARARGS, "chgfrom(sender, args=None)."},
    {"replacebody", (PyCFunction)Context_replacebody, METH_O, "Replace body (chunked)."},
    {"quarantine", (PyCFunction)Context_quarantine, METH_O, "Quarantine the message."},
    {"progress", (PyCFunction)Context_progress, METH_NOARGS, "Tell the MTA we are alive."},
    {NULL, NULL, 0, NULL},
};

static PyObject *
Context_get_stage(ContextObject *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString(stage_names[self->stage]);
}

static PyObject *
Context_get_actions(ContextObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->actions);
}

static PyObject *
Context_get_protocol(ContextObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->protocol);
}

static PyObject *
Context_get_closed(ContextObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->ctx == NULL);
}

static PyGetSetDef Context_getset[] = {
    {"stage", (getter)Context_get_stage, NULL, "Callback running now ('idle' outside).", NULL},
    {"actions", (getter)Context_get_actions, NULL, "Negotiated SMFIF_* flags.", NULL},
    {"protocol", (getter)Context_get_protocol, NULL, "Negotiated SMFIP_* flags.", NULL},
    {"closed", (getter)Context_get_closed, NULL, "True once the connection is closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static int
Context_traverse(ContextObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->handler);
    return 0;
}

static int
Context_clear(ContextObject *self)
{
    Py_CLEAR(self->handler);
    self->filter = NULL;
    Py_CLEAR(self->header_filter);
    return 0;
}

/* Forget the deferred calls not run (the connection is gone or answered). */
static void
drop_pending(ContextObject *c)
{
    struct pending *p = c->pending, *next;

    for (; p != NULL; p = next) {
        next = p->next;
        PyMem_RawFree(p);
    }
    c->pending = NULL;
    c->pending_end = &c->pending;
    c->npending = 0;
    c->pending_text = 0;
}

static void
Context_dealloc(ContextObject *self)
{
    PyObject_GC_UnTrack(self);
    drop_pending(self);
    free_changes(take_changes(self)); /* none: eom sends or drops its own */
    Context_clear(self);
    entry_put(self->entry);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject Context_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "libmilter_ext._milter.Context",
    .tp_basicsize = sizeof(ContextObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One SMTP connection as libmilter sees it; its methods are the actions.",
    .tp_traverse = (traverseproc)Context_traverse,
    .tp_clear = (inquiry)Context_clear,
    .tp_dealloc = (destructor)Context_dealloc,
    .tp_methods = Context_methods,
    .tp_getset = Context_getset,
};

/* ---- dispatch: libmilter callback -> handler method --------------------- */

/* The exception set now, normalized and with its traceback attached; NULL if none. */
static PyObject *
take_exception(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;

    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        (void)PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Set exc (a reference stolen) as the current exception again. */
static void
restore_exception(PyObject *exc)
{
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyObject *type = (PyObject *)Py_TYPE(exc);

    Py_INCREF(type);
    PyErr_Restore(type, exc, PyException_GetTraceback(exc));
#endif
}

static int
is_verdict(long v)
{
    return v == SMFIS_CONTINUE || v == SMFIS_REJECT || v == SMFIS_DISCARD
           || v == SMFIS_ACCEPT || v == SMFIS_TEMPFAIL;
}

/*
 * Report the exception set now and return the fail-safe verdict to use.  It
 * runs on a libmilter thread, so nothing may escape to PyErr_Print (which
 * would run Py_Exit for a SystemExit there): the error hook reports and picks
 * the verdict; whatever goes wrong with the hook itself goes to
 * PyErr_WriteUnraisable and the answer is TEMPFAIL.  The MTA always gets one.
 */
static int
failsafe(ContextObject *c, int stage)
{
    PyObject *handler = c != NULL && c->handler != NULL ? c->handler : Py_None;
    PyObject *exc = take_exception(), *res;
    long v;

    if (exc == NULL)
        exc = PyObject_CallFunction(PyExc_SystemError, "s", "callback failed without an exception");
    if (exc == NULL || S.error_hook == NULL) {
        if (exc != NULL)
            restore_exception(exc);
        PyErr_WriteUnraisable(handler);
        return SMFIS_TEMPFAIL;
    }
    res = PyObject_CallFunction(S.error_hook, "OsO", handler, stage_names[stage], exc);
    Py_DECREF(exc);
    if (res == NULL) {
        PyErr_WriteUnraisable(S.error_hook);
        return SMFIS_TEMPFAIL;
    }
    v = PyLong_Check(res) ? PyLong_AsLong(res) : -1;
    if (PyErr_Occurred() || !is_verdict(v)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "error hook returned %R for %s, not a verdict: "
                     "answering tempfail", res, stage_names[stage]);
        PyErr_WriteUnraisable(S.error_hook);
        v = SMFIS_TEMPFAIL;
    }
    Py_DECREF(res);
    return (int)v;
}

/* A fresh context, not bound to a connection yet. */
static ContextObject *
alloc_context(void)
{
    ContextObject *c = PyObject_GC_New(ContextObject, &Context_Type);

    if (c == NULL)
        return NULL;
    c->ctx = NULL;
    c->handler = NULL;
    c->actions = 0;
    c->protocol = 0;
    c->stage = ST_IDLE;
    c->conn_verdict = NO_VERDICT;
    c->msg_verdict = NO_VERDICT;
    c->neg_verdict = NO_VERDICT;
    c->header_filter = NULL;
    c->filter = NULL;
    c->entry = NULL;
    c->lazy = 0;
    c->deferred = 0;
    c->pending = NULL;
    c->pending_end = &c->pending;
    c->npending = 0;
    c->pending_text = 0;
    c->close_deferred = 0;
    c->closed_ctx = NULL;
    c->release_next = NULL;
    c->changes = NULL;
    c->changes_end = &c->changes;
    PyObject_GC_Track(c);
    return c;
}

/* Top the pool up; GIL held. */
static void
pool_fill(void)
{
    ContextObject *c;
    int full = 0;

    while (!full && (c = alloc_context()) != NULL) {
        pthread_mutex_lock(&pool_lock);
        if (atomic_load(&pool_n) < POOL_SIZE) {
            pool[atomic_load(&pool_n)] = c;
            atomic_fetch_add(&pool_n, 1);
            c = NULL;
        }
        full = atomic_load(&pool_n) >= POOL_SIZE;
        pthread_mutex_unlock(&pool_lock);
        Py_XDECREF(c);
    }
    PyErr_Clear(); /* no memory: negotiations take the GIL and try again */
}

/* A context from the pool (the pool's reference handed over), or NULL.  No GIL. */
static ContextObject *
pool_pop(void)
{
    ContextObject *c = NULL;

    pthread_mutex_lock(&pool_lock);
    if (atomic_load(&pool_n) > 0)
        c = pool[atomic_fetch_sub(&pool_n, 1) - 1];
    pthread_mutex_unlock(&pool_lock);
    return c;
}

/* Make c libmilter's private data of ctx (libmilter owns the reference). */
static int
bind_context(SMFICTX *ctx, ContextObject *c)
{
    c->ctx = ctx;
    return smfi_setpriv(ctx, c) == MI_SUCCESS ? 0 : -1;
}

static ContextObject *
new_context(SMFICTX *ctx)
{
    ContextObject *c = alloc_context();

    if (c == NULL)
        return NULL;
    if (bind_context(ctx, c) < 0) {
        Py_DECREF(c);
        PyErr_SetString(S.error, "smfi_setpriv failed");
        return NULL;
    }
    return c;
}

/*
 * The connection's handler, made by the factory entry it negotiated with; a
 * handler of another class than the one negotiated for is refused.  If none
 * comes, the fail-safe verdict answers the rest of the session.  GIL held.
 */
static void
make_handler(ContextObject *c, int stage)
{
    struct entry *e = c->entry;
    PyObject *h = e != NULL ? PyObject_CallOneArg(e->make, (PyObject *)c) : NULL;

    c->lazy = 0;
    if (h != NULL && e->cls != NULL && (PyObject *)Py_TYPE(h) != e->cls) {
        PyErr_Format(PyExc_TypeError, "the milter factory made a %.100s for a connection "
                     "negotiated for %R", Py_TYPE(h)->tp_name, e->cls);
        Py_CLEAR(h);
    }
    if (h == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(S.error, "no milter factory registered");
        if (c->conn_verdict == NO_VERDICT)
            c->conn_verdict = failsafe(c, stage);
        else
            PyErr_WriteUnraisable(NULL);
    }
    c->handler = h;
}

/*
 * SMFIC_QUIT_NC ends the SMTP session (libmilter calls close) but keeps the
 * milter connection for the next one, which starts at CONNECT without a new
 * negotiation.  close cannot tell QUIT from QUIT_NC, so it parks the closed
 * context under its SMFICTX address; the next session on that SMFICTX takes
 * the negotiated state (actions, protocol, header filter) from it.  A new
 * milter connection always negotiates first and drops whatever a freed SMFICTX
 * at the same address left behind.  Addresses are not always reused, so the
 * table also forgets its oldest entry beyond park_limit (seen: ~2 stale
 * entries per 100 connections); a session whose entry was forgotten is
 * answered with the fail-safe verdict.
 */
static Py_ssize_t park_limit = 4096;

/*
 * A parked context keeps its factory entry for the next session, but most are
 * never resumed (their SMFICTX was freed): so that they do not keep a replaced
 * factory (and what it holds: a reloaded config's caches) alive, one whose
 * entry makes the same class as the current entry takes the current one.  One
 * of another class keeps its own: its sessions must be served by that class.
 * GIL held.
 */
static void
refresh_entry(ContextObject *c)
{
    struct entry *e = c->entry, *now;

    if (e == NULL || e->cls == NULL)
        return;
    if ((now = entry_get()) != NULL && now != e && now->cls == e->cls) {
        c->entry = now;
        entry_put(e);
    } else
        entry_put(now);
}

static int
park_context(SMFICTX *ctx, ContextObject *c)
{
    PyObject *key = PyLong_FromVoidPtr(ctx), *oldest, *value;
    Py_ssize_t pos = 0;
    int rc;

    refresh_entry(c);
    rc = key != NULL ? PyDict_SetItem(S.parked, key, (PyObject *)c) : -1;

    Py_XDECREF(key);
    while (rc == 0 && PyDict_GET_SIZE(S.parked) > park_limit
           && PyDict_Next(S.parked, &pos, &oldest, &value)) {
        Py_INCREF(oldest);
        rc = PyDict_DelItem(S.parked, oldest);
        Py_DECREF(oldest);
        pos = 0;
    }
    return rc;
}

/* The parked context of this SMFICTX (a new reference, removed), or NULL. */
static ContextObject *
unpark_context(SMFICTX *ctx)
{
    PyObject *key = PyLong_FromVoidPtr(ctx), *old = NULL;

    if (key == NULL)
        return NULL;
    old = PyDict_GetItemWithError(S.parked, key);
    if (old != NULL) {
        Py_INCREF(old);
        if (PyDict_DelItem(S.parked, key) < 0)
            Py_CLEAR(old);
    }
    Py_DECREF(key);
    return (ContextObject *)old;
}

/* The context of this connection, made (with its handler) on first use.  A
 * borrowed reference: libmilter's private pointer owns it until close. */
static ContextObject *
get_context(SMFICTX *ctx, int stage)
{
    ContextObject *c = (ContextObject *)smfi_getpriv(ctx), *old;

    if (c != NULL)
        return c;
    old = unpark_context(ctx);
    if (old == NULL && PyErr_Occurred()) {
        PyErr_WriteUnraisable(NULL);
        return NULL;
    }
    if ((c = new_context(ctx)) == NULL) {
        PyErr_WriteUnraisable(NULL);
        Py_XDECREF(old);
        return NULL;
    }
    if (old != NULL && stage != ST_NEGOTIATE) {
        /* a new SMTP session on a kept milter connection: the class and state
         * it negotiated */
        c->actions = old->actions;
        c->protocol = old->protocol;
        c->neg_verdict = c->conn_verdict = old->neg_verdict;
        Py_XINCREF(old->header_filter);
        c->header_filter = old->header_filter;
        c->filter = old->filter; /* in header_filter or in entry's template */
        c->deferred = old->deferred;
        c->close_deferred = old->close_deferred;
        if ((c->entry = old->entry) != NULL)
            atomic_fetch_add(&c->entry->refs, 1);
    } else if (stage != ST_NEGOTIATE)
        c->entry = entry_get();
    if (stage != ST_NEGOTIATE) {
        make_handler(c, stage);
        if (c->handler != NULL && old == NULL) {
            PyErr_Format(S.error, "%s: an SMTP session on a milter connection whose "
                         "negotiation is not known (forgotten after SMFIC_QUIT_NC)",
                         stage_names[stage]);
            c->conn_verdict = failsafe(c, stage);
        }
    }
    Py_XDECREF(old);
    return c;
}

/* Does this stage answer the MTA (it was not negotiated as no-reply)? */
static int
replies(ContextObject *c, int stage)
{
    return (c->protocol & stage_nr_bit[stage]) == 0;
}

/* The verdict carried to this stage, or NO_VERDICT. */
static int
carried(ContextObject *c)
{
    return c->conn_verdict != NO_VERDICT ? c->conn_verdict : c->msg_verdict;
}

/* Map a Python result to a verdict: None or an int; SKIP only from a body()
 * that replies, with SMFIP_SKIP negotiated. */
static int
as_verdict(ContextObject *c, int stage, PyObject *res)
{
    long v;

    if (res == NULL)
        return failsafe(c, stage);
    if (res == Py_None) {
        Py_DECREF(res);
        return SMFIS_CONTINUE;
    }
    v = PyLong_Check(res) ? PyLong_AsLong(res) : -1;
    if (v < 0 || (v > SMFIS_TEMPFAIL && v != SMFIS_NOREPLY && v != SMFIS_SKIP)) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "%s() returned %R, not a verdict",
                         stage_names[stage], res);
        Py_DECREF(res);
        return failsafe(c, stage);
    }
    Py_DECREF(res);
    if (v == SMFIS_SKIP && (stage != ST_BODY || !replies(c, stage)
                            || (c->protocol & SMFIP_SKIP) == 0)) {
        PyErr_Format(S.stage_error, "%s() returned SKIP: %s", stage_names[stage],
                     stage != ST_BODY ? "only body() may"
                     : !replies(c, stage) ? "a no-reply body() cannot skip"
                                          : "the MTA did not offer SMFIP_SKIP");
        return failsafe(c, stage);
    }
    return (int)v;
}

/* Keep a real verdict of a stage that did not answer it for the stages after
 * it, within the scope of the stage. */
static void
carry(ContextObject *c, int stage, int verdict)
{
    if (verdict == SMFIS_CONTINUE || verdict == SMFIS_NOREPLY)
        return;
    if (stage == ST_CONNECT || stage == ST_HELO || stage == ST_UNKNOWN)
        c->conn_verdict = verdict;
    else
        c->msg_verdict = verdict;
}

/* Apply the no-reply rules: a no-reply stage answers SMFIS_NOREPLY and carries
 * a real verdict. */
static sfsistat
finish(ContextObject *c, int stage, int verdict)
{
    c->stage = ST_IDLE;
    if (!replies(c, stage)) {
        carry(c, stage, verdict);
        return SMFIS_NOREPLY;
    }
    if (verdict == SMFIS_NOREPLY)
        verdict = SMFIS_CONTINUE;
    return verdict;
}

static void run_pending(ContextObject *c);

/* Begin a callback: run the deferred calls waiting, then return the context,
 * or NULL with *early set when the callback must answer without running Python. */
static ContextObject *
begin(SMFICTX *ctx, int stage, sfsistat *early)
{
    ContextObject *c = get_context(ctx, stage);
    int v;

    if (c == NULL) {
        *early = SMFIS_TEMPFAIL;
        return NULL;
    }
    if (c->lazy)
        make_handler(c, stage);
    if (stage == ST_ENVFROM)
        c->msg_verdict = NO_VERDICT; /* a new transaction */
    if (c->pending != NULL)
        run_pending(c);
    if ((v = carried(c)) != NO_VERDICT) {
        if (stage == ST_EOM)
            c->msg_verdict = NO_VERDICT; /* the transaction ends with this answer */
        *early = replies(c, stage) ? v : SMFIS_NOREPLY;
        return NULL;
    }
    if (c->handler == NULL) {
        *early = replies(c, stage) ? SMFIS_TEMPFAIL : SMFIS_NOREPLY;
        return NULL;
    }
    c->stage = stage;
    return c;
}

/* handler.<stage>(*args) for a few arguments; the arguments stay borrowed. */
static PyObject *
call_method(ContextObject *c, int stage, size_t nargs, PyObject *a0, PyObject *a1,
            PyObject *a2)
{
    PyObject *stack[4] = {c->handler, a0, a1, a2};

    return PyObject_VectorcallMethod(S.method_names[stage], stack, nargs + 1, NULL);
}

/*
 * One stage callback: the GIL, the carried verdict, the handler method (made
 * by call from the libmilter arguments in args), the verdict and the no-reply
 * rules.  Every stage that calls Python goes through here.
 */
typedef PyObject *(*stage_call)(ContextObject *c, int stage, const void *args);

static int defer(ContextObject *c, int stage, const void *args);

static int
is_deferred(ContextObject *c, int stage)
{
    return (c->deferred & stage_nr_bit[stage]) != 0;
}

/* A deferred stage answered without the GIL, as begin() would have it; 0 if
 * it has to take the GIL (shutting down, no context yet, queue full).  The
 * context is only touched by this connection's callbacks, which libmilter
 * never runs at the same time. */
static int
answer_deferred(ContextObject *c, int stage, const void *args, sfsistat *r)
{
    int v = carried(c);

    if (atomic_load(&closing))
        return 0;
    if (v != NO_VERDICT)
        *r = replies(c, stage) ? v : SMFIS_NOREPLY;
    else if (c->handler == NULL && !c->lazy)
        *r = replies(c, stage) ? SMFIS_TEMPFAIL : SMFIS_NOREPLY;
    else if (defer(c, stage, args))
        *r = replies(c, stage) ? SMFIS_CONTINUE : SMFIS_NOREPLY;
    else
        return 0;
    return 1;
}

/*
 * The header changes eom queued, sent once its method (and the error path, if
 * it raised) has returned and the GIL is given back, before libmilter sends
 * the verdict r.  A failure cannot be raised any more (the MTA connection is
 * broken: libmilter's reply fails too): it is counted (_eom_write_failures)
 * and, with the GIL taken again, reported through the stage's error path (the
 * error hook: on_exception), whose fail-safe verdict replaces r.  What that
 * path queues itself is dropped.
 */
static sfsistat
write_at_eom(SMFICTX *ctx, ContextObject *c, struct change *q, sfsistat r)
{
    const struct write *failed = write_all(ctx, q, NULL);
    PyGILState_STATE gs;

    if (failed == NULL) {
        free_changes(q);
        return r;
    }
    atomic_fetch_add(&eom_write_failures, 1);
    if (!gil_enter(&gs)) {
        free_changes(q);
        return SMFIS_TEMPFAIL;
    }
    queued_failed(failed, "when eom returned", "");
    free_changes(q);
    c->stage = ST_EOM;
    r = failsafe(c, ST_EOM);
    c->stage = ST_IDLE;
    free_changes(take_changes(c));
    gil_leave(gs);
    return r;
}

static sfsistat
dispatch(SMFICTX *ctx, int stage, stage_call call, const void *args)
{
    PyGILState_STATE gs;
    ContextObject *c = (ContextObject *)smfi_getpriv(ctx);
    struct change *q = NULL;
    sfsistat r;

    if (c != NULL && is_deferred(c, stage) && answer_deferred(c, stage, args, &r))
        return r;
    if (!gil_enter(&gs))
        return SMFIS_TEMPFAIL;
    if ((c = begin(ctx, stage, &r)) != NULL) {
        /* a deferred stage here: the first of a session after SMFIC_QUIT_NC,
         * or the queue was full (begin ran it) */
        if (is_deferred(c, stage) && defer(c, stage, args))
            r = finish(c, stage, SMFIS_CONTINUE);
        else
            r = finish(c, stage, as_verdict(c, stage, call(c, stage, args)));
        q = take_changes(c); /* only eom queues */
    }
    gil_leave(gs);
    return q != NULL ? write_at_eom(ctx, c, q, r) : r;
}

static PyObject *
hostaddr_tuple(_SOCK_ADDR *sa, int *family)
{
    char ip[INET6_ADDRSTRLEN];

    if (sa == NULL) {
        *family = AF_UNSPEC;
        Py_RETURN_NONE;
    }
    *family = sa->sa_family;
    switch (sa->sa_family) {
    case AF_INET: {
        struct sockaddr_in *s = (struct sockaddr_in *)sa;
        if (inet_ntop(AF_INET, &s->sin_addr, ip, sizeof ip) == NULL)
            break;
        return Py_BuildValue("(si)", ip, ntohs(s->sin_port));
    }
    case AF_INET6: {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)sa;
        if (inet_ntop(AF_INET6, &s->sin6_addr, ip, sizeof ip) == NULL)
            break;
        return Py_BuildValue("(siII)", ip, ntohs(s->sin6_port),
                             (unsigned int)ntohl(s->sin6_flowinfo),
                             (unsigned int)s->sin6_scope_id);
    }
    case AF_UNIX: {
        struct sockaddr_un *s = (struct sockaddr_un *)sa;
        return decode(s->sun_path, (Py_ssize_t)strnlen(s->sun_path, sizeof s->sun_path));
    }
    default:
        break;
    }
    Py_RETURN_NONE;
}

struct connect_args {
    const char *hostname;
    _SOCK_ADDR *hostaddr;
};

/* connect(hostname, family, hostaddr) */
static PyObject *
call_connect(ContextObject *c, int stage, const void *args)
{
    const struct connect_args *a = args;
    int family;
    PyObject *addr = hostaddr_tuple(a->hostaddr, &family);
    PyObject *host = decode(a->hostname, -1);
    PyObject *fam = PyLong_FromLong(family);
    PyObject *res = addr && host && fam ? call_method(c, stage, 3, host, fam, addr) : NULL;

    Py_XDECREF(addr);
    Py_XDECREF(host);
    Py_XDECREF(fam);
    return res;
}

/* helo(name), unknown(command): one string */
static PyObject *
call_string(ContextObject *c, int stage, const void *args)
{
    PyObject *arg = decode(args, -1), *res;

    if (arg == NULL)
        return NULL;
    res = call_method(c, stage, 1, arg, NULL, NULL);
    Py_DECREF(arg);
    return res;
}

/* envfrom(address, *esmtp_args), envrcpt(...): a NULL-terminated argv */
static PyObject *
call_argv(ContextObject *c, int stage, const void *args)
{
    char *const *argv = args;
    Py_ssize_t n = 0, i;
    PyObject *t, *meth, *res;

    while (argv != NULL && argv[n] != NULL)
        n++;
    if ((t = PyTuple_New(n)) == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *s = decode(argv[i], -1);
        if (s == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    if ((meth = PyObject_GetAttr(c->handler, S.method_names[stage])) == NULL) {
        Py_DECREF(t);
        return NULL;
    }
    res = PyObject_Call(meth, t, NULL);
    Py_DECREF(meth);
    Py_DECREF(t);
    return res;
}

struct header_args {
    const char *name, *value;
};

/* header(name, value) */
static PyObject *
call_header(ContextObject *c, int stage, const void *args)
{
    const struct header_args *a = args;
    PyObject *n = decode(a->name, -1), *v = decode(a->value, -1);
    PyObject *res = n && v ? call_method(c, stage, 2, n, v, NULL) : NULL;

    Py_XDECREF(n);
    Py_XDECREF(v);
    return res;
}

struct body_args {
    const unsigned char *chunk;
    size_t len;
};

/* body(chunk) */
static PyObject *
call_body(ContextObject *c, int stage, const void *args)
{
    const struct body_args *a = args;
    PyObject *b = PyBytes_FromStringAndSize((const char *)a->chunk, (Py_ssize_t)a->len);
    PyObject *res = b ? call_method(c, stage, 1, b, NULL, NULL) : NULL;

    Py_XDECREF(b);
    return res;
}

/* data(), eoh(), eom() */
static PyObject *
call_noargs(ContextObject *c, int stage, const void *Py_UNUSED(args))
{
    return call_method(c, stage, 0, NULL, NULL, NULL);
}

/* ---- deferred stages ------------------------------------------------------ */

/* Queue a deferred call of stage with its arguments (as dispatch gets them)
 * copied; 0 if it cannot wait (queue full, no memory).  No GIL needed. */
static int
defer(ContextObject *c, int stage, const void *args)
{
    const char *text = NULL, *value = NULL;
    const _SOCK_ADDR *addr = NULL;
    size_t len, vlen = 0, alen = 0;
    struct pending *p;

    if (stage == ST_CONNECT) {
        const struct connect_args *a = args;

        text = a->hostname;
        addr = a->hostaddr;
    } else if (stage == ST_HELO || stage == ST_UNKNOWN)
        text = args;
    else if (stage == ST_HEADER) {
        const struct header_args *a = args;

        if (a->name == NULL || a->value == NULL)
            return 0;
        text = a->name;
        value = a->value;
        vlen = strlen(value) + 1;
    }
    len = text != NULL ? strlen(text) + 1 : 1;
    if (c->npending >= MAX_PENDING || len + vlen > MAX_PENDING_TEXT - c->pending_text
        || (p = PyMem_RawMalloc(sizeof *p + len + vlen)) == NULL)
        return 0;
    p->next = NULL;
    p->stage = stage;
    p->has_text = text != NULL;
    memcpy(p->text, text != NULL ? text : "", len);
    p->value_at = value != NULL ? len : 0;
    if (value != NULL)
        memcpy(p->text + len, value, vlen);
    p->has_addr = addr != NULL;
    memset(&p->addr, 0, sizeof p->addr);
    if (addr != NULL) {
        const struct sockaddr *sa = (const struct sockaddr *)addr;

        alen = sa->sa_family == AF_INET    ? sizeof(struct sockaddr_in)
               : sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
               : sa->sa_family == AF_UNIX  ? sizeof(struct sockaddr_un)
                                           : sizeof(struct sockaddr);
        memcpy(&p->addr, addr, alen);
    }
    *c->pending_end = p;
    c->pending_end = &p->next;
    c->npending++;
    c->pending_text += len + vlen;
    return 1;
}

static PyObject *
call_pending(ContextObject *c, const struct pending *p)
{
    const char *text = p->has_text ? p->text : NULL;

    if (p->stage == ST_CONNECT) {
        struct connect_args a = {text, p->has_addr ? (_SOCK_ADDR *)&p->addr : NULL};

        return call_connect(c, ST_CONNECT, &a);
    }
    if (p->stage == ST_HELO || p->stage == ST_UNKNOWN)
        return call_string(c, p->stage, text);
    if (p->stage == ST_HEADER) {
        struct header_args a = {p->text, p->text + p->value_at};

        return call_header(c, ST_HEADER, &a);
    }
    return call_noargs(c, p->stage, NULL);
}

/*
 * Run the deferred calls, oldest first, as their stages would have run had
 * they been no-reply: a real verdict (or the fail-safe of an exception) is
 * carried to the stage running them, which answers it; once a verdict is
 * carried, the calls after it are dropped, as their stages would not have
 * reached Python.  GIL held.
 */
static void
run_pending(ContextObject *c)
{
    struct pending *p;
    int saved = c->stage;

    while ((p = c->pending) != NULL) {
        if ((c->pending = p->next) == NULL) {
            c->pending_end = &c->pending;
            c->pending_text = 0;
        }
        c->npending--;
        if (carried(c) == NO_VERDICT && c->handler != NULL) {
            c->stage = p->stage;
            carry(c, p->stage, as_verdict(c, p->stage, call_pending(c, p)));
        }
        PyMem_RawFree(p);
    }
    c->stage = saved;
}

static sfsistat
cb_connect(SMFICTX *ctx, char *hostname, _SOCK_ADDR *hostaddr)
{
    struct connect_args a = {hostname, hostaddr};

    return dispatch(ctx, ST_CONNECT, call_connect, &a);
}

static sfsistat
cb_helo(SMFICTX *ctx, char *helohost)
{
    return dispatch(ctx, ST_HELO, call_string, helohost);
}

static sfsistat
cb_envfrom(SMFICTX *ctx, char **argv)
{
    return dispatch(ctx, ST_ENVFROM, call_argv, argv);
}

static sfsistat
cb_envrcpt(SMFICTX *ctx, char **argv)
{
    return dispatch(ctx, ST_ENVRCPT, call_argv, argv);
}

static sfsistat
cb_data(SMFICTX *ctx)
{
    return dispatch(ctx, ST_DATA, call_noargs, NULL);
}

static sfsistat
cb_unknown(SMFICTX *ctx, const char *cmd)
{
    return dispatch(ctx, ST_UNKNOWN, call_string, cmd);
}

/* Is name (any case) in the filter list "a\0b\0\0"? */
static int
header_wanted(const char *list, const char *name)
{
    for (; *list != '\0'; list += strlen(list) + 1)
        if (strcasecmp(list, name) == 0)
            return 1;
    return 0;
}

static sfsistat
cb_header(SMFICTX *ctx, char *name, char *value)
{
    /* The filter runs without the GIL: the context is only touched by this
     * connection's callbacks, which libmilter never runs at the same time. */
    ContextObject *c = (ContextObject *)smfi_getpriv(ctx);
    struct header_args a = {name, value};

    if (c != NULL && c->filter != NULL && name != NULL) {
        int v = carried(c);

        if (v != NO_VERDICT)
            return replies(c, ST_HEADER) ? v : SMFIS_NOREPLY;
        if (!header_wanted(c->filter, name))
            return replies(c, ST_HEADER) ? SMFIS_CONTINUE : SMFIS_NOREPLY;
    }
    return dispatch(ctx, ST_HEADER, call_header, &a);
}

static sfsistat
cb_eoh(SMFICTX *ctx)
{
    return dispatch(ctx, ST_EOH, call_noargs, NULL);
}

static sfsistat
cb_body(SMFICTX *ctx, unsigned char *chunk, size_t len)
{
    struct body_args a = {chunk, len};

    return dispatch(ctx, ST_BODY, call_body, &a);
}

static sfsistat
cb_eom(SMFICTX *ctx)
{
    return dispatch(ctx, ST_EOM, call_noargs, NULL);
}

/* abort() and close() answer nothing: an exception is only reported. */
static void
call_quietly(ContextObject *c, int stage)
{
    PyObject *res;

    if (c->handler == NULL)
        return;
    c->stage = stage;
    if ((res = call_method(c, stage, 0, NULL, NULL, NULL)) == NULL)
        (void)failsafe(c, stage);
    Py_XDECREF(res);
    c->stage = ST_IDLE;
}

static sfsistat
cb_abort(SMFICTX *ctx)
{
    PyGILState_STATE gs;
    ContextObject *c;

    if (!gil_enter(&gs))
        return SMFIS_CONTINUE;
    if ((c = (ContextObject *)smfi_getpriv(ctx)) != NULL) {
        if (c->lazy)
            make_handler(c, ST_ABORT);
        run_pending(c);
        c->msg_verdict = NO_VERDICT; /* the transaction is over */
        call_quietly(c, ST_ABORT);
    }
    gil_leave(gs);
    return SMFIS_CONTINUE;
}

/*
 * The closed contexts queued by cb_close, oldest first: each is parked first
 * (so that the next session after SMFIC_QUIT_NC finds it even while a close()
 * below lets go of the GIL), then its close() runs and its references go.
 * GIL held.
 */
static void
release_closed(void)
{
    ContextObject *c = atomic_exchange(&release_head, NULL), *oldest = NULL, *next;

    for (; c != NULL; c = next) {
        next = c->release_next;
        c->release_next = oldest;
        oldest = c;
    }
    for (c = oldest; c != NULL; c = c->release_next)
        if (park_context(c->closed_ctx, c) < 0)
            PyErr_WriteUnraisable(NULL);
    for (c = oldest; c != NULL; c = next) {
        next = c->release_next;
        c->release_next = NULL;
        c->closed_ctx = NULL;
        call_quietly(c, ST_CLOSE);
        Py_CLEAR(c->handler); /* breaks the handler <-> context cycle */
        Py_DECREF(c);
    }
}

static sfsistat
cb_close(SMFICTX *ctx)
{
    PyGILState_STATE gs;
    ContextObject *c = (ContextObject *)smfi_getpriv(ctx);
    void *head;

    if (c == NULL)
        return SMFIS_CONTINUE;
    if (c->pending == NULL && (c->close_deferred || c->lazy)) {
        /* Nothing to run now (or no handler was ever made: nothing to close):
         * queue the context (and libmilter's reference to it) for the next GIL
         * hold, and answer without the GIL. */
        c->lazy = 0;
        c->ctx = NULL;
        c->closed_ctx = ctx;
        (void)smfi_setpriv(ctx, NULL);
        head = atomic_load(&release_head);
        do
            c->release_next = head;
        while (!atomic_compare_exchange_weak(&release_head, &head, c));
        return SMFIS_CONTINUE;
    }
    if (!gil_enter(&gs))
        return SMFIS_CONTINUE;
    if (c->lazy)
        make_handler(c, ST_CLOSE);
    run_pending(c);
    call_quietly(c, ST_CLOSE);
    c->ctx = NULL;
    (void)smfi_setpriv(ctx, NULL);
    Py_CLEAR(c->handler); /* breaks the handler <-> context cycle */
    if (park_context(ctx, c) < 0)
        PyErr_WriteUnraisable(NULL);
    Py_DECREF(c);
    gil_leave(gs);
    return SMFIS_CONTINUE;
}

/* _negotiate()'s answer: any sequence of two ints (actions, protocol). */
static int
two_flags(PyObject *res, unsigned long *actions, unsigned long *protocol)
{
    if (PySequence_Check(res) && !PyUnicode_Check(res) && !PyBytes_Check(res)
        && PySequence_Size(res) == 2) {
        PyObject *a = PySequence_GetItem(res, 0), *p = a ? PySequence_GetItem(res, 1) : NULL;
        int ok = p != NULL && PyLong_Check(a) && PyLong_Check(p);

        if (ok) {
            *actions = PyLong_AsUnsignedLong(a);
            *protocol = PyLong_AsUnsignedLong(p);
            ok = !PyErr_Occurred();
        }
        Py_XDECREF(a);
        Py_XDECREF(p);
        if (ok)
            return 0;
    }
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError,
                 "_negotiate() must return two unsigned ints (actions, protocol), not %R", res);
    return -1;
}

/* A malloc'd copy of a bytes object's contents (with its NUL), or NULL. */
static char *
raw_copy(PyObject *b)
{
    char *copy = PyMem_RawMalloc((size_t)PyBytes_GET_SIZE(b) + 1);

    if (copy == NULL)
        PyErr_NoMemory();
    else
        memcpy(copy, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b) + 1);
    return copy;
}

/*
 * The template for this offer from cls._negotiation_template(actions,
 * protocol): (actions, protocol, ((SMFIM_*, b"macros"), ...), header filter
 * bytes or None, deferred SMFIP_NR_* bits, close deferred).  It returns None
 * when it cannot be cached (the class negotiates per instance): then NULL, no
 * exception.  Kept on the entry for the next connections.  GIL held.
 */
static const struct template *
make_template(struct entry *e, unsigned long f0, unsigned long f1)
{
    PyObject *res, *syms, *filter = NULL;
    struct template *t;
    Py_ssize_t i;
    int close_deferred;

    res = PyObject_CallMethod(e->cls, "_negotiation_template", "kk", f0, f1);
    if (res == NULL || res == Py_None) {
        Py_XDECREF(res);
        return NULL;
    }
    if ((t = PyMem_RawCalloc(1, sizeof *t)) == NULL) {
        Py_DECREF(res);
        PyErr_NoMemory();
        return NULL;
    }
    t->offer_actions = f0;
    t->offer_protocol = f1;
    if (!PyArg_ParseTuple(res, "kkO!Okp;_negotiation_template() must return (actions, "
                          "protocol, symlists, header filter, deferred, close deferred)",
                          &t->actions, &t->protocol, &PyTuple_Type, &syms, &filter,
                          &t->deferred, &close_deferred))
        goto fail;
    t->close_deferred = close_deferred;
    if (PyTuple_GET_SIZE(syms) > MAX_SYMLISTS) {
        PyErr_SetString(PyExc_ValueError, "_negotiation_template: too many symlists");
        goto fail;
    }
    for (i = 0; i < PyTuple_GET_SIZE(syms); i++) {
        PyObject *names;

        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(syms, i), "iS;symlist: (SMFIM_*, bytes)",
                              &t->syms[i].where, &names))
            goto fail;
        if ((t->syms[i].names = raw_copy(names)) == NULL)
            goto fail;
        t->nsyms = (int)i + 1;
    }
    if (filter != Py_None) {
        ContextObject probe = {.header_filter = NULL};
        PyObject *ok = Context_set_header_filter(&probe, filter); /* validates */

        Py_XDECREF(probe.header_filter);
        if (ok == NULL)
            goto fail;
        Py_DECREF(ok);
        if ((t->filter = raw_copy(filter)) == NULL)
            goto fail;
    }
    Py_DECREF(res);
    t->next = atomic_load(&e->templates);
    atomic_store(&e->templates, t); /* only written with the GIL held */
    return t;

fail:
    Py_DECREF(res);
    for (i = 0; i < t->nsyms; i++)
        PyMem_RawFree(t->syms[i].names);
    PyMem_RawFree(t->filter);
    PyMem_RawFree(t);
    return NULL;
}

/* Negotiate c as t says: libmilter's macro lists, the context's state, the
 * answer.  -1 if libmilter refused a macro list.  No GIL needed. */
static int
apply_template(SMFICTX *ctx, ContextObject *c, const struct template *t,
               unsigned long *pf0, unsigned long *pf1, unsigned long *pf2,
               unsigned long *pf3)
{
    int i;

    c->actions = t->actions;
    c->protocol = t->protocol;
    c->filter = t->filter;
    c->deferred = t->deferred;
    c->close_deferred = t->close_deferred;
    c->lazy = 1;
    for (i = 0; i < t->nsyms; i++)
        if (smfi_setsymlist(ctx, t->syms[i].where, t->syms[i].names) != MI_SUCCESS)
            return -1;
    *pf0 = t->actions;
    *pf1 = t->protocol;
    *pf2 = *pf3 = 0;
    return 0;
}

/*
 * Negotiation.  With the template of the entry's class for this offer, in C
 * without the GIL, the handler made later (lazy).  Else with the GIL: the
 * template made now if the class gives one, or (no class, or it negotiates per
 * instance) the handler made now and handler._negotiate(offered_actions,
 * offered_protocol) -> (actions, protocol) asked.  If that fails, the
 * fail-safe verdict answers every stage of every session on this milter
 * connection and libmilter negotiates its defaults.
 */
static sfsistat
cb_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2,
             unsigned long f3, unsigned long *pf0, unsigned long *pf1, unsigned long *pf2,
             unsigned long *pf3)
{
    PyGILState_STATE gs;
    struct entry *e = atomic_load(&closing) ? NULL : entry_get();
    const struct template *t = e != NULL ? find_template(e, f0, f1) : NULL;
    ContextObject *c = t != NULL && smfi_getpriv(ctx) == NULL ? pool_pop() : NULL;
    PyObject *res = NULL, *meth;
    sfsistat r = SMFIS_ALL_OPTS;

    if (c != NULL) {
        c->entry = e;
        if (bind_context(ctx, c) == 0 && apply_template(ctx, c, t, pf0, pf1, pf2, pf3) == 0)
            return SMFIS_CONTINUE;
        if (smfi_getpriv(ctx) != c) {  /* not bound: the GIL path starts over */
            c->entry = NULL;
            c->lazy = 0;
            c->ctx = NULL;
            if (!gil_enter(&gs))
                return SMFIS_TEMPFAIL;
            Py_DECREF(c);
            c = NULL;
            gil_leave(gs);
        }
    }
    if (!gil_enter(&gs))
        return SMFIS_TEMPFAIL; /* shutting down: libmilter drops the connection */
    if (c != NULL) { /* bound, but a macro list refused */
        c->lazy = 0;
        PyErr_SetString(S.error, "smfi_setsymlist failed");
        c->neg_verdict = c->conn_verdict = failsafe(c, ST_NEGOTIATE);
        gil_leave(gs);
        return SMFIS_ALL_OPTS;
    }
    c = get_context(ctx, ST_NEGOTIATE);
    if (c == NULL) {
        entry_put(e);
        gil_leave(gs);
        return SMFIS_ALL_OPTS;
    }
    entry_put(c->entry);
    c->entry = e;
    c->actions = f0;
    c->protocol = 0;
    if (e != NULL && e->cls != NULL && t == NULL) {
        t = make_template(e, f0, f1);
        if (t == NULL && PyErr_Occurred()) {
            c->neg_verdict = c->conn_verdict = failsafe(c, ST_NEGOTIATE);
            gil_leave(gs);
            return SMFIS_ALL_OPTS;
        }
    }
    if (t != NULL) {
        if (apply_template(ctx, c, t, pf0, pf1, pf2, pf3) == 0)
            r = SMFIS_CONTINUE;
        else {
            c->lazy = 0;
            PyErr_SetString(S.error, "smfi_setsymlist failed");
            c->neg_verdict = c->conn_verdict = failsafe(c, ST_NEGOTIATE);
        }
        gil_leave(gs);
        return r;
    }
    make_handler(c, ST_NEGOTIATE);
    if (c->handler == NULL) {
        gil_leave(gs);
        return SMFIS_ALL_OPTS;
    }
    c->stage = ST_NEGOTIATE;
    if ((meth = PyObject_GetAttr(c->handler, S.negotiate_name)) != NULL) {
        res = PyObject_CallFunction(meth, "kk", f0, f1);
        Py_DECREF(meth);
    }
    if (res != NULL && two_flags(res, pf0, pf1) == 0) {
        *pf2 = *pf3 = 0;
        c->actions = *pf0;
        c->protocol = *pf1;
        r = SMFIS_CONTINUE;
    } else
        c->neg_verdict = c->conn_verdict = failsafe(c, ST_NEGOTIATE);
    Py_XDECREF(res);
    c->stage = ST_IDLE;
    gil_leave(gs);
    return r;
}

/* ---- module functions: the daemon side ---------------------------------- */

/* Make (make, cls) the factory of new connections; GIL held. */
static int
install_entry(PyObject *make, PyObject *cls)
{
    struct entry *e, *old;

    if (!PyCallable_Check(make) || (cls != Py_None && !PyType_Check(cls))) {
        PyErr_SetString(PyExc_TypeError, "factory must be callable, cls a class or None");
        return -1;
    }
    if ((e = PyMem_RawCalloc(1, sizeof *e)) == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    atomic_init(&e->refs, 1);
    Py_INCREF(make);
    e->make = make;
    if (cls != Py_None) {
        Py_INCREF(cls);
        e->cls = cls;
    }
    atomic_init(&e->templates, NULL);
    pthread_mutex_lock(&entry_lock);
    old = current_entry;
    current_entry = e;
    pthread_mutex_unlock(&entry_lock);
    entry_put(old);
    pool_fill();
    return 0;
}

static PyObject *
mod_set_factory(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"factory", "cls", NULL};
    PyObject *factory, *cls = Py_None, *parked;
    Py_ssize_t i;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:set_factory", kwlist, &factory, &cls))
        return NULL;
    if (install_entry(factory, cls) < 0)
        return NULL;
    release_closed(); /* parks what is queued */
    /* a copy: dropping an entry may run Python code, and other threads park */
    if ((parked = PyDict_Values(S.parked)) == NULL)
        return NULL;
    for (i = 0; i < PyList_GET_SIZE(parked); i++)
        refresh_entry((ContextObject *)PyList_GET_ITEM(parked, i));
    Py_DECREF(parked);
    Py_RETURN_NONE;
}

static PyObject *
mod_register(PyObject *Py_UNUSED(m), PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"name", "factory", "error_hook", "flags", "cls", NULL};
    const char *name;
    PyObject *factory, *hook = Py_None, *cls = Py_None;
    unsigned long flags = 0;
    struct smfiDesc desc;
    int rc;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "sO|OkO:register", kwlist, &name, &factory,
                                     &hook, &flags, &cls))
        return NULL;
    if (hook != Py_None && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "factory and error_hook must be callable");
        return NULL;
    }
    if (install_entry(factory, cls) < 0)
        return NULL;
    if (hook == Py_None)
        Py_CLEAR(S.error_hook);
    else {
        Py_INCREF(hook);
        Py_XSETREF(S.error_hook, hook);
    }
    PyMem_RawFree(S.name);
    S.name = PyMem_RawMalloc(strlen(name) + 1);
    if (S.name == NULL)
        return PyErr_NoMemory();
    strcpy(S.name, name);

    memset(&desc, 0, sizeof desc);
    desc.xxfi_name = S.name;
    desc.xxfi_version = SMFI_VERSION;
    desc.xxfi_flags = flags;
    desc.xxfi_connect = cb_connect;
    desc.xxfi_helo = cb_helo;
    desc.xxfi_envfrom = cb_envfrom;
    desc.xxfi_envrcpt = cb_envrcpt;
    desc.xxfi_header = cb_header;
    desc.xxfi_eoh = cb_eoh;
    desc.xxfi_body = cb_body;
    desc.xxfi_eom = cb_eom;
    desc.xxfi_abort = cb_abort;
    desc.xxfi_close = cb_close;
    desc.xxfi_unknown = cb_unknown;
    desc.xxfi_data = cb_data;
    desc.xxfi_negotiate = cb_negotiate;
    rc = smfi_register(desc);
    return check_result(rc, "smfi_register");
}

static PyObject *
mod_setconn(PyObject *Py_UNUSED(m), PyObject *arg)
{
    PyObject *b = encode(arg, "socket spec");
    int rc;

    if (b == NULL)
        return NULL;
    /* libmilter keeps the pointer: hand it a copy that lives for the process. */
    rc = smfi_setconn(strdup(PyBytes_AS_STRING(b)));
    Py_DECREF(b);
    return check_result(rc, "smfi_setconn");
}

static PyObject *
mod_opensocket(PyObject *Py_UNUSED(m), PyObject *arg)
{
    int rm = PyObject_IsTrue(arg), rc;

    if (rm < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = smfi_opensocket(rm ? true : false);
    Py_END_ALLOW_THREADS
    return check_result(rc, "smfi_opensocket");
}

/* A non-negative int argument for the libmilter setter named call. */
static int
int_arg(PyObject *arg, const char *call, int *out)
{
    long v = PyLong_AsLong(arg);

    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: out of range", call);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static PyObject *
mod_settimeout(PyObject *Py_UNUSED(m), PyObject *arg)
{
    int v;

    if (int_arg(arg, "smfi_settimeout", &v) < 0)
        return NULL;
    return check_result(smfi_settimeout(v), "smfi_settimeout");
}

static PyObject *
mod_setbacklog(PyObject *Py_UNUSED(m), PyObject *arg)
{
    int v;

    if (int_arg(arg, "smfi_setbacklog", &v) < 0)
        return NULL;
    return check_result(smfi_setbacklog(v), "smfi_setbacklog");
}

static PyObject *
mod_setdbg(PyObject *Py_UNUSED(m), PyObject *arg)
{
    int v;

    if (int_arg(arg, "smfi_setdbg", &v) < 0)
        return NULL;
    return check_result(smfi_setdbg(v), "smfi_setdbg");
}

static PyObject *
mod_setmaxdatasize(PyObject *Py_UNUSED(m), PyObject *arg)
{
    size_t v = PyLong_AsSize_t(arg);

    if (v == (size_t)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromSize_t(smfi_setmaxdatasize(v));
}

static PyObject *
mod_main(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    int rc;

    atomic_store(&closing, 0);
    Py_BEGIN_ALLOW_THREADS
    rc = smfi_main();
    Py_END_ALLOW_THREADS
    return check_result(rc, "smfi_main");
}

static PyObject *
mod_stop(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    int rc;

    Py_BEGIN_ALLOW_THREADS
    rc = smfi_stop();
    Py_END_ALLOW_THREADS
    return check_result(rc, "smfi_stop");
}

static PyObject *
mod_shutdown(PyObject *Py_UNUSED(m), PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    struct timespec pause = {0, 1000000}; /* 1 ms */
    long waited_ms = 0;
    int left;

    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    atomic_store(&closing, 1);
    Py_BEGIN_ALLOW_THREADS
    while ((left = atomic_load(&inflight)) > 0 && waited_ms < (long)(timeout * 1000)) {
        nanosleep(&pause, NULL);
        waited_ms++;
    }
    Py_END_ALLOW_THREADS
    release_closed();
    delete_dead_states();
    return PyBool_FromLong(left == 0);
}

static PyObject *
mod_park_limit(PyObject *Py_UNUSED(m), PyObject *arg)
{
    Py_ssize_t v = PyLong_AsSsize_t(arg), old = park_limit;

    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (v < 1) {
        PyErr_SetString(PyExc_ValueError, "_park_limit: at least 1");
        return NULL;
    }
    park_limit = v;
    return PyLong_FromSsize_t(old);
}

static PyObject *
mod_gil_entries(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLong(atomic_load(&gil_entries));
}

static PyObject *
mod_gil_releases(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLong(atomic_load(&gil_releases));
}

static PyObject *
mod_eom_write_failures(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromUnsignedLong(atomic_load(&eom_write_failures));
}

static PyObject *
mod_version(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored))
{
    unsigned int major = 0, minor = 0, patch = 0;

    smfi_version(&major, &minor, &patch);
    return Py_BuildValue("(III)", major, minor, patch);
}

/*
 * libmilter's signal thread: smfi_main starts a thread that sigwait()s for
 * SIGHUP, SIGTERM and SIGINT and stops the milter on any of them, SIGHUP
 * included.  libmilter_ext takes those signals in Python's main thread (SIGHUP
 * is a reload), so that thread must never take one -- not even the first
 * instant after it starts, when a signal already pending for the main thread
 * would be handed to it.  The package loads this module with RTLD_DEEPBIND
 * (see __init__.py), which binds libmilter's call to sigwait() to the
 * definition below instead of libc's: the thread blocks every signal and
 * sleeps for good without ever having dequeued one.  libmilter never joins
 * it; process exit ends it.  Nothing else in this module's scope calls
 * sigwait().  signal_threads_parked() tells Python it happened.
 */
static pthread_mutex_t parked_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t parked_cond = PTHREAD_COND_INITIALIZER;
static long signal_threads;  /* how many of libmilter's signal threads sleep here */

int
sigwait(const sigset_t *Py_UNUSED(set), int *Py_UNUSED(sig))
{
    sigset_t all;

    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, NULL);
    pthread_mutex_lock(&parked_lock);
    signal_threads++;
    pthread_cond_broadcast(&parked_cond);
    pthread_mutex_unlock(&parked_lock);
    for (;;)
        pause();
}

static PyObject *
mod_signal_threads_parked(PyObject *Py_UNUSED(m), PyObject *args)
{
    long more_than;
    double timeout;
    long count;
    struct timespec until;

    if (!PyArg_ParseTuple(args, "ld", &more_than, &timeout))
        return NULL;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)timeout;
    until.tv_nsec += (long)((timeout - (double)(time_t)timeout) * 1e9);
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&parked_lock);
    while (signal_threads <= more_than
           && pthread_cond_timedwait(&parked_cond, &parked_lock, &until) == 0)
        ;
    count = signal_threads;
    pthread_mutex_unlock(&parked_lock);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(count);
}

/*
 * Python runs its signal handlers in the main thread only, when it next
 * executes bytecode; a signal the kernel hands to another thread (it does
 * when the main thread has one pending already) only sets a flag, and a main
 * thread blocked in a wait that is not interrupted (thread.join() while main()
 * serves from another thread) never sees it.  forward_signals(signums)
 * wraps Python's C handler of each: in another thread the wrapper sends the
 * signal on to the main thread (pthread_kill, async-signal-safe), in the main
 * thread it calls Python's.  A later signal.signal() replaces the wrapper.
 */
#define FORWARD_MAX 65
static pthread_t forward_to;
static void (*python_handler[FORWARD_MAX])(int);

static void
forward_handler(int sig)
{
    if (!pthread_equal(pthread_self(), forward_to))
        pthread_kill(forward_to, sig);
    else if (python_handler[sig] != NULL)
        python_handler[sig](sig);
}

static PyObject *
mod_forward_signals(PyObject *Py_UNUSED(m), PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "forward_signals() takes a sequence of signals");
    Py_ssize_t i, n;

    if (seq == NULL)
        return NULL;
    forward_to = pthread_self();
    n = PySequence_Fast_GET_SIZE(seq);
    for (i = 0; i < n; i++) {
        long sig = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        struct sigaction act;

        if (sig == -1 && PyErr_Occurred())
            break;
        if (sig <= 0 || sig >= FORWARD_MAX) {
            PyErr_Format(PyExc_ValueError, "signal number out of range: %ld", sig);
            break;
        }
        if (sigaction((int)sig, NULL, &act) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
        if ((act.sa_flags & SA_SIGINFO) || act.sa_handler == SIG_DFL
            || act.sa_handler == SIG_IGN || act.sa_handler == forward_handler)
            continue;  /* not a plain handler (Python's), or wrapped already */
        python_handler[sig] = act.sa_handler;
        act.sa_handler = forward_handler;
        if (sigaction((int)sig, &act, NULL) != 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            break;
        }
    }
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"register", (PyCFunction)(void (*)(void))mod_register, METH_VARARGS | METH_KEYWORDS,
     "register(name, factory, error_hook=None, flags=0, cls=None): smfi_register with every "
     "callback; factory(ctx) makes the handlers, of class cls if given (see set_factory)."},
    {"set_factory", (PyCFunction)(void (*)(void))mod_set_factory, METH_VARARGS | METH_KEYWORDS,
     "set_factory(factory, cls=None): factory(ctx) makes the handlers of new connections, "
     "of class cls: then negotiation answers from cls._negotiation_template without the GIL "
     "and the handler is made lazily.  Connections already negotiated keep theirs."},
    {"setconn", mod_setconn, METH_O, "Socket spec: unix:/path, inet:port@host, inet6:port@host."},
    {"opensocket", mod_opensocket, METH_O, "Open the socket now (argument: remove a stale one)."},
    {"settimeout", mod_settimeout, METH_O, "Seconds to wait for the MTA."},
    {"setbacklog", mod_setbacklog, METH_O, "listen() backlog."},
    {"setdbg", mod_setdbg, METH_O, "libmilter debug level."},
    {"setmaxdatasize", mod_setmaxdatasize, METH_O, "Largest data packet; returns the old one."},
    {"main", mod_main, METH_NOARGS, "Run smfi_main (GIL released) until stopped."},
    {"stop", mod_stop, METH_NOARGS, "Ask smfi_main to return."},
    {"shutdown", mod_shutdown, METH_O,
     "After main(): stop callbacks entering Python; wait up to N s for those inside."},
    {"_park_limit", mod_park_limit, METH_O,
     "For tests: how many closed sessions SMFIC_QUIT_NC may still resume; returns the old."},
    {"version", mod_version, METH_NOARGS, "(major, minor, patch) of the libmilter in use."},
    {"_gil_entries", mod_gil_entries, METH_NOARGS,
     "How many times libmilter callbacks took the GIL so far (for tests and benchmarks)."},
    {"_gil_releases", mod_gil_releases, METH_NOARGS,
     "How many times a Context action let go of the GIL to write to the MTA so far."},
    {"_eom_write_failures", mod_eom_write_failures, METH_NOARGS,
     "How many eoms could not send their queued header changes after returning."},
    {"forward_signals", mod_forward_signals, METH_O,
     "forward_signals(signums), in the main thread: each of these signals that "
     "another thread takes is sent on to this one, which runs Python's handler."},
    {"signal_threads_parked", mod_signal_threads_parked, METH_VARARGS,
     "signal_threads_parked(more_than, timeout): wait up to timeout s until more than "
     "more_than of libmilter's signal threads sleep in our sigwait(); returns how many do."},
    {NULL, NULL, 0, NULL},
};

static const struct {
    const char *name;
    long value;
} constants[] = {
#define C(x) {#x, (long)(x)}
    C(SMFIS_CONTINUE), C(SMFIS_REJECT), C(SMFIS_DISCARD), C(SMFIS_ACCEPT),
    C(SMFIS_TEMPFAIL), C(SMFIS_NOREPLY), C(SMFIS_SKIP), C(SMFIS_ALL_OPTS),
    C(SMFIF_ADDHDRS), C(SMFIF_CHGBODY), C(SMFIF_ADDRCPT), C(SMFIF_DELRCPT),
    C(SMFIF_CHGHDRS), C(SMFIF_QUARANTINE), C(SMFIF_CHGFROM), C(SMFIF_ADDRCPT_PAR),
    C(SMFIF_SETSYMLIST),
    C(SMFIP_NOCONNECT), C(SMFIP_NOHELO), C(SMFIP_NOMAIL), C(SMFIP_NORCPT),
    C(SMFIP_NOBODY), C(SMFIP_NOHDRS), C(SMFIP_NOEOH), C(SMFIP_NR_HDR), C(SMFIP_NOHREPL),
    C(SMFIP_NOUNKNOWN), C(SMFIP_NODATA), C(SMFIP_SKIP), C(SMFIP_RCPT_REJ),
    C(SMFIP_NR_CONN), C(SMFIP_NR_HELO), C(SMFIP_NR_MAIL), C(SMFIP_NR_RCPT),
    C(SMFIP_NR_DATA), C(SMFIP_NR_UNKN), C(SMFIP_NR_EOH), C(SMFIP_NR_BODY),
    C(SMFIP_HDR_LEADSPC),
    C(SMFIM_CONNECT), C(SMFIM_HELO), C(SMFIM_ENVFROM), C(SMFIM_ENVRCPT),
    C(SMFIM_DATA), C(SMFIM_EOM), C(SMFIM_EOH),
#undef C
};

/* Process-wide objects, made on the first import (libmilter is one per process). */
static int
init_process_state(void)
{
    size_t i;

    if (S.parked != NULL)
        return 0;
    if (PyType_Ready(&Context_Type) < 0)
        return -1;
    if (pthread_key_create(&keep_key, drop_kept_state) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_key_create failed");
        return -1;
    }
    for (i = 1; i < ST_COUNT; i++)
        if ((S.method_names[i] = PyUnicode_InternFromString(stage_names[i])) == NULL)
            return -1;
    if ((S.negotiate_name = PyUnicode_InternFromString("_negotiate")) == NULL)
        return -1;
    S.error = PyErr_NewExceptionWithDoc("libmilter_ext._milter.MilterError",
                                        "A libmilter call failed.", NULL, NULL);
    if (S.error == NULL)
        return -1;
    S.stage_error = PyErr_NewExceptionWithDoc(
        "libmilter_ext._milter.StageError",
        "An action was used where libmilter does not allow it.", S.error, NULL);
    if (S.stage_error == NULL)
        return -1;
    return (S.parked = PyDict_New()) == NULL ? -1 : 0;
}

static int
add_ref(PyObject *m, const char *name, PyObject *obj)
{
    Py_INCREF(obj);
    if (PyModule_AddObject(m, name, obj) < 0) {
        Py_DECREF(obj);
        return -1;
    }
    return 0;
}

static int
milter_exec(PyObject *m)
{
    PyObject *atexit, *shutdown, *res;
    size_t i;

    /* libmilter calls back into one interpreter: the main one, whose factory
     * and handlers these are.  (3.12+ also refuses through the slot below.) */
    if (PyInterpreterState_Get() != PyInterpreterState_Main()) {
        PyErr_SetString(PyExc_ImportError,
                        "libmilter_ext._milter cannot be imported in a sub-interpreter: "
                        "libmilter is one per process and calls the main interpreter");
        return -1;
    }
    if (init_process_state() < 0)
        return -1;
    for (i = 0; i < sizeof constants / sizeof constants[0]; i++)
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0)
            return -1;
    if (add_ref(m, "MilterError", S.error) < 0 || add_ref(m, "StageError", S.stage_error) < 0
        || add_ref(m, "Context", (PyObject *)&Context_Type) < 0)
        return -1;
    /* Close the gate before finalization even when main() never gets to. */
    if ((atexit = PyImport_ImportModule("atexit")) == NULL)
        return -1;
    shutdown = PyObject_GetAttrString(m, "shutdown");
    res = shutdown ? PyObject_CallMethod(atexit, "register", "Od", shutdown, 1.0) : NULL;
    Py_XDECREF(shutdown);
    Py_DECREF(atexit);
    Py_XDECREF(res);
    return res == NULL ? -1 : 0;
}

static PyModuleDef_Slot milter_slots[] = {
    {Py_mod_exec, milter_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef milter_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "libmilter_ext._milter",
    .m_doc = "Thin binding of Sendmail's libmilter; use the libmilter_ext package.",
    .m_size = 0,
    .m_methods = module_methods,
    .m_slots = milter_slots,
};

PyMODINIT_FUNC
PyInit__milter(void)
{
    return PyModuleDef_Init(&milter_module);
}
