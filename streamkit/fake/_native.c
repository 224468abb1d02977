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
#include <structmember.h>

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

/* state.reads or state.writes (a new reference), or NULL with an exception set */
static PyObject *get_table(PyObject *state, PyObject *name) {
    PyObject *records = PyObject_GetAttr(state, name);
    if (records != NULL && !PyList_CheckExact(records)) {
        Py_DECREF(records);
        PyErr_SetString(PyExc_TypeError, "streamkit: corrupt access table (expected lists)");
        return NULL;
    }
    return records;
}

/* Report every record of table `name` ("reads", "writes") of `state` overlapping [lo, hi) that
 * nothing orders before this access. */
static int report_conflicts(const Clocks *c, PyObject *state, PyObject *name, Py_ssize_t lo, Py_ssize_t hi,
                            PyObject *report, PyObject *kernel, PyObject *kind, PyObject *tensor) {
    PyObject *records = get_table(state, name);
    if (records == NULL) return -1;
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
    PyObject *records = get_table(state, name);
    if (records == NULL) return -1;
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
    if (report_conflicts(c, state, s_writes, lo, hi, report, kernel, s_write_kind, tensor) < 0 ||
        report_conflicts(c, state, s_reads, lo, hi, report, kernel, s_write_kind, tensor) < 0)
        return -1;
    int rc;

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
    if (report_conflicts(c, state, s_writes, lo, hi, report, kernel, s_read_kind, tensor) < 0) return -1;
    int rc;

    PyObject *record = PyTuple_Pack(5, lo_obj, hi_obj, idx, seq, kernel);
    if (record == NULL) return -1;
    PyObject *reads = get_table(state, s_reads);
    if (reads == NULL) goto error;
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
/* the fast path: _fastpath.fast_call_python, the method stand-ins and __torch_function__ */

/* set by configure_fast_path(); see _fastpath.py for what each one is */
static PyObject *fp_plans, *fp_disabled, *fp_learn, *fp_types, *fp_state, *fp_get_session,
    *fp_fake_type, *fp_grad_enabled, *fp_any_requires_grad, *fp_wrap_fresh, *fp_no_kwargs, *fp_mode_enabled,
    *fp_function_enabled, *fp_fast_funcs, *fp_refuse;
static PyObject *s_session, *s_tensors, *s_lists, *s_returns_self, *s_host_sync, *s_op, *s_inner, *s_tls,
    *s_stream, *s_default_stream, *s_tracking, *s_launch;

static PyObject *call_disabled(PyObject *func, PyObject *args, PyObject *kwargs) {
    PyObject *argv[4] = {func, fp_types, args, kwargs};
    return PyObject_Vectorcall(fp_disabled, argv, 4, NULL);
}

/* the pattern key: (func, *arg types, *keyword names, *keyword value types) */
static PyObject *pattern_key(PyObject *func, PyObject *args, PyObject *kwargs) {
    Py_ssize_t n = PyTuple_GET_SIZE(args), nkw = kwargs ? PyDict_GET_SIZE(kwargs) : 0;
    PyObject *key = PyTuple_New(1 + n + 2 * nkw);
    if (key == NULL) return NULL;
    Py_INCREF(func);
    PyTuple_SET_ITEM(key, 0, func);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *tp = (PyObject *)Py_TYPE(PyTuple_GET_ITEM(args, i));
        Py_INCREF(tp);
        PyTuple_SET_ITEM(key, 1 + i, tp);
    }
    Py_ssize_t pos = 0, j = 0;
    PyObject *name, *value;
    while (kwargs != NULL && PyDict_Next(kwargs, &pos, &name, &value)) {
        PyObject *tp = (PyObject *)Py_TYPE(value);
        Py_INCREF(name);
        Py_INCREF(tp);
        PyTuple_SET_ITEM(key, 1 + n + j, name);
        PyTuple_SET_ITEM(key, 1 + n + nkw + j, tp);
        j++;
    }
    return key;
}

/* 1: t is a fake tensor of `session`; 0: not; -1: error */
static int of_session(PyObject *t, PyObject *session) {
    if (Py_TYPE(t) != (PyTypeObject *)fp_fake_type) return 0;
    PyObject *state = PyObject_GetAttr(t, s_st);
    if (state == NULL) return -1;
    PyObject *owner = PyObject_GetAttr(state, s_session);
    Py_DECREF(state);
    if (owner == NULL) return -1;
    Py_DECREF(owner);
    return owner == session;
}

static int add_access(PyObject *accesses, PyObject *t, PyObject *kind) {
    PyObject *pair = PyTuple_Pack(2, t, kind);
    if (pair == NULL) return -1;
    int rc = PyList_Append(accesses, pair);
    Py_DECREF(pair);
    return rc;
}

/* (position, kind) of a plan entry */
static int plan_entry(PyObject *entry, Py_ssize_t nargs, Py_ssize_t *p, PyObject **kind) {
    if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) goto bad;
    *p = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 0));
    if (*p < 0 || *p >= nargs) goto bad;
    *kind = PyTuple_GET_ITEM(entry, 1);
    return 0;
bad:
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "streamkit: corrupt fast-path plan");
    return -1;
}

#define FALLBACK 2 /* leave the call to the dispatch path */

/* Unwrap the plan's tensor and list arguments into `inner`, collecting the accesses. */
static int unwrap(PyObject *fast, PyObject *args, PyObject *session, PyObject *inner, PyObject *accesses) {
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    int rc = -1;
    PyObject *tensors = PyObject_GetAttr(fast, s_tensors);
    PyObject *lists = tensors ? PyObject_GetAttr(fast, s_lists) : NULL;
    if (lists == NULL) goto done;
    if (!PyTuple_CheckExact(tensors) || !PyTuple_CheckExact(lists)) {
        PyErr_SetString(PyExc_RuntimeError, "streamkit: corrupt fast-path plan");
        goto done;
    }
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(tensors); j++) {
        Py_ssize_t p;
        PyObject *kind;
        if (plan_entry(PyTuple_GET_ITEM(tensors, j), nargs, &p, &kind) < 0) goto done;
        PyObject *t = PyTuple_GET_ITEM(args, p);
        int ours = of_session(t, session);
        if (ours <= 0) {
            rc = ours < 0 ? -1 : FALLBACK; /* the dispatch path raises the right error */
            goto done;
        }
        PyObject *values = PyObject_GetAttr(t, s_inner);
        if (values == NULL) goto done;
        PyList_SetItem(inner, p, values);
        int truth = PyObject_IsTrue(kind);
        if (truth < 0 || (truth && add_access(accesses, t, kind) < 0)) goto done;
    }
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(lists); j++) {
        Py_ssize_t p;
        PyObject *kind;
        if (plan_entry(PyTuple_GET_ITEM(lists, j), nargs, &p, &kind) < 0) goto done;
        PyObject *items = PyTuple_GET_ITEM(args, p);
        if (!PyList_CheckExact(items)) {
            rc = FALLBACK;
            goto done;
        }
        Py_ssize_t n = PyList_GET_SIZE(items);
        PyObject *values = PyList_New(n);
        if (values == NULL) goto done;
        int truth = PyObject_IsTrue(kind);
        for (Py_ssize_t k = 0; k < n && truth >= 0; k++) {
            PyObject *t = PyList_GET_ITEM(items, k);
            int ours = of_session(t, session);
            if (ours <= 0) { /* CPU tensors mixed in, another session... */
                Py_DECREF(values);
                rc = ours < 0 ? -1 : FALLBACK;
                goto done;
            }
            PyObject *value = PyObject_GetAttr(t, s_inner);
            if (value == NULL || (truth && add_access(accesses, t, kind) < 0)) {
                Py_XDECREF(value);
                Py_DECREF(values);
                goto done;
            }
            PyList_SET_ITEM(values, k, value);
        }
        if (truth < 0) {
            Py_DECREF(values);
            goto done;
        }
        PyList_SetItem(inner, p, values);
    }
    rc = 0;
done:
    Py_XDECREF(tensors);
    Py_XDECREF(lists);
    return rc;
}

static PyObject *current_stream_of(PyObject *session) {
    PyObject *tls = PyObject_GetAttr(session, s_tls);
    if (tls == NULL) return NULL;
    PyObject *stream = PyObject_GetAttr(tls, s_stream);
    Py_DECREF(tls);
    if (stream == NULL) return NULL;
    if (stream != Py_None) return stream;
    Py_DECREF(stream);
    return PyObject_GetAttr(session, s_default_stream);
}

/* 1 if the dispatch path must take the call: autograd has to see ops on tensors that require grad */
static int needs_autograd(PyObject *args) {
    PyObject *enabled = PyObject_CallNoArgs(fp_grad_enabled);
    if (enabled == NULL) return -1;
    int on = PyObject_IsTrue(enabled);
    Py_DECREF(enabled);
    if (on <= 0) return on;
    PyObject *any = PyObject_Call(fp_any_requires_grad, args, NULL);
    if (any == NULL) return -1;
    int truth = PyObject_IsTrue(any);
    Py_DECREF(any);
    return truth;
}

static PyObject *fast_call_impl(PyObject *func, PyObject *args, PyObject *kwargs) {
    if (fp_plans == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "streamkit.fake._native: configure_fast_path() was not called");
        return NULL;
    }
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs) == 0) kwargs = NULL;
    PyObject *key = pattern_key(func, args, kwargs);
    if (key == NULL) return NULL;
    PyObject *call_kwargs = kwargs ? kwargs : fp_no_kwargs;
    PyObject *fast = PyDict_GetItemWithError(fp_plans, key);
    if (fast == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return NULL;
        }
        PyObject *argv[5] = {func, fp_types, args, call_kwargs, key};
        PyObject *out = PyObject_Vectorcall(fp_learn, argv, 5, NULL);
        Py_DECREF(key);
        return out;
    }
    Py_DECREF(key);
    if (fast == Py_None) return call_disabled(func, args, call_kwargs);
    Py_INCREF(fast);

    PyObject *session = NULL, *inner = NULL, *accesses = NULL, *stream = NULL, *site = NULL, *launched = NULL;
    PyObject *out = NULL;
    session = PyDict_GetItemWithError(fp_state, s_session);
    if (session == NULL && PyErr_Occurred()) goto done;
    if (session == NULL || session == Py_None) {
        session = PyObject_CallNoArgs(fp_get_session);
        if (session == NULL) goto done;
    } else {
        Py_INCREF(session);
    }
    inner = PySequence_List(args);
    accesses = inner ? PyList_New(0) : NULL;
    if (accesses == NULL) goto done;
    int rc = unwrap(fast, args, session, inner, accesses);
    if (rc == 0) rc = needs_autograd(args) ? FALLBACK : 0;
    if (rc < 0 || PyErr_Occurred()) goto done;
    if (rc == FALLBACK) {
        out = call_disabled(func, args, call_kwargs);
        goto done;
    }
    stream = current_stream_of(session);
    if (stream == NULL) goto done;
    PyObject *tracking = PyObject_GetAttr(session, s_tracking);
    if (tracking == NULL) goto done;
    int track = PyObject_IsTrue(tracking);
    Py_DECREF(tracking);
    if (track < 0) goto done;
    if (track) {
        PyObject *frame = (PyObject *)PyEval_GetFrame(); /* borrowed: the innermost Python frame */
        PyObject *argv[2] = {frame ? frame : Py_None, NULL};
        argv[1] = PyLong_FromLong(3);
        if (argv[1] == NULL) goto done;
        site = capture_site(NULL, argv, 2);
        Py_DECREF(argv[1]);
        if (site == NULL) goto done;
    } else {
        site = Py_NewRef(Py_None);
    }
    PyObject *op = PyObject_GetAttr(fast, s_op);
    PyObject *host_sync = op ? PyObject_GetAttr(fast, s_host_sync) : NULL;
    PyObject *launch = host_sync ? PyObject_GetAttr(session, s_launch) : NULL;
    if (launch != NULL) {
        PyObject *argv[8] = {op, func, stream, site, inner, call_kwargs, accesses, host_sync};
        launched = PyObject_Vectorcall(launch, argv, 8, NULL);
    }
    Py_XDECREF(launch);
    Py_XDECREF(host_sync);
    Py_XDECREF(op);
    if (launched == NULL) goto done;
    if (!PyTuple_CheckExact(launched) || PyTuple_GET_SIZE(launched) != 2) {
        PyErr_SetString(PyExc_RuntimeError, "streamkit: Session.launch must return (kernel, result)");
        goto done;
    }
    PyObject *kernel = PyTuple_GET_ITEM(launched, 0), *result = PyTuple_GET_ITEM(launched, 1);
    PyObject *returns_self = PyObject_GetAttr(fast, s_returns_self);
    if (returns_self == NULL) goto done;
    int self_out = PyObject_IsTrue(returns_self);
    Py_DECREF(returns_self);
    if (self_out < 0) goto done;
    if (self_out) {
        out = Py_NewRef(PyTuple_GET_ITEM(args, 0));
        goto done;
    }
    for (Py_ssize_t p = 0; p < PyList_GET_SIZE(inner); p++) {
        /* defensive: an op that handed back its input is no new memory */
        if (result == PyList_GET_ITEM(inner, p) && PyList_GET_ITEM(inner, p) != PyTuple_GET_ITEM(args, p)) {
            out = Py_NewRef(PyTuple_GET_ITEM(args, p));
            goto done;
        }
    }
    PyObject *argv[5] = {session, result, stream, kernel, site};
    out = PyObject_Vectorcall(fp_wrap_fresh, argv, 5, NULL);
done:
    Py_XDECREF(launched);
    Py_XDECREF(site);
    Py_XDECREF(stream);
    Py_XDECREF(accesses);
    Py_XDECREF(inner);
    Py_XDECREF(session);
    Py_DECREF(fast);
    return out;
}

static PyObject *fast_call(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (nargs != 3 || kwnames != NULL || !PyTuple_Check(args[1]) || (args[2] != Py_None && !PyDict_Check(args[2]))) {
        PyErr_SetString(PyExc_TypeError, "fast_call(func, args: tuple, kwargs: dict | None)");
        return NULL;
    }
    return fast_call_impl(args[0], args[1], args[2] == Py_None ? NULL : args[2]);
}

/* 1 when a TorchFunctionMode is active or torch functions are disabled: then the C method runs */
static int plain_torch_call(void) {
    PyObject *mode = PyObject_CallNoArgs(fp_mode_enabled);
    if (mode == NULL) return -1;
    int on = PyObject_IsTrue(mode);
    Py_DECREF(mode);
    if (on != 0) return on;
    PyObject *enabled = PyObject_CallNoArgs(fp_function_enabled);
    if (enabled == NULL) return -1;
    int truth = PyObject_IsTrue(enabled);
    Py_DECREF(enabled);
    return truth < 0 ? -1 : !truth;
}

/* torch_function(cls, func, types, args=(), kwargs=None): FakeDeviceTensor.__torch_function__ */
static PyObject *torch_function(PyObject *module, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    if (nargs < 3 || nargs > 5 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "__torch_function__(cls, func, types, args=(), kwargs=None)");
        return NULL;
    }
    if (fp_plans == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "streamkit.fake._native: configure_fast_path() was not called");
        return NULL;
    }
    PyObject *func = args[1], *types = args[2];
    PyObject *call_args = nargs > 3 ? args[3] : NULL;
    PyObject *kwargs = nargs > 4 && args[4] != Py_None ? args[4] : NULL;
    int fast = PySet_Contains(fp_fast_funcs, func);
    if (fast < 0) {
        PyErr_Clear(); /* unhashable: not one of ours */
        fast = 0;
    }
    PyObject *empty = NULL, *out;
    if (call_args == NULL) call_args = empty = PyTuple_New(0);
    if (call_args == NULL) return NULL;
    if (fast && PyTuple_Check(call_args) && (kwargs == NULL || PyDict_Check(kwargs))) {
        out = fast_call_impl(func, call_args, kwargs);
    } else {
        /* the backward check and plain dispatch stay in Python */
        PyObject *argv[4] = {func, types, call_args, kwargs ? kwargs : Py_None};
        out = PyObject_Vectorcall(fp_refuse, argv, 4, NULL);
    }
    Py_XDECREF(empty);
    return out;
}

/* FastMethod: stands in for a whitelisted C method of torch.Tensor on the fake tensor class. */
typedef struct {
    PyObject_HEAD
    PyObject *func;
    PyObject *name;
    PyObject *doc;
    vectorcallfunc vectorcall;
} FastMethod;

static PyObject *fast_method_vectorcall(PyObject *self_, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    FastMethod *self = (FastMethod *)self_;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    int plain = plain_torch_call();
    if (plain < 0) return NULL;
    if (plain) return PyObject_Vectorcall(self->func, args, nargsf, kwnames);
    PyObject *tuple = PyTuple_New(nargs);
    if (tuple == NULL) return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
    PyObject *kwargs = NULL;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) {
        kwargs = PyDict_New();
        for (Py_ssize_t i = 0; kwargs && i < PyTuple_GET_SIZE(kwnames); i++) {
            if (PyDict_SetItem(kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) Py_CLEAR(kwargs);
        }
        if (kwargs == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
    }
    PyObject *out = fast_call_impl(self->func, tuple, kwargs);
    Py_DECREF(tuple);
    Py_XDECREF(kwargs);
    return out;
}

static PyObject *fast_method_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None) return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyObject *fast_method_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    PyObject *func;
    if (!PyArg_ParseTuple(args, "O:FastMethod", &func)) return NULL;
    FastMethod *self = (FastMethod *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->func = Py_NewRef(func);
    self->name = PyObject_GetAttrString(func, "__name__");
    self->doc = self->name ? PyObject_GetAttrString(func, "__doc__") : NULL;
    self->vectorcall = fast_method_vectorcall;
    if (self->doc == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int fast_method_traverse(FastMethod *self, visitproc visit, void *arg) {
    Py_VISIT(self->func);
    return 0;
}

static void fast_method_dealloc(FastMethod *self) {
    PyObject_GC_UnTrack(self);
    Py_XDECREF(self->func);
    Py_XDECREF(self->name);
    Py_XDECREF(self->doc);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef fast_method_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(FastMethod, func), READONLY, "the C method of torch.Tensor it stands in for"},
    {"__name__", T_OBJECT, offsetof(FastMethod, name), READONLY, NULL},
    {"__qualname__", T_OBJECT, offsetof(FastMethod, name), READONLY, NULL},
    {"__doc__", T_OBJECT, offsetof(FastMethod, doc), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(FastMethod, vectorcall), READONLY, NULL},
    {NULL},
};

static PyTypeObject FastMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "streamkit.fake._native.FastMethod",
    .tp_basicsize = sizeof(FastMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "FastMethod(func): a whitelisted C method of torch.Tensor that enters the fast path"
              " (unless a TorchFunctionMode is active or torch functions are disabled: then func runs).",
    .tp_new = fast_method_new,
    .tp_dealloc = (destructor)fast_method_dealloc,
    .tp_traverse = (traverseproc)fast_method_traverse,
    .tp_call = PyVectorcall_Call,
    .tp_descr_get = fast_method_get,
    .tp_vectorcall_offset = offsetof(FastMethod, vectorcall),
    .tp_members = fast_method_members,
};

static PyObject *configure_fast_path(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"plans", "disabled", "learn", "types", "state", "get_session",
                            "fake_type", "grad_enabled", "any_requires_grad", "wrap_fresh", "no_kwargs",
                            "mode_enabled", "function_enabled", "fast_funcs", "refuse", NULL};
    PyObject *v[15];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$O!OOO!O!OO!OOOO!OOO!O:configure_fast_path", names,
                                     &PyDict_Type, &v[0], &v[1], &v[2], &PyTuple_Type, &v[3],
                                     &PyDict_Type, &v[4], &v[5], &PyType_Type, &v[6], &v[7], &v[8], &v[9],
                                     &PyDict_Type, &v[10], &v[11], &v[12], &PyFrozenSet_Type, &v[13], &v[14]))
        return NULL;
    PyObject **slots[15] = {&fp_plans, &fp_disabled, &fp_learn, &fp_types, &fp_state,
                            &fp_get_session, &fp_fake_type, &fp_grad_enabled, &fp_any_requires_grad,
                            &fp_wrap_fresh, &fp_no_kwargs, &fp_mode_enabled, &fp_function_enabled,
                            &fp_fast_funcs, &fp_refuse};
    for (int i = 0; i < 15; i++) {
        Py_INCREF(v[i]);
        Py_XSETREF(*slots[i], v[i]);
    }
    Py_RETURN_NONE;
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
    {"configure_fast_path", (PyCFunction)(void (*)(void))configure_fast_path, METH_VARARGS | METH_KEYWORDS,
     "configure_fast_path(**names): what fast_call reads of _fastpath and _tensor (see _fastpath.py)."},
    {"fast_call", (PyCFunction)(void (*)(void))fast_call, METH_FASTCALL | METH_KEYWORDS,
     "fast_call(func, args, kwargs): _fastpath.fast_call_python in C."},
    {"torch_function", (PyCFunction)(void (*)(void))torch_function, METH_FASTCALL | METH_KEYWORDS,
     "torch_function(cls, func, types, args=(), kwargs=None): the fake tensor's __torch_function__."},
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
    INTERN(s_session, "session");
    INTERN(s_tensors, "tensors");
    INTERN(s_lists, "lists");
    INTERN(s_returns_self, "returns_self");
    INTERN(s_host_sync, "host_sync");
    INTERN(s_op, "op");
    INTERN(s_inner, "_inner");
    INTERN(s_tls, "_tls");
    INTERN(s_stream, "stream");
    INTERN(s_default_stream, "_default_stream");
    INTERN(s_tracking, "tracking");
    INTERN(s_launch, "launch");
#undef INTERN
    if (PyType_Ready(&FastMethodType) < 0) return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) return NULL;
    Py_INCREF(&FastMethodType);
    if (PyModule_AddObject(module, "FastMethod", (PyObject *)&FastMethodType) < 0) {
        Py_DECREF(&FastMethodType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
