/* The fake backend's per-access hot loops in C: issue-site capture and the happens-before check.
 *
 * Each function here is an exact port of a Python function that stays in the package as the
 * reference implementation (STREAMKIT_NATIVE=0 runs that one; tests/unit/test_native.py checks
 * that both agree on random access sequences):
 *
 *   capture_site(frame, depth)                     _report.capture_site
 *   check(report, host, accesses, stream, kernel)  _detector.Detector.check_python
 *
 * The data stays in Python objects (clocks are lists of ints, access records are tuples
 * (start, end, stream_idx, seq, kernel), tables are StorageState slots): only the loops move here.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>

static PyObject *internal_codes; /* dict: code filename -> bool (torch/streamkit/stdlib internal) */
static PyObject *classify;       /* callable: filename -> bool, for filenames not in the dict yet */
static Py_ssize_t max_skipped = 64;

static PyObject *s_lo, *s_hi, *s_st, *s_reads, *s_writes, *s_nbytes, *s_clock, *s_idx, *s_seq;
static PyObject *s_read_kind, *s_write_kind; /* "read", "write": the kind named in a report */

/* ------------------------------------------------------------------------------------------ */
/* issue sites */

static PyObject *site_entry(PyFrameObject *frame) {
    PyCodeObject *code = PyFrame_GetCode(frame);
#if PY_VERSION_HEX >= 0x030B0000
    PyObject *lasti = PyLong_FromLong(PyFrame_GetLasti(frame));
#else
    PyObject *lasti = PyObject_GetAttrString((PyObject *)frame, "f_lasti");
#endif
    if (lasti == NULL) {
        Py_DECREF(code);
        return NULL;
    }
    PyObject *entry = PyTuple_Pack(2, (PyObject *)code, lasti);
    Py_DECREF(code);
    Py_DECREF(lasti);
    return entry;
}

/* 1: internal, 0: the user's code, -1: error */
static int is_internal(PyCodeObject *code) {
    PyObject *filename = code->co_filename;
    PyObject *known = PyDict_GetItemWithError(internal_codes, filename);
    if (known == NULL) {
        if (PyErr_Occurred()) return -1;
        known = PyObject_CallOneArg(classify, filename);
        if (known == NULL) return -1;
        int stored = PyDict_SetItem(internal_codes, filename, known);
        int truth = PyObject_IsTrue(known);
        Py_DECREF(known);
        return stored < 0 ? -1 : truth;
    }
    return PyObject_IsTrue(known);
}

static PyObject *capture_site(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (internal_codes == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "streamkit.fake._native: configure() was not called");
        return NULL;
    }
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "capture_site(frame, depth=3)");
        return NULL;
    }
    Py_ssize_t depth = 3;
    if (nargs == 2) {
        depth = PyLong_AsSsize_t(args[1]);
        if (depth == -1 && PyErr_Occurred()) return NULL;
    }
    PyObject *site = PyList_New(0);
    if (site == NULL) return NULL;
    if (args[0] == Py_None) return site;
    if (!PyFrame_Check(args[0])) {
        Py_DECREF(site);
        PyErr_SetString(PyExc_TypeError, "capture_site(frame): expected a frame or None");
        return NULL;
    }
    PyFrameObject *innermost = (PyFrameObject *)args[0];
    PyFrameObject *frame = innermost;
    Py_INCREF(frame);
    Py_ssize_t skipped = 0;
    while (frame != NULL) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        int internal = is_internal(code);
        Py_DECREF(code);
        if (internal < 0) goto error;
        if (!internal) {
            PyObject *entry = site_entry(frame);
            if (entry == NULL) goto error;
            int appended = PyList_Append(site, entry);
            Py_DECREF(entry);
            if (appended < 0) goto error;
            if (--depth == 0) break;
        } else if (skipped >= max_skipped) {
            break;
        } else {
            skipped++;
        }
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame);
        frame = back;
    }
    Py_XDECREF(frame);
    if (PyList_GET_SIZE(site) == 0) {
        PyObject *entry = site_entry(innermost);
        if (entry == NULL || PyList_Append(site, entry) < 0) {
            Py_XDECREF(entry);
            Py_DECREF(site);
            return NULL;
        }
        Py_DECREF(entry);
    }
    return site;
error:
    Py_XDECREF(frame);
    Py_DECREF(site);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* the happens-before check */

/* Clocks are lists of Python ints; records are (start, end, stream_idx, seq, kernel). */
typedef struct {
    PyObject *clock;   /* the issuing stream's clock (list) */
    PyObject *host;    /* the session's host clock (list, merged in place) */
} Clocks;

static inline Py_ssize_t as_index(PyObject *value) { return PyLong_AsSsize_t(value); }

static inline int clock_covers(PyObject *clock, Py_ssize_t i, Py_ssize_t seq) {
    if (i >= PyList_GET_SIZE(clock)) return 0;
    return PyLong_AsSsize_t(PyList_GET_ITEM(clock, i)) >= seq;
}

/* Whether record r (its stream index and seq) happens before what the issuing stream does next:
 * the stream's clock or the host's orders it. */
static inline int ordered(const Clocks *c, PyObject *r) {
    Py_ssize_t i = as_index(PyTuple_GET_ITEM(r, 2));
    Py_ssize_t seq = as_index(PyTuple_GET_ITEM(r, 3));
    return clock_covers(c->clock, i, seq) || clock_covers(c->host, i, seq);
}

static inline int overlaps(PyObject *r, Py_ssize_t lo, Py_ssize_t hi) {
    return as_index(PyTuple_GET_ITEM(r, 0)) < hi && lo < as_index(PyTuple_GET_ITEM(r, 1));
}

static int is_record(PyObject *r) {
    if (PyTuple_CheckExact(r) && PyTuple_GET_SIZE(r) == 5) return 1;
    PyErr_SetString(PyExc_TypeError, "streamkit: corrupt access table (expected 5-tuples)");
    return 0;
}

/* Report every record of `records` overlapping [lo, hi) that nothing orders before this access. */
static int report_conflicts(const Clocks *c, PyObject *records, Py_ssize_t lo, Py_ssize_t hi, PyObject *report,
                            PyObject *kernel, PyObject *kind, PyObject *tensor, PyObject *state) {
    if (!PyList_CheckExact(records)) {
        PyErr_SetString(PyExc_TypeError, "streamkit: corrupt access table (expected lists)");
        return -1;
    }
    Py_INCREF(records);
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(records); j++) {
        PyObject *r = PyList_GET_ITEM(records, j);
        if (!is_record(r)) goto error;
        if (overlaps(r, lo, hi) && !ordered(c, r)) {
            Py_INCREF(r);
            PyObject *args[5] = {r, kernel, kind, tensor, state};
            PyObject *out = PyObject_Vectorcall(report, args, 5, NULL);
            Py_DECREF(r);
            if (out == NULL) goto error;
            Py_DECREF(out);
        }
    }
    Py_DECREF(records);
    return 0;
error:
    Py_DECREF(records);
    return -1;
}

/* records without those that [start, end) covers and (with `c`) that are ordered before it */
static PyObject *without_covered(PyObject *records, Py_ssize_t start, Py_ssize_t end, const Clocks *c) {
    Py_ssize_t n = PyList_GET_SIZE(records);
    PyObject *kept = PyList_New(0);
    if (kept == NULL) return NULL;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *r = PyList_GET_ITEM(records, j);
        if (!is_record(r)) goto error;
        int covered = as_index(PyTuple_GET_ITEM(r, 0)) >= start && as_index(PyTuple_GET_ITEM(r, 1)) <= end;
        if (covered && c != NULL) covered = ordered(c, r);
        if (!covered && PyList_Append(kept, r) < 0) goto error;
    }
    return kept;
error:
    Py_DECREF(kept);
    return NULL;
}

static int set_filtered(PyObject *state, PyObject *name, Py_ssize_t start, Py_ssize_t end, const Clocks *c) {
    PyObject *records = PyObject_GetAttr(state, name);
    if (records == NULL) return -1;
    if (!PyList_CheckExact(records)) {
        Py_DECREF(records);
        PyErr_SetString(PyExc_TypeError, "streamkit: corrupt access table (expected lists)");
        return -1;
    }
    if (PyList_GET_SIZE(records) == 0 && c == NULL) {
        Py_DECREF(records);
        return 0;
    }
    PyObject *kept = without_covered(records, start, end, c);
    Py_DECREF(records);
    if (kept == NULL) return -1;
    int rc = PyObject_SetAttr(state, name, kept);
    Py_DECREF(kept);
    return rc;
}

static int append_to(PyObject *state, PyObject *name, PyObject *record) {
    PyObject *records = PyObject_GetAttr(state, name);
    if (records == NULL) return -1;
    int rc = PyList_Append(records, record);
    Py_DECREF(records);
    return rc;
}

static int check_write(const Clocks *c, PyObject *state, PyObject *lo_obj, PyObject *hi_obj, Py_ssize_t lo,
                       Py_ssize_t hi, PyObject *idx, PyObject *seq, PyObject *report, PyObject *kernel,
                       PyObject *tensor) {
    PyObject *writes = PyObject_GetAttr(state, s_writes);
    if (writes == NULL) return -1;
    int rc = report_conflicts(c, writes, lo, hi, report, kernel, s_write_kind, tensor, state);
    Py_DECREF(writes);
    if (rc < 0) return -1;
    PyObject *reads = PyObject_GetAttr(state, s_reads);
    if (reads == NULL) return -1;
    rc = report_conflicts(c, reads, lo, hi, report, kernel, s_write_kind, tensor, state);
    Py_DECREF(reads);
    if (rc < 0) return -1;

    PyObject *record = PyTuple_Pack(5, lo_obj, hi_obj, idx, seq, kernel);
    if (record == NULL) return -1;
    PyObject *nbytes_obj = PyObject_GetAttr(state, s_nbytes);
    if (nbytes_obj == NULL) goto error;
    Py_ssize_t nbytes = PyLong_AsSsize_t(nbytes_obj);
    Py_DECREF(nbytes_obj);
    if (nbytes == -1 && PyErr_Occurred()) goto error;
    if (lo == 0 && hi == nbytes) {
        /* the whole storage: this write supersedes every record */
        PyObject *only = PyList_New(1);
        if (only == NULL) goto error;
        Py_INCREF(record);
        PyList_SET_ITEM(only, 0, record);
        rc = PyObject_SetAttr(state, s_writes, only);
        Py_DECREF(only);
        if (rc < 0) goto error;
        PyObject *empty = PyList_New(0);
        if (empty == NULL) goto error;
        rc = PyObject_SetAttr(state, s_reads, empty);
        Py_DECREF(empty);
        if (rc < 0) goto error;
    } else if (set_filtered(state, s_writes, lo, hi, NULL) < 0 || set_filtered(state, s_reads, lo, hi, NULL) < 0 ||
               append_to(state, s_writes, record) < 0) {
        goto error;
    }
    Py_DECREF(record);
    return 0;
error:
    Py_DECREF(record);
    return -1;
}

static int check_read(const Clocks *c, PyObject *state, PyObject *lo_obj, PyObject *hi_obj, Py_ssize_t lo,
                      Py_ssize_t hi, PyObject *idx, PyObject *seq, PyObject *report, PyObject *kernel,
                      PyObject *tensor) {
    PyObject *writes = PyObject_GetAttr(state, s_writes);
    if (writes == NULL) return -1;
    int rc = report_conflicts(c, writes, lo, hi, report, kernel, s_read_kind, tensor, state);
    Py_DECREF(writes);
    if (rc < 0) return -1;

    PyObject *record = PyTuple_Pack(5, lo_obj, hi_obj, idx, seq, kernel);
    if (record == NULL) return -1;
    PyObject *reads = PyObject_GetAttr(state, s_reads);
    if (reads == NULL) goto error;
    if (!PyList_CheckExact(reads)) {
        Py_DECREF(reads);
        PyErr_SetString(PyExc_TypeError, "streamkit: corrupt access table (expected lists)");
        goto error;
    }
    Py_ssize_t n = PyList_GET_SIZE(reads);
    if (n == 0) {
        rc = PyList_Append(reads, record);
    } else if (n == 1) {
        /* the steady state: the same reader again, covering the last read and ordered after it */
        PyObject *r = PyList_GET_ITEM(reads, 0);
        if (!is_record(r)) {
            rc = -1;
        } else if (as_index(PyTuple_GET_ITEM(r, 0)) >= lo && as_index(PyTuple_GET_ITEM(r, 1)) <= hi &&
                   clock_covers(c->clock, as_index(PyTuple_GET_ITEM(r, 2)), as_index(PyTuple_GET_ITEM(r, 3)))) {
            Py_INCREF(record);
            PyList_SetItem(reads, 0, record);
            rc = 0;
        } else {
            rc = PyList_Append(reads, record);
        }
    } else {
        rc = set_filtered(state, s_reads, lo, hi, c);
        if (rc == 0) rc = append_to(state, s_reads, record);
    }
    Py_DECREF(reads);
    Py_DECREF(record);
    return rc;
error:
    Py_DECREF(record);
    return -1;
}

/* check(report, host, accesses, stream, kernel): check and record every (tensor, kind) access of
 * `kernel`, issued to `stream`; `report(record, kernel, "read" | "write", tensor, state)` is
 * called for each race found (and may raise). */
static PyObject *check(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "check(report, host, accesses, stream, kernel)");
        return NULL;
    }
    PyObject *report = args[0], *host = args[1], *accesses = args[2], *stream = args[3], *kernel = args[4];
    if (!PyList_CheckExact(host) || !PyList_CheckExact(accesses)) {
        PyErr_SetString(PyExc_TypeError, "check(): host and accesses must be lists");
        return NULL;
    }
    PyObject *clock = PyObject_GetAttr(stream, s_clock);
    if (clock == NULL) return NULL;
    PyObject *idx = NULL, *seq = NULL;
    if (!PyList_CheckExact(clock)) {
        PyErr_SetString(PyExc_TypeError, "check(): a stream's clock must be a list");
        goto error;
    }
    idx = PyObject_GetAttr(stream, s_idx);
    if (idx == NULL) goto error;
    seq = PyObject_GetAttr(kernel, s_seq);
    if (seq == NULL) goto error;
    Clocks c = {clock, host};
    Py_INCREF(accesses);
    for (Py_ssize_t a = 0; a < PyList_GET_SIZE(accesses); a++) {
        PyObject *access = PyList_GET_ITEM(accesses, a);
        if (!PyTuple_CheckExact(access) || PyTuple_GET_SIZE(access) != 2) {
            PyErr_SetString(PyExc_TypeError, "check(): accesses must be (tensor, kind) pairs");
            goto error_accesses;
        }
        PyObject *tensor = PyTuple_GET_ITEM(access, 0);
        long kind = PyLong_AsLong(PyTuple_GET_ITEM(access, 1));
        if (kind == -1 && PyErr_Occurred()) goto error_accesses;
        Py_INCREF(tensor);
        PyObject *lo_obj = PyObject_GetAttr(tensor, s_lo);
        PyObject *hi_obj = lo_obj ? PyObject_GetAttr(tensor, s_hi) : NULL;
        PyObject *state = hi_obj ? PyObject_GetAttr(tensor, s_st) : NULL;
        int rc = -1;
        if (state != NULL) {
            Py_ssize_t lo = PyLong_AsSsize_t(lo_obj), hi = PyLong_AsSsize_t(hi_obj);
            if (PyErr_Occurred()) {
                rc = -1;
            } else if (hi <= lo) {
                rc = 0; /* no bytes: not an access */
            } else if (kind == 2) {
                rc = check_write(&c, state, lo_obj, hi_obj, lo, hi, idx, seq, report, kernel, tensor);
            } else {
                rc = check_read(&c, state, lo_obj, hi_obj, lo, hi, idx, seq, report, kernel, tensor);
            }
        }
        Py_XDECREF(state);
        Py_XDECREF(hi_obj);
        Py_XDECREF(lo_obj);
        Py_DECREF(tensor);
        if (rc < 0) goto error_accesses;
    }
    Py_DECREF(accesses);
    Py_DECREF(seq);
    Py_DECREF(idx);
    Py_DECREF(clock);
    Py_RETURN_NONE;
error_accesses:
    Py_DECREF(accesses);
error:
    Py_XDECREF(seq);
    Py_XDECREF(idx);
    Py_DECREF(clock);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */

static PyObject *configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyDict_CheckExact(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "configure(internal_codes: dict, classify: callable, max_skipped: int)");
        return NULL;
    }
    Py_ssize_t skipped = PyLong_AsSsize_t(args[2]);
    if (skipped == -1 && PyErr_Occurred()) return NULL;
    Py_INCREF(args[0]);
    Py_XSETREF(internal_codes, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(classify, args[1]);
    max_skipped = skipped;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(internal_codes, classify, max_skipped): the filename cache and classifier of capture_site."},
    {"capture_site", (PyCFunction)(void (*)(void))capture_site, METH_FASTCALL,
     "capture_site(frame, depth=3): up to depth user frames as (code, f_lasti) pairs (see _report.capture_site)."},
    {"check", (PyCFunction)(void (*)(void))check, METH_FASTCALL,
     "check(report, host, accesses, stream, kernel): the happens-before check (see _detector.Detector)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_native", "streamkit's fake-backend hot loops", -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(s_lo, "_lo");
    INTERN(s_hi, "_hi");
    INTERN(s_st, "_st");
    INTERN(s_reads, "reads");
    INTERN(s_writes, "writes");
    INTERN(s_nbytes, "nbytes");
    INTERN(s_clock, "clock");
    INTERN(s_idx, "idx");
    INTERN(s_seq, "seq");
    INTERN(s_read_kind, "read");
    INTERN(s_write_kind, "write");
#undef INTERN
    return PyModule_Create(&module_def);
}
