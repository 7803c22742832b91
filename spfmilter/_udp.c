/*
 * spfmilter._udp: a DNS query's datagram out and its answer in, letting go of
 * the GIL once.
 *
 * Python's socket.send lets go of the GIL around send(2) even when it cannot
 * block, and every release with other threads waiting hands the GIL over
 * (a futex wake and a context switch each way between libmilter's threads).
 * A datagram on a connected UDP socket goes out at once, so here it is sent
 * with the GIL held (MSG_DONTWAIT); only a full send buffer (EAGAIN, ENOBUFS)
 * waits, and it does so in the one released section, with the receive.
 *
 * Thin on purpose: no DNS here, only the system calls dnsclient.py would
 * make (setsockopt SO_RCVTIMEO, send, recv), in the same order, with the same
 * results and errors as the socket module gives them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/time.h>

#define MAX_UDP 65535

/* Calls of exchange() so far, and the GIL releases they made (one each, and
 * one more per signal that interrupted a wait).  Changed with the GIL held. */
static unsigned long long calls, releases;

static int
set_receive_timeout(int fd, double seconds)
{
    struct timeval tv;

    tv.tv_sec = (time_t)seconds;
    tv.tv_usec = (suseconds_t)((seconds - (double)tv.tv_sec) * 1e6);
    if (tv.tv_usec < 0)
        tv.tv_usec = 0;
    if (tv.tv_sec == 0 && tv.tv_usec == 0)
        tv.tv_usec = 1; /* all zero would mean no limit */
    return setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

PyDoc_STRVAR(exchange_doc,
"exchange(fd, wire, timeout, /) -> bytes\n"
"\n"
"Send *wire* (bytes, or None for no send) on the connected, blocking socket\n"
"*fd*, then wait at most *timeout* (> 0) seconds for a datagram (SO_RCVTIMEO)\n"
"and return it (at most 65535 octets).  The GIL is released once, around the\n"
"wait.  Raises BlockingIOError when the wait timed out, OSError for any other\n"
"failure, as socket.send and socket.recv would.");

static PyObject *
exchange(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long fd;
    double timeout;
    Py_buffer wire = {NULL};
    int have_wire, sent = 0, saved_errno = 0;
    ssize_t n;
    PyObject *data;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "exchange() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "exchange(): not a file descriptor");
        return NULL;
    }
    timeout = PyFloat_AsDouble(args[2]);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(timeout > 0.0)) {
        PyErr_SetString(PyExc_ValueError, "exchange(): timeout must be positive");
        return NULL;
    }
    have_wire = args[1] != Py_None;
    if (have_wire && PyObject_GetBuffer(args[1], &wire, PyBUF_SIMPLE) < 0)
        return NULL;

    calls++;
    if (set_receive_timeout((int)fd, timeout) < 0)
        goto os_error;
    if (have_wire) {
        do {
            n = send((int)fd, wire.buf, (size_t)wire.len, MSG_DONTWAIT);
        } while (n < 0 && errno == EINTR);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS)
            goto os_error;
        sent = n >= 0;
    }
    data = PyBytes_FromStringAndSize(NULL, MAX_UDP);
    if (data == NULL)
        goto error;
    for (;;) {
        releases++;
        Py_BEGIN_ALLOW_THREADS
        n = 0;
        if (have_wire && !sent) { /* the send buffer was full: wait for room here */
            n = send((int)fd, wire.buf, (size_t)wire.len, 0);
            if (n >= 0)
                sent = 1;
        }
        if (n >= 0)
            n = recv((int)fd, PyBytes_AS_STRING(data), MAX_UDP, 0);
        saved_errno = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0 || saved_errno != EINTR)
            break;
        /* as the socket module: run the signal handlers, then try again */
        if (PyErr_CheckSignals() < 0) {
            Py_DECREF(data);
            goto error;
        }
    }
    if (n < 0) {
        Py_DECREF(data);
        errno = saved_errno;
        goto os_error;
    }
    if (wire.obj != NULL)
        PyBuffer_Release(&wire);
    if (n != MAX_UDP && _PyBytes_Resize(&data, n) < 0)
        return NULL;
    return data;

os_error:
    PyErr_SetFromErrno(PyExc_OSError);
error:
    if (wire.obj != NULL)
        PyBuffer_Release(&wire);
    return NULL;
}

PyDoc_STRVAR(stats_doc,
"stats() -> (calls, releases)\n"
"\n"
"exchange() calls so far, and the GIL releases they made: one per call, and\n"
"one more for each signal that interrupted a wait.");

static PyObject *
stats(PyObject *module, PyObject *unused)
{
    return Py_BuildValue("(KK)", calls, releases);
}

static PyMethodDef methods[] = {
    {"exchange", (PyCFunction)(void (*)(void))exchange, METH_FASTCALL, exchange_doc},
    {"stats", stats, METH_NOARGS, stats_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "spfmilter._udp",
    .m_doc = "A DNS query's datagram out and its answer in, releasing the GIL once.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__udp(void)
{
    return PyModuleDef_Init(&module_def);
}
