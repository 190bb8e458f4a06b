/* engine.audio._native: realtalk's audio periods in C (the native backend, issue 25).
 *
 * What is here: a view of the engine's shared-memory PCM rings (engine/audio/ring.py's layout,
 * version 2), the playback renderer (prebuffer or the ring's jitter-buffer target plus the
 * device's read-ahead spread, end marks, flush fade, underruns and growth, heard index,
 * time-stretching, soxr to the device rate) run from the speaker's output callback, and the
 * capture path (a PortAudio input callback that writes the device's frames to a ring; a worker
 * step that resamples, runs the echo canceller's one Python call, guards and writes the mic ring).
 * engine/audio/native.py is its Python face; nothing else imports this module.
 *
 * Rules (binding for every line of this file):
 *  1. A device callback (a PortAudio thread, or libpulse's mainloop thread) never takes the GIL,
 *     never calls Python, never allocates, never blocks, never logs: it counts what goes wrong.
 *     Its own system calls are clock_gettime and a non-blocking eventfd write (libpulse's
 *     stream calls around it are the host's, as PortAudio's are). One exception, not per period:
 *     when the libpulse speaker's sink runs dry, or after 30 s calm, its buffer is retargeted by
 *     one pa_stream_set_buffer_attr, which allocates a request and queues it without blocking
 *     (at most 5 rises in a row, a fall per 30 s; "the device host" below).
 *  2. The shared rings are read and written exactly as engine/audio/ring.py lays them out: int64
 *     slots, one writer per slot; a side copies frames, then publishes its index with a release
 *     store, and loads the other side's index with an acquire load (x86-64 and ARM64 alike). The
 *     mic ring's wake-up is ring.py's Dekker pattern: store write_index, full fence, load
 *     reader_waiting, write the eventfd only if it is up.
 *  3. Python talks to a running callback only through fields with one writer each (relaxed atomic
 *     loads and stores of aligned 64-bit values: while a stream runs, Python writes only the
 *     listen switch and reads the rest), through the SPSC event queue the callback fills and
 *     Python drains, and through the capture's device ring (the callback writes, the worker's
 *     step reads). Python is never called back from an audio thread.
 *  4. Every buffer is allocated when its object is made; a callback's work is bounded by its
 *     period. What drives the renderer or feeds the capture from Python (render, fill, push,
 *     set_listen, the renderer's settable fields) refuses to run while a device stream of theirs
 *     is running: one producer, one consumer.
 *  5. The behaviour is the Python implementation's, line for line (engine/playback/renderer.py
 *     Renderer and DeviceFeeder, engine/audio/stretch.py, engine/capture/echo.py TalkGuard,
 *     FarEnd, MicClock and EchoCanceller's statistics): tests drive both with the same input. A change there is a
 *     change here, in the same commit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <math.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <portaudio.h>
#include <soxr.h>

/* ------------------------------------------------------------------ constants */
#ifndef NATIVE_SOURCE_SHA
#define NATIVE_SOURCE_SHA ""   /* setup.py defines it: the hash of this file, checked by native.py */
#endif
#define RATE_HZ 24000
#define FADE_FRAMES 120          /* 5 ms fade over gaps (Renderer) */
#define FLUSH_FADE_MS 3          /* the barge-in fade (FlushFade) */
#define FLUSH_FADE_FRAMES 72
#define REF_RUN_TOLERANCE_NS 2000000   /* a reference block due this much off the end of the last begins a new run */
#define LEVEL_WINDOW_FRAMES RATE_HZ          /* renderer.py: a continuous stream's level, its least a second */
#define CONTINUOUS_SLACK_FRAMES 240          /* renderer.py CONTINUOUS_SLACK_FRAMES (10 ms) */
#define CUSHION_MIN_FRAMES 240   /* stretch.py CUSHION_*_MS at 24 kHz: the cushion, 10-60 ms, an insertion per 40 ms */
#define CUSHION_MAX_FRAMES 1440
#define CUSHION_EVERY_FRAMES 960
#define MIN_PERIOD 60            /* stretch.py */
#define MAX_PERIOD 360
#define MATCH 120
#define QUIET_ENERGY (1e4 * MATCH)
#define LOOKAHEAD (2 * MAX_PERIOD + MATCH)
#define EVQ 256                  /* event queue slots */
#define CB_STAMPS 512            /* callback time stamps kept (playback.cadence) */
#define TAP_STAMPS 64            /* LevelTap's stamp slots */
/* soxr's DFT size (log2) for every resampler here. Its default (2^10 and up) hands a stream's output
 * out in blocks of that many frames: 10.8 ms held back on average (20.4 at most) a
 * stage at 48 <-> 24 kHz, and with AEC3's whole blocks the mic's three stages with echo cancellation
 * held it ~50 ms. At 2^8 (the least libsoxr takes) a stage there holds 2.7 ms (4.4 at most: its
 * filter), at 2^9 twice that; the samples are the same (within the dither's 2 LSB), the CPU 1.3-1.6
 * us more a stream a 20 ms chunk (bench/results/2026-12.md, "AEC3 at 32 kHz, and soxr's blocks"). */
#define SOXR_LOG2_DFT 8
#define AEC_RATE_HZ 32000       /* echo.py's AEC_RATE_HZ: the 24 kHz stream's whole band in AEC3's two bands */
#define AEC_BLOCK 320            /* 10 ms at AEC_RATE_HZ */
#define ERLE_WINDOWS 600
#define MAX_GUARD_WINDOW 256     /* far-end history blocks at most (echo.py's GUARD_WINDOW_BLOCKS is 50) */
/* The echo statistics' and the guard's constants are echo.py's own, handed in by name at set-up
 * (``guard`` of Capture, and talk_guard): one source of truth for both implementations. */

#define LEAD_MEAN_WEIGHT 0.01    /* process.py: the device's read-ahead spread */
#define LEAD_PEAK_DECAY 0.995
#define TIMELINE_MIN_BLOCKS 50   /* renderer.py: the device's steady timeline */
#define TIMELINE_MEAN_BLOCKS 100

/* ring.py's int64 slots */
enum {
    S_MAGIC = 0, S_VERSION = 1, S_CAPACITY = 2, S_BPF = 3, S_RATE = 4, S_WIDTH = 5, S_CHANNELS = 6,
    S_W_INDEX = 8, S_OVERRUN = 9, S_WRITES = 10, S_W_NS = 11,
    S_DUE_SEQ = 12, S_DUE_INDEX = 13, S_DUE_NS = 14, S_DUE_RUN = 15,
    S_R_INDEX = 16, S_UNDERRUN = 17, S_READS = 18, S_R_WAITING = 19,
    S_FLUSH_SEQ = 24, S_FLUSH_INDEX = 25, S_END = 26, S_START_INDEX = 27, S_START_NS = 28, S_TARGET = 29,
    S_CONTINUOUS = 30,
    S_FLUSH_ACK = 32, S_HEARD = 33, S_DEV_LATENCY = 34,
};
#define HEADER_BYTES 320
#define RING_MAGIC 0x525452494E473031LL   /* "RTRING01" */
#define LAYOUT_VERSION 2

enum { EV_STARTED = 0, EV_STOPPED = 1, EV_UNDERRUN = 2, EV_FLUSHED = 3 };
static const char *EV_NAMES[] = {"started", "stopped", "underrun", "flushed"};

static inline int64_t ld_acq(int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline int64_t ld_rlx(int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void st_rel(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void st_rlx(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static inline double now_s(void) { return (double)now_ns() / 1e9; }
/* The calling thread's CPU time (the worker's step only: never in a device callback). */
static inline int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
/* Python's floor division for a possibly negative numerator */
static inline int64_t floordiv(int64_t a, int64_t b) { int64_t q = a / b; return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q; }
/* floor(frames * 1e9 / rate_hz), ns, for any frame count: frames * 1e9 itself passes 2^63 after
 * 53 h at 48 kHz (106 h at 24 kHz) */
static inline int64_t frames_at_ns(int64_t frames, int64_t rate_hz) {
    int64_t q = floordiv(frames, rate_hz);
    return q * 1000000000LL + (frames - q * rate_hz) * 1000000000LL / rate_hz;
}

/* ------------------------------------------------------------------ rings (ring.py, version 2) */
typedef struct {
    int64_t *hdr;
    int16_t *data;
    int64_t cap, mask;
    int efd;                 /* the data eventfd (mic ring), -1 when none */
    Py_buffer view;
    int attached;
} ring_t;

/* Attach to a Python Ring's mapping (set-up only; raises on a block that is not an int16 mono ring). */
static int ring_attach(ring_t *r, PyObject *mm, int efd, const char *what) {
    memset(r, 0, sizeof *r);
    r->efd = -1;
    if (PyObject_GetBuffer(mm, &r->view, PyBUF_WRITABLE) < 0)
        return -1;
    r->attached = 1;
    int64_t *hdr = (int64_t *)r->view.buf;
    if (r->view.len < HEADER_BYTES || hdr[S_MAGIC] != RING_MAGIC || hdr[S_VERSION] != LAYOUT_VERSION || hdr[S_WIDTH] != 2 ||
        hdr[S_CHANNELS] != 1 || hdr[S_CAPACITY] <= 0 || (hdr[S_CAPACITY] & (hdr[S_CAPACITY] - 1)) ||
        r->view.len < HEADER_BYTES + 2 * hdr[S_CAPACITY]) {
        PyErr_Format(PyExc_ValueError, "the %s ring is not an int16 mono ring of layout version %d "
                     "(the native backend reads only those)", what, LAYOUT_VERSION);
        PyBuffer_Release(&r->view);
        r->attached = 0;
        return -1;
    }
    r->hdr = hdr;
    r->data = (int16_t *)((char *)r->view.buf + HEADER_BYTES);
    r->cap = hdr[S_CAPACITY];
    r->mask = r->cap - 1;
    r->efd = efd;
    return 0;
}

static void ring_release(ring_t *r) {
    if (r->attached) {
        PyBuffer_Release(&r->view);
        r->attached = 0;
    }
    r->hdr = NULL;
}

static inline int64_t ring_read_index(ring_t *r) { return ld_rlx(&r->hdr[S_R_INDEX]); }
static inline int64_t ring_write_index(ring_t *r) { return ld_acq(&r->hdr[S_W_INDEX]); }
static inline int64_t ring_available(ring_t *r) { return ring_write_index(r) - ring_read_index(r); }

/* Producer: copy what fits, count the rest as overrun; wake a waiting reader. Real-time safe. */
static int64_t ring_write(ring_t *r, const int16_t *src, int64_t n) {
    int64_t *h = r->hdr;
    int64_t w = ld_rlx(&h[S_W_INDEX]);
    int64_t free_frames = r->cap - (w - ld_acq(&h[S_R_INDEX]));
    if (n > free_frames) {
        st_rlx(&h[S_OVERRUN], ld_rlx(&h[S_OVERRUN]) + n - free_frames);
        n = free_frames;
    }
    if (n <= 0)
        return 0;
    int64_t pos = w & r->mask, first = imin(n, r->cap - pos);
    memcpy(r->data + pos, src, (size_t)first * 2);
    if (n > first)
        memcpy(r->data, src + first, (size_t)(n - first) * 2);
    st_rlx(&h[S_W_NS], now_ns());
    st_rel(&h[S_W_INDEX], w + n);          /* the frames are copied before the index says so */
    st_rlx(&h[S_WRITES], ld_rlx(&h[S_WRITES]) + 1);
    if (r->efd >= 0) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* write_index is seen before reader_waiting is read */
        if (ld_rlx(&h[S_R_WAITING])) {
            uint64_t one = 1;
            ssize_t rc = write(r->efd, &one, sizeof one);   /* EAGAIN: the reader is already due to wake */
            (void)rc;
        }
    }
    return n;
}

/* Consumer: copy up to n frames without consuming them. Real-time safe. */
static int64_t ring_peek(ring_t *r, int16_t *out, int64_t n) {
    int64_t rd = ring_read_index(r);
    n = imin(n, ring_write_index(r) - rd);
    if (n <= 0)
        return 0;
    int64_t pos = rd & r->mask, first = imin(n, r->cap - pos);
    memcpy(out, r->data + pos, (size_t)first * 2);
    if (n > first)
        memcpy(out + first, r->data, (size_t)(n - first) * 2);
    return n;
}

static int64_t ring_read(ring_t *r, int16_t *out, int64_t n) {
    n = ring_peek(r, out, n);
    if (n > 0) {
        st_rel(&r->hdr[S_R_INDEX], ring_read_index(r) + n);   /* copied before the slots are given back */
        st_rlx(&r->hdr[S_READS], ld_rlx(&r->hdr[S_READS]) + 1);
    }
    return n;
}

static int64_t ring_skip(ring_t *r, int64_t n) {
    int64_t rd = ring_read_index(r);
    n = imax(0, imin(n, ring_write_index(r) - rd));
    st_rel(&r->hdr[S_R_INDEX], rd + n);
    return n;
}

/* control (PlaybackControl) */
static inline int flush_pending(ring_t *r) { return ld_acq(&r->hdr[S_FLUSH_SEQ]) != ld_rlx(&r->hdr[S_FLUSH_ACK]); }
static inline int64_t flush_index(ring_t *r) { return ld_acq(&r->hdr[S_FLUSH_INDEX]); }
static inline int64_t end_index(ring_t *r) { return ld_acq(&r->hdr[S_END]); }
static inline int64_t heard_index(ring_t *r) { return ld_rlx(&r->hdr[S_HEARD]); }

static void set_heard(ring_t *r, int64_t heard, int64_t latency_frames) {
    st_rlx(&r->hdr[S_HEARD], heard);
    st_rlx(&r->hdr[S_DEV_LATENCY], latency_frames);
}

/* Ring.take_flush: acknowledge a pending flush and drop the frames it covers. */
static int take_flush(ring_t *r) {
    int64_t seq = ld_acq(&r->hdr[S_FLUSH_SEQ]);
    if (seq == ld_rlx(&r->hdr[S_FLUSH_ACK]))
        return 0;
    int64_t until = ld_acq(&r->hdr[S_FLUSH_INDEX]);
    st_rel(&r->hdr[S_FLUSH_ACK], seq);
    int64_t rd = ring_read_index(r);
    if (until > rd)
        ring_skip(r, until - rd);
    return 1;
}

/* control.stream_start_ns: 0 when the producer did not mark ``index`` (index first, then the time
 * the producer stored before it). */
static int64_t stream_start_ns(ring_t *r, int64_t index) {
    if (ld_acq(&r->hdr[S_START_INDEX]) != index)
        return 0;
    int64_t ns = ld_rlx(&r->hdr[S_START_NS]);
    return ns > 0 ? ns : 0;
}

/* ------------------------------------------------------------------ level tap (engine/audio/levels.py) */
/* The writer half of LevelTap, into arrays the Python reader owns: buf (int16), stamps (64 x 2
 * int64: frames written after a push, mono ns) and counts (int64: pushes, written). */
typedef struct {
    int16_t *buf;
    int64_t cap;
    int64_t *stamps;
    int64_t *counts;
    Py_buffer views[3];
    int on;
} tap_t;

static int tap_attach(tap_t *t, PyObject *spec) {
    memset(t, 0, sizeof *t);
    if (spec == NULL || spec == Py_None)
        return 0;
    PyObject *b, *s, *c;
    if (!PyArg_ParseTuple(spec, "OOO", &b, &s, &c))
        return -1;
    PyObject *objs[3] = {b, s, c};
    for (int i = 0; i < 3; i++) {
        if (PyObject_GetBuffer(objs[i], &t->views[i], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            for (int j = 0; j < i; j++)
                PyBuffer_Release(&t->views[j]);
            return -1;
        }
    }
    if (t->views[1].len < TAP_STAMPS * 16 || t->views[2].len < 16 || t->views[0].len < 2) {
        for (int j = 0; j < 3; j++)
            PyBuffer_Release(&t->views[j]);
        PyErr_SetString(PyExc_ValueError, "a level tap needs an int16 buffer, 64x2 int64 stamps and 2 int64 counts");
        return -1;
    }
    t->buf = t->views[0].buf;
    t->cap = t->views[0].len / 2;
    t->stamps = t->views[1].buf;
    t->counts = t->views[2].buf;
    t->on = 1;
    return 0;
}

static void tap_release(tap_t *t) {
    if (t->on)
        for (int j = 0; j < 3; j++)
            PyBuffer_Release(&t->views[j]);
    t->on = 0;
}

/* LevelTap.push. Real-time safe. */
static void tap_push(tap_t *t, const int16_t *pcm, int64_t n) {
    if (!t->on || n <= 0)
        return;
    int64_t written = ld_rlx(&t->counts[1]);
    if (n > t->cap) {
        written += n - t->cap;
        pcm += n - t->cap;
        n = t->cap;
    }
    int64_t pos = written % t->cap, first = imin(n, t->cap - pos);
    memcpy(t->buf + pos, pcm, (size_t)first * 2);
    if (first < n)
        memcpy(t->buf, pcm + first, (size_t)(n - first) * 2);
    written += n;
    st_rlx(&t->counts[1], written);
    int64_t pushes = ld_rlx(&t->counts[0]);
    int64_t slot = pushes % TAP_STAMPS;
    st_rlx(&t->stamps[2 * slot], written);
    st_rlx(&t->stamps[2 * slot + 1], now_ns());
    st_rel(&t->counts[0], pushes + 1);      /* last: the slot is complete before the reader uses it */
}

/* ------------------------------------------------------------------ soxr */
static soxr_t soxr_new(double in_rate, double out_rate) {
    soxr_error_t err = NULL;
    soxr_io_spec_t io = soxr_io_spec(SOXR_INT16_I, SOXR_INT16_I);
    soxr_quality_spec_t q = soxr_quality_spec(SOXR_LQ, 0);   /* devices.RESAMPLE_QUALITY */
    soxr_runtime_spec_t rt = soxr_runtime_spec(1);
    rt.log2_min_dft_size = rt.log2_large_dft_size = SOXR_LOG2_DFT;
    soxr_t s = soxr_create(in_rate, out_rate, 1, &err, &io, &q, &rt);
    if (err != NULL) {
        PyErr_Format(PyExc_RuntimeError, "soxr %g -> %g Hz: %s", in_rate, out_rate, err);
        return NULL;
    }
    return s;
}

/* A chunk through a streaming resampler into out (room for out_cap frames): what soxr hands
 * out now (ResampleStream.resample_chunk). Real-time safe (soxr allocates nothing per call). */
static int64_t soxr_chunk(soxr_t s, const int16_t *in, int64_t n, int16_t *out, int64_t out_cap) {
    size_t idone = 0, odone = 0, total = 0;
    while (n > 0 || total == 0) {
        soxr_process(s, in, (size_t)n, &idone, out + total, (size_t)(out_cap - (int64_t)total), &odone);
        total += odone;
        in += idone;
        n -= (int64_t)idone;
        if (idone == 0 || (int64_t)total >= out_cap)
            break;
    }
    return (int64_t)total;
}

/* ------------------------------------------------------------------ SampleFifo (ring.py) */
typedef struct { int16_t *buf; int64_t cap, len; } fifo_t;

static int fifo_init(fifo_t *f, int64_t cap) {
    f->buf = PyMem_Calloc((size_t)cap, 2);
    f->cap = cap;
    f->len = 0;
    if (!f->buf) { PyErr_NoMemory(); return -1; }
    return 0;
}
static void fifo_free(fifo_t *f) { PyMem_Free(f->buf); f->buf = NULL; }
static int64_t fifo_push(fifo_t *f, const int16_t *pcm, int64_t n) {
    int64_t m = imin(n, f->cap - f->len);
    if (m > 0)
        memcpy(f->buf + f->len, pcm, (size_t)m * 2);
    f->len += imax(m, 0);
    return n - m;
}
static void fifo_drop(fifo_t *f, int64_t n) {
    n = imin(n, f->len);
    if (n <= 0)
        return;
    memmove(f->buf, f->buf + n, (size_t)(f->len - n) * 2);
    f->len -= n;
}

/* ------------------------------------------------------------------ time-stretching (stretch.py) */
typedef struct {
    int16_t history[MAX_PERIOD];
    int64_t history_frames;
    float y[2 * MAX_PERIOD + MATCH];
} stretcher_t;

static void stretch_remember(stretcher_t *s, const int16_t *out, int64_t n) {
    if (n >= MAX_PERIOD) {
        memcpy(s->history, out + n - MAX_PERIOD, MAX_PERIOD * 2);
    } else if (n > 0) {
        memmove(s->history, s->history + n, (size_t)(MAX_PERIOD - n) * 2);
        memcpy(s->history + MAX_PERIOD - n, out, (size_t)n * 2);
    }
    s->history_frames = imin(MAX_PERIOD, s->history_frames + n);
}

/* _best_lag: the lag in [lo, hi] where y[at-lag:][:MATCH] best matches y[at:][:MATCH] (ties to the
 * longest); the longest when the segment is too quiet to tell. */
static int64_t best_lag(const float *y, int64_t at, int64_t lo, int64_t hi) {
    const float *seg = y + at;
    double seg_energy = 0;
    for (int i = 0; i < MATCH; i++)
        seg_energy += (double)seg[i] * seg[i];
    if (seg_energy < QUIET_ENERGY)
        return hi;
    const float *span = y + at - hi;
    int64_t best = 0;
    double best_score = -INFINITY;
    double energy = 0;
    for (int i = 0; i < MATCH; i++)
        energy += (double)span[i] * span[i];
    for (int64_t j = 0; j <= hi - lo; j++) {        /* row j: lag hi - j */
        if (j > 0) {
            double a = span[j - 1], b = span[j + MATCH - 1];
            energy += b * b - a * a;
        }
        double cross = 0;
        for (int i = 0; i < MATCH; i++)
            cross += (double)span[j + i] * seg[i];
        double score = cross / sqrt((energy > 1.0 ? energy : 1.0) * seg_energy);
        if (score > best_score) {
            best_score = score;
            best = j;
        }
    }
    return hi - best;
}

static void crossfade(int16_t *out, int64_t t, const int16_t *fading_out, const int16_t *fading_in) {
    float step = (float)(1.0 / (double)t);
    for (int64_t i = 0; i < t; i++) {
        float ramp = (float)i * step;
        float mix = ((float)fading_in[i] - (float)fading_out[i]) * ramp + (float)fading_out[i];
        out[i] = (int16_t)rintf(mix);
    }
}

static int64_t stretch_expand(stretcher_t *s, const int16_t *ahead, int64_t na, int16_t *out, int64_t nout,
                              int64_t max_frames) {
    int64_t hi = imin(imin(MAX_PERIOD, nout), imin(na, s->history_frames));
    if (hi < MIN_PERIOD || na < MATCH)
        return 0;
    float *y = s->y;
    for (int64_t i = 0; i < hi; i++)
        y[i] = s->history[MAX_PERIOD - hi + i];
    for (int64_t i = 0; i < MATCH; i++)
        y[hi + i] = ahead[i];
    int64_t t = best_lag(y, hi, MIN_PERIOD, hi);
    const int16_t *period = s->history + MAX_PERIOD - t;
    crossfade(out, t, ahead, period);
    int64_t written = t, limit = imin(max_frames, nout);
    while (written + t <= limit) {
        memcpy(out + written, period, (size_t)t * 2);
        written += t;
    }
    return written;
}

static int64_t stretch_accelerate(stretcher_t *s, const int16_t *ahead, int64_t na, int16_t *out, int64_t nout,
                                  int64_t max_frames) {
    int64_t hi = imin(imin(MAX_PERIOD, nout), imin(max_frames, floordiv(na - MATCH, 2)));
    if (hi < MIN_PERIOD)
        return 0;
    float *y = s->y;
    for (int64_t i = 0; i < hi + MATCH; i++)
        y[i] = ahead[hi + MATCH - 1 - i];
    int64_t t = best_lag(y, hi, MIN_PERIOD, hi);
    crossfade(out, t, ahead, ahead + t);
    return t;
}

/* ------------------------------------------------------------------ the renderer (playback) */
/* The renderer's state machine: engine/playback/renderer.py's RenderState, RenderEvent and
 * TRANSITIONS, numbered alike (that module's rules 1-6 bind here too). The state changes only in
 * r_go, by a row of R_NEXT; an event the table does not allow changes nothing and is counted. */
enum { R_IDLE = 0, R_PREBUFFERING = 1, R_PLAYING = 2, R_DRY = 3, R_REBUFFERING = 4, R_STATES = 5 };
enum { RE_ARRIVED = 0, RE_PREBUFFERED = 1, RE_RAN_DRY = 2, RE_RETURNED = 3, RE_ENDED = 4, RE_FLUSHED = 5,
       R_EVENTS = 6 };
static const char *R_STATE_NAMES[R_STATES] = {"IDLE", "PREBUFFERING", "PLAYING", "DRY", "REBUFFERING"};
static const char *R_EVENT_NAMES[R_EVENTS] = {"ARRIVED", "PREBUFFERED", "RAN_DRY", "RETURNED", "ENDED", "FLUSHED"};
#define NO_STATE (-1)
static const int8_t R_NEXT[R_STATES][R_EVENTS] = {
    /*                 ARRIVED         PREBUFFERED  RAN_DRY    RETURNED         ENDED      FLUSHED */
    [R_IDLE]        = {R_PREBUFFERING, NO_STATE,    NO_STATE,  NO_STATE,        NO_STATE,  R_IDLE},
    [R_PREBUFFERING]= {NO_STATE,       R_PLAYING,   NO_STATE,  NO_STATE,        NO_STATE,  R_IDLE},
    [R_PLAYING]     = {NO_STATE,       NO_STATE,    R_DRY,     NO_STATE,        R_IDLE,    R_IDLE},
    [R_DRY]         = {NO_STATE,       NO_STATE,    NO_STATE,  R_REBUFFERING,   R_IDLE,    R_IDLE},
    [R_REBUFFERING] = {NO_STATE,       R_PLAYING,   NO_STATE,  NO_STATE,        NO_STATE,  R_IDLE},
};

/* ------------------------------------------------------------------ the device host
 * A device stream is PortAudio's; the speaker's is PulseAudio's own client library instead when
 * the PortAudio device is an ALSA PCM of type "pulse" (the ALSA pulse plugin: the usual default
 * on a desktop, and every virtual device of tools/vaudio.sh), in a build with REALTALK_PULSE
 * (setup.py: where libpulse-dev and libasound2-dev are installed). Through the plugin each period
 * crosses PortAudio's ALSA thread, the plugin's own mainloop thread and two more copies; libpulse
 * hands it to one thread, and the speaker's device threads cost about 45 % less
 * (bench/results/2026-12.md, "late"). The same holds for a mic on a pulse PCM.
 * REALTALK_NATIVE_HOST=portaudio keeps PortAudio for both.
 *
 * A libpulse stream keeps PortAudio's contract, so the callbacks above are the same code:
 *  - the speaker: a block of device frames at a time, with the time until its first frame is
 *    played (the stream's latency: what is written and not yet played) and whether the sink ran
 *    dry since the last block. Its blocks are half a period (PULSE_BLOCKS_PER_PERIOD), and a
 *    write request of more is rendered block by block: the sink asks at each of its render steps
 *    (6.7 ms here), and a whole period would fit only every other step, so a flush waited up to
 *    two steps (13.3 ms) for its fade;
 *  - the mic: the server's pieces gathered into periods of ``frames``, each pushed with when its
 *    first frame was captured: the worker wakes once per period, as with PortAudio.
 * The speaker's buffer follows the machine (modelled on PulseAudio's ALSA sinks' watermark): each
 * time the sink runs dry, the stream's target (tlength) rises PULSE_RAISE_MS, up to
 * PULSE_MAX_RAISE_MS over what it opened with, and after PULSE_CALM_S without running dry it falls
 * back one step. The server gives about half of a target to the sink (ADJUST_LATENCY), so a step
 * rides out a stall about 10 ms longer, and adds about that much to the latency heard: measured
 * by stopping the speaker's process, a 15 ms stall needed a 44 ms target, 25 ms 64 and 35 ms 84;
 * the stream's latency per block (output_latency_ms) read a median 14 ms at the opening 24 ms
 * target, 23 at 44 and 34 at 64.
 * On a virtual machine whose neighbour took 10 % of its time the sink ran dry 35 times in a 2 s
 * reply at the opening target (each a gap the listener heard). The heard position and
 * the echo canceller's reference are dated by the stream's measured latency per block, so they
 * follow. A change is one libpulse call (pa_stream_set_buffer_attr) on the mainloop thread: rare,
 * never per period.
 * The mic's capture times come from a frame clock, not from the record stream's latency: read
 * when a piece came, that latency scattered over 33 ms against clicks played on the speaker
 * (PortAudio's ADC times over 19 ms), and the echo canceller's reference went off its echo (ERLE's
 * 10th percentile 19.8 dB against 54.6). Every frame readable at an instant was captured by then,
 * so ``now - frames_so_far / rate`` bounds the time of the stream's first frame from above at each
 * read; the clock is the lowest bound seen (reached whenever a piece comes at once), allowed to
 * rise PULSE_CLOCK_LEAK_PPM (a device slower than its rate) and set afresh after the server dropped
 * frames (the count no longer matches the time). A period's first frame k was captured at
 * ``first + k / rate``. A backlog handed over at once when the stream connects (PulseAudio's null
 * source: over a second) is dated by upper bounds only until it is read: late, and ~2 ms apart.
 * Rule 1 holds: the mainloop thread is the callback thread; it takes no GIL and allocates nothing
 * (the mic's period buffer is allocated at open) but the buffer's retargeting, rule 1's exception. */
typedef void (*host_play_fn)(void *user, int16_t *out, int64_t frames, double latency_s, int underflow);
/* The mic's: ``frames`` device frames, the first captured at ``adc_ns`` (CLOCK_MONOTONIC); the
 * server dropped frames before them (``overflow``). */
typedef void (*host_rec_fn)(void *user, const int16_t *in, int64_t frames, int64_t adc_ns, int overflow);

#ifdef REALTALK_PULSE
#include <alsa/asoundlib.h>
#include <pulse/pulseaudio.h>

#define PULSE_SINK_LATENCY_MS 7   /* about PulseAudio's own floor for a sink (6.67 ms here), as the plugin got */
#define PULSE_BLOCKS_PER_PERIOD 2 /* a write request's unit: half a period (see above) */
#define PULSE_CLOCK_LEAK_PPM 200  /* how fast the mic's frame clock may rise between low readings (see above) */
#define PULSE_RAISE_MS 20         /* the speaker's target rises this much each time the sink runs dry (see above) */
#define PULSE_MAX_RAISE_MS 100    /* ...up to this much over what it opened with */
#define PULSE_CALM_S 30           /* ...and falls one step after this long without running dry */

typedef struct {
    pa_threaded_mainloop *ml;
    pa_context *ctx;
    pa_stream *s;
    double rate;
    int64_t frames;                /* device frames per block (speaker: PULSE_BLOCKS_PER_PERIOD a period) or period (mic) */
    host_play_fn play;             /* the speaker's (NULL: a mic, whose ``rec`` is set) */
    host_rec_fn rec;
    void *user;
    int underflow;                 /* the sink ran dry since the last block (the mainloop thread's) */
    /* the speaker's buffer (see above; the mainloop thread writes, Python reads relaxed) */
    pa_buffer_attr attr;           /* as last asked for */
    uint32_t base_tlength, max_tlength, step_bytes;
    int64_t buffer_bytes;          /* attr.tlength */
    int64_t buffer_raises, buffer_lowers;
    int64_t changed_ns;            /* the last rise or fall, or when the sink last ran dry */
    /* the mic (the mainloop thread's) */
    int overflow;                  /* the server dropped mic frames since the last period */
    int clock_reset;               /* ...and the frame clock has not been set afresh since */
    int16_t *period;               /* the period being gathered, and how much of it is */
    int64_t period_fill;
    int64_t frames_in;             /* frames taken from the stream so far (holes included) */
    double first_ns;               /* the frame clock: when the stream's first frame was captured */
    int64_t clock_ns;              /* when it was last read (0: never) */
} pulse_t;

/* The pulse device behind an ALSA PCM name: 1 and its device name in ``out`` ("" for the server's
 * default) if ``name`` is defined as ``type pulse``; 0 if not (PortAudio opens it). */
static int alsa_pulse_device(const char *name, char *out, size_t cap) {
    snd_config_t *conf = NULL, *node;
    const char *type = NULL, *dev = NULL;
    if (!name || snd_config_update() < 0 || snd_config_search_definition(snd_config, "pcm", name, &conf) < 0)
        return 0;
    int ok = snd_config_search(conf, "type", &node) == 0 && snd_config_get_string(node, &type) == 0 &&
             strcmp(type, "pulse") == 0;
    if (ok) {
        out[0] = '\0';
        if (snd_config_search(conf, "device", &node) == 0 && snd_config_get_string(node, &dev) == 0 && dev)
            snprintf(out, cap, "%s", dev);
    }
    snd_config_delete(conf);
    return ok;
}

static double pu_latency_s(pa_stream *s) {
    pa_usec_t usec = 0;
    int negative = 0;
    if (pa_stream_get_latency(s, &usec, &negative) < 0)
        return -1.0;   /* no timing information yet: the caller's fallback */
    return negative ? 0.0 : (double)usec / 1e6;
}

static void pu_retarget(pulse_t *p, int steps);

static void pu_write(pa_stream *s, size_t nbytes, void *user) {
    pulse_t *p = user;
    size_t want = (size_t)p->frames * 2;
    if (p->attr.tlength > p->base_tlength) {
        int64_t now = now_ns();
        if (now - p->changed_ns > (int64_t)PULSE_CALM_S * 1000000000LL) {
            pu_retarget(p, -1);
            p->changed_ns = now;
        }
    }
    while (nbytes >= want) {
        void *buf = NULL;
        size_t n = want;
        if (pa_stream_begin_write(s, &buf, &n) < 0 || !buf || n < want) {
            if (buf)
                pa_stream_cancel_write(s);
            return;
        }
        int under = p->underflow;
        p->underflow = 0;
        p->play(p->user, buf, p->frames, pu_latency_s(s), under);
        if (pa_stream_write(s, buf, want, NULL, 0, PA_SEEK_RELATIVE) < 0)
            return;
        nbytes -= want;
    }
}

/* Ask for the speaker's buffer ``steps`` steps over or under the current one, within its bounds. */
static void pu_retarget(pulse_t *p, int steps) {
    int64_t t = (int64_t)p->attr.tlength + (int64_t)steps * p->step_bytes;
    t = t < p->base_tlength ? p->base_tlength : t > p->max_tlength ? p->max_tlength : t;
    if (t == (int64_t)p->attr.tlength)
        return;
    uint32_t was = p->attr.tlength;
    p->attr.tlength = (uint32_t)t;
    pa_operation *op = pa_stream_set_buffer_attr(p->s, &p->attr, NULL, NULL);
    if (!op) {   /* not sent: nothing changed (the next underflow or calm spell asks again) */
        p->attr.tlength = was;
        return;
    }
    pa_operation_unref(op);
    st_rlx(&p->buffer_bytes, t);
    if (steps > 0)
        st_rlx(&p->buffer_raises, p->buffer_raises + 1);
    else
        st_rlx(&p->buffer_lowers, p->buffer_lowers + 1);
}

static void pu_underflow(pa_stream *s, void *user) {
    pulse_t *p = user;
    p->underflow = 1;
    pu_retarget(p, 1);
    p->changed_ns = now_ns();
}

static void pu_overflow(pa_stream *s, void *user) {
    pulse_t *p = user;
    p->overflow = 1;
    p->clock_reset = 1;
}

/* The mic's frame clock, read as ``readable`` frames wait (see the rules above). */
static void pu_clock(pulse_t *p, int64_t readable) {
    int64_t now = now_ns();
    double bound = (double)now - (double)(p->frames_in + readable) * 1e9 / p->rate;
    if (p->clock_ns == 0 || p->clock_reset) {
        p->first_ns = bound;
        p->clock_reset = 0;
    } else {
        double risen = p->first_ns + (double)(now - p->clock_ns) * (PULSE_CLOCK_LEAK_PPM / 1e6);
        p->first_ns = bound < risen ? bound : risen;
    }
    p->clock_ns = now;
}

/* The mic: what the server pushed, a period at a time once a whole one is readable (the server
 * sends what the source posts, in pieces of a few ms: a call per piece would cost a peek and a
 * drop each); the frame clock read at each call. */
static void pu_read(pa_stream *s, size_t nbytes, void *user) {
    pulse_t *p = user;
    size_t ready = pa_stream_readable_size(s);
    if (ready == (size_t)-1)
        return;
    pu_clock(p, (int64_t)(ready / 2));
    if ((int64_t)ready < (p->frames - p->period_fill) * 2)
        return;
    for (;;) {
        const void *data = NULL;
        size_t n = 0;
        if (pa_stream_peek(s, &data, &n) < 0 || n == 0)
            return;
        int64_t frames = (int64_t)(n / 2), done = 0;
        while (done < frames) {
            int64_t take = imin(frames - done, p->frames - p->period_fill);
            if (data)
                memcpy(p->period + p->period_fill, (const int16_t *)data + done, (size_t)take * 2);
            else   /* a hole in the record stream: silence */
                memset(p->period + p->period_fill, 0, (size_t)take * 2);
            p->period_fill += take;
            done += take;
            if (p->period_fill == p->frames) {
                int64_t first = p->frames_in + done - p->frames;
                int over = p->overflow;
                p->overflow = 0;
                p->rec(p->user, p->period, p->frames, (int64_t)(p->first_ns + (double)first * 1e9 / p->rate), over);
                p->period_fill = 0;
            }
        }
        p->frames_in += frames;
        pa_stream_drop(s);
    }
}

static void pu_signal(pa_context *c, void *user) {
    pa_threaded_mainloop_signal(user, 0);
}

static void pu_stream_signal(pa_stream *s, void *user) {
    pa_threaded_mainloop_signal(((pulse_t *)user)->ml, 0);
}

static void pu_free(pulse_t *p) {
    if (!p)
        return;
    if (p->ml)
        pa_threaded_mainloop_stop(p->ml);   /* no callback runs after this */
    if (p->s) {
        pa_stream_disconnect(p->s);
        pa_stream_unref(p->s);
    }
    if (p->ctx) {
        pa_context_disconnect(p->ctx);
        pa_context_unref(p->ctx);
    }
    if (p->ml)
        pa_threaded_mainloop_free(p->ml);
    free(p->period);
    free(p);
}

/* Open and start a libpulse stream of one int16 channel on ``device`` ("" the default): playback
 * with ``play`` (at least ``latency_s`` buffered), else record with ``rec``; NULL with ``err``
 * filled on a failure. Called without the GIL. */
static pulse_t *pu_open(const char *device, double rate, int64_t frames, double latency_s,
                        host_play_fn play, host_rec_fn rec, void *user, char *err, size_t errcap) {
    int output = play != NULL;
    pulse_t *p = calloc(1, sizeof *p);
    if (!p || (!output && !(p->period = calloc((size_t)frames, 2)))) {
        free(p);
        snprintf(err, errcap, "out of memory");
        return NULL;
    }
    p->rate = rate;
    /* the speaker's block: 441 frames at 44.1 kHz make 221 */
    p->frames = output ? (frames + PULSE_BLOCKS_PER_PERIOD - 1) / PULSE_BLOCKS_PER_PERIOD : frames;
    p->play = play;
    p->rec = rec;
    p->user = user;
    if (!(p->ml = pa_threaded_mainloop_new()) ||
        !(p->ctx = pa_context_new(pa_threaded_mainloop_get_api(p->ml), output ? "realtalk speaker" : "realtalk mic"))) {
        snprintf(err, errcap, "cannot make a PulseAudio client");
        pu_free(p);
        return NULL;
    }
    pa_context_set_state_callback(p->ctx, pu_signal, p->ml);
    pa_threaded_mainloop_lock(p->ml);
    int ok = pa_threaded_mainloop_start(p->ml) == 0 && pa_context_connect(p->ctx, NULL, PA_CONTEXT_NOFLAGS, NULL) == 0;
    pa_context_state_t cs;
    while (ok && (cs = pa_context_get_state(p->ctx)) != PA_CONTEXT_READY) {
        if (!PA_CONTEXT_IS_GOOD(cs)) {
            ok = 0;
            break;
        }
        pa_threaded_mainloop_wait(p->ml);
    }
    if (!ok) {
        snprintf(err, errcap, "cannot reach the PulseAudio server: %s", pa_strerror(pa_context_errno(p->ctx)));
        pa_threaded_mainloop_unlock(p->ml);
        pu_free(p);
        return NULL;
    }
    pa_sample_spec spec = {PA_SAMPLE_S16LE, (uint32_t)rate, 1};
    p->s = pa_stream_new(p->ctx, output ? "speaker" : "mic", &spec, NULL);
    if (!p->s) {
        snprintf(err, errcap, "cannot make a PulseAudio stream: %s", pa_strerror(pa_context_errno(p->ctx)));
        pa_threaded_mainloop_unlock(p->ml);
        pu_free(p);
        return NULL;
    }
    pa_stream_set_state_callback(p->s, pu_stream_signal, p);
    uint32_t block_bytes = (uint32_t)(p->frames * 2);
    pa_buffer_attr attr;
    memset(&attr, 0xff, sizeof attr);   /* (uint32_t)-1: the server's choice */
    const char *dev = device[0] ? device : NULL;
    pa_stream_flags_t flags = PA_STREAM_ADJUST_LATENCY | PA_STREAM_INTERPOLATE_TIMING | PA_STREAM_AUTO_TIMING_UPDATE;
    int rc;
    if (output) {
        /* the target: a request per block, two blocks buffered ahead of the sink, and the sink itself
         * PULSE_SINK_LATENCY_MS behind (with ADJUST_LATENCY the server gives the sink half of what the
         * target leaves over two requests); at least what PortAudio would ask of the plugin. A target
         * of only two requests set the sink to 0.5 ms: the server then woke every 0.5 ms, and its
         * monitors posted pieces of ~11 frames, 2,600 a second to each reader. */
        uint32_t target = (uint32_t)(latency_s * rate) * 2;
        uint32_t least = 2 * block_bytes + 2 * (uint32_t)(rate * PULSE_SINK_LATENCY_MS / 1000) * 2;
        attr.tlength = target > least ? target : least;
        attr.minreq = block_bytes;
        attr.prebuf = PULSE_BLOCKS_PER_PERIOD * block_bytes;   /* a period: with a block, the sink ran dry once at the start */
        p->attr = attr;
        p->base_tlength = attr.tlength;
        p->step_bytes = (uint32_t)(rate * PULSE_RAISE_MS / 1000) * 2;
        p->max_tlength = attr.tlength + (uint32_t)(rate * PULSE_MAX_RAISE_MS / 1000) * 2;
        p->buffer_bytes = attr.tlength;
        p->changed_ns = now_ns();
        pa_stream_set_write_callback(p->s, pu_write, p);
        pa_stream_set_underflow_callback(p->s, pu_underflow, p);
        rc = pa_stream_connect_playback(p->s, dev, &attr, flags, NULL, NULL);
    } else {   /* the server sends a period's fragment at a time at most */
        attr.fragsize = block_bytes;
        pa_stream_set_read_callback(p->s, pu_read, p);
        pa_stream_set_overflow_callback(p->s, pu_overflow, p);
        rc = pa_stream_connect_record(p->s, dev, &attr, flags);
    }
    pa_stream_state_t ss = PA_STREAM_UNCONNECTED;
    while (rc == 0 && (ss = pa_stream_get_state(p->s)) != PA_STREAM_READY) {
        if (!PA_STREAM_IS_GOOD(ss)) {
            rc = -1;
            break;
        }
        pa_threaded_mainloop_wait(p->ml);
    }
    if (rc != 0) {
        snprintf(err, errcap, "PulseAudio %s %s: %s", output ? "sink" : "source", dev ? dev : "(the default)",
                 pa_strerror(pa_context_errno(p->ctx)));
        pa_threaded_mainloop_unlock(p->ml);
        pu_free(p);
        return NULL;
    }
    pa_threaded_mainloop_unlock(p->ml);
    return p;
}

/* The stream's latency as the server set it up, s: the playback's target, the record's fragment. */
static double pu_stream_latency_s(pulse_t *p, double rate) {
    pa_threaded_mainloop_lock(p->ml);
    const pa_buffer_attr *a = pa_stream_get_buffer_attr(p->s);
    double lat = a ? (double)(p->play ? a->tlength : a->fragsize) / 2.0 / rate : 0.0;
    pa_threaded_mainloop_unlock(p->ml);
    return lat;
}

static int pu_is_active(pulse_t *p) {
    pa_threaded_mainloop_lock(p->ml);
    int ok = pa_context_get_state(p->ctx) == PA_CONTEXT_READY && pa_stream_get_state(p->s) == PA_STREAM_READY;
    pa_threaded_mainloop_unlock(p->ml);
    return ok;
}
#else
typedef struct pulse_t pulse_t;
#endif

/* Which host opens a device: 1 (libpulse: a pulse PCM, its device name in ``out``) or 0 (PortAudio). */
static int host_is_pulse(const char *portaudio_name, char *out, size_t cap) {
#ifdef REALTALK_PULSE
    const char *want = getenv("REALTALK_NATIVE_HOST");
    if (want && strcmp(want, "portaudio") == 0)
        return 0;
    return alsa_pulse_device(portaudio_name, out, cap);
#else
    return 0;
#endif
}

/* A device stream: PortAudio's or libpulse's (one of the two is set while it is open). */
typedef struct {
    PaStream *pa;
    pulse_t *pulse;
} host_t;

/* End a stream opened by host_open, if open: stopped (what was handed to the device plays out)
 * or, with ``abort``, at once (its object is going); no callback runs when this returns. */
static void host_end(host_t *h, int abort) {
#ifdef REALTALK_PULSE
    if (h->pulse) {
        pulse_t *p = h->pulse;
        h->pulse = NULL;
        Py_BEGIN_ALLOW_THREADS
        pu_free(p);
        Py_END_ALLOW_THREADS
    }
#endif
    if (h->pa) {
        PaStream *s = h->pa;
        h->pa = NULL;
        Py_BEGIN_ALLOW_THREADS
        if (abort)
            Pa_AbortStream(s);
        else
            Pa_StopStream(s);
        Pa_CloseStream(s);
        Py_END_ALLOW_THREADS
        Pa_Terminate();
    }
}

static int host_is_active(host_t *h) {
#ifdef REALTALK_PULSE
    if (h->pulse)
        return pu_is_active(h->pulse);
#endif
    return h->pa && Pa_IsStreamActive(h->pa) == 1;
}

static const char *host_name(host_t *h) {
    return h->pulse ? "pulse" : h->pa ? "portaudio" : "";
}

/* The libpulse speaker's buffer (see "the device host"): (ms asked for, rises, falls), or None
 * for another host, a mic, or a closed stream. Python's side: relaxed loads of the mainloop
 * thread's fields. */
static PyObject *host_buffer(host_t *h) {
#ifdef REALTALK_PULSE
    pulse_t *p = h->pulse;
    if (p && p->play)
        return Py_BuildValue("(dLL)", (double)ld_rlx(&p->buffer_bytes) / 2.0 / p->rate * 1000.0,
                             (long long)ld_rlx(&p->buffer_raises), (long long)ld_rlx(&p->buffer_lowers));
#endif
    Py_RETURN_NONE;
}

typedef struct {
    int64_t kind, index, start_index, stretch_frames, expanded_frames, device_underflows;
} event_t;

typedef struct {
    PyObject_HEAD
    ring_t ring, ref, listen;
    int has_ref, has_listen;
    int64_t listen_on;           /* written by Python, read by the callback */
    int fade_on_flush;
    int stretch;
    stretcher_t st;
    int16_t ahead[LOOKAHEAD];
    int64_t low_water_frames, stretch_frames, stream_expanded_frames, expanded_frames, accelerated_frames;
    int64_t cushion_left_frames, cushion_frames, since_cushion_frames;   /* Renderer's cushion */
    int64_t level_low_frames, level_floor_frames, level_seen_frames;     /* a continuous stream's level */
    int64_t prebuffer_frames, base_prebuffer_frames, max_prebuffer_frames;
    /* the jitter buffer (Renderer._retarget): growth after underruns, what the latest stream
     * started with, the latest block's length */
    int64_t growth_frames, start_delay_frames, start_device_lead_frames, render_frames;
    /* the device's read-ahead spread (Renderer._measure_lead) */
    int64_t device_lead_frames, handed_frames;
    double lead_mean_frames, lead_up_frames, lead_down_frames;
    double timeline_mean_frames, timeline_now;   /* and its steady timeline */
    int64_t timeline_blocks;
    int64_t stream_underruns, dry_index, dry_frames;
    int64_t state;               /* R_IDLE...: written by r_go only */
    int64_t transition_errors;   /* events R_NEXT did not allow (0 expected) */
    int64_t stream_start;
    double waiting_since;
    float flush_ramp[FLUSH_FADE_FRAMES], fade_down[FADE_FRAMES], fade_up[FADE_FRAMES];
    event_t ev[EVQ];
    int64_t ev_head, ev_tail, ev_dropped;   /* head: the producer's, tail: Python's */
    int wake_fd;
    int64_t wake_errors;
    int64_t stream_device_underflows, backlog_frames;
    int64_t fill_rendered_frames, fill_handed_device_frames;   /* DeviceFeeder: 24 kHz frames rendered, device frames handed out (since a flush) */
    int64_t first_sample_mono_ns, arrived_mono_ns, flush_mono_ns;
    int64_t ref_next_due_ns, ref_run_index;   /* the reference's due stamps (Renderer._stamp_ref) */
    tap_t tap;
    /* the device side (DeviceFeeder) */
    int64_t device_rate_hz, block_frames, device_block;
    soxr_t resampler;
    int16_t *block;
    int16_t *rs_out;
    int64_t rs_cap;
    fifo_t fifo;
    float *device_ramp;
    int64_t device_ramp_frames;
    /* the stream */
    host_t host;
    int64_t callbacks, device_underflows;
    int64_t callback_ns[CB_STAMPS];
    double stream_latency_s;
    int running;
} Renderer;

static void r_wake(Renderer *r) {
    if (r->wake_fd >= 0) {
        uint64_t one = 1;
        if (write(r->wake_fd, &one, sizeof one) < 0)
            st_rlx(&r->wake_errors, r->wake_errors + 1);
    }
}

static void r_emit(Renderer *r, int kind, int64_t index) {
    int64_t head = ld_rlx(&r->ev_head);
    if (head - ld_acq(&r->ev_tail) >= EVQ) {
        st_rlx(&r->ev_dropped, r->ev_dropped + 1);
    } else {
        event_t *e = &r->ev[head % EVQ];
        e->kind = kind;
        e->index = index;
        e->start_index = r->stream_start;
        e->stretch_frames = r->stretch_frames;
        e->expanded_frames = r->stream_expanded_frames;
        e->device_underflows = r->stream_device_underflows;
        st_rel(&r->ev_head, head + 1);
    }
    r_wake(r);
}

/* Take event's transition from the current state: the one writer of state (rule 1). */
static void r_go(Renderer *r, int event) {
    int next = R_NEXT[r->state][event];
    if (next == NO_STATE)
        st_rlx(&r->transition_errors, r->transition_errors + 1);
    else
        st_rlx(&r->state, next);
}

/* A stream is on: playing, or waiting out a gap in it (rule 4). */
static inline int r_in_stream(Renderer *r) {
    int64_t s = ld_rlx(&r->state);
    return s == R_PLAYING || s == R_DRY || s == R_REBUFFERING;
}

static int stream_complete(Renderer *r) {
    int64_t end = end_index(&r->ring);
    return end > r->stream_start && end >= ring_write_index(&r->ring);
}

static int at_stream_end(Renderer *r) {
    return stream_complete(r) && ring_read_index(&r->ring) >= end_index(&r->ring);
}

/* Renderer._retarget: the prebuffer in effect, the ring's jitter-buffer target (ring.py's
 * target_frames contract) plus the device's read-ahead spread, else the configured prebuffer,
 * plus the growth after underruns, capped; the stretcher's low water, half the headroom. */
static void r_retarget(Renderer *r) {
    int64_t target = ld_rlx(&r->ring.hdr[S_TARGET]);
    int64_t lead = target > 0 ? r->device_lead_frames : 0;
    int64_t p = imin(r->max_prebuffer_frames, (target > 0 ? target + lead : r->base_prebuffer_frames) + r->growth_frames);
    st_rlx(&r->prebuffer_frames, p);
    st_rlx(&r->low_water_frames, floordiv(imax(0, p - r->render_frames - lead), 2));
}

/* Renderer._measure_lead: the device's read-ahead spread, from this block's handoff (the frames
 * handed to the device before it) against now; Python's float arithmetic, in the same order. */
static void r_measure_lead(Renderer *r, int64_t n, double now) {
    double lead = (double)(r->handed_frames - r->backlog_frames) - now * RATE_HZ;
    double d = lead - r->lead_mean_frames;
    if (r->handed_frames == 0 || fabs(d) > (double)(4 * n)) {   /* the first block, or a step */
        r->lead_mean_frames = lead;
        r->lead_up_frames = r->lead_down_frames = 0.0;
        d = 0.0;
    }
    r->lead_mean_frames += d * LEAD_MEAN_WEIGHT;
    double up = r->lead_up_frames * LEAD_PEAK_DECAY, down = r->lead_down_frames * LEAD_PEAK_DECAY;
    r->lead_up_frames = up > d ? up : d;            /* max(d, up): Python's max keeps the first on a tie */
    r->lead_down_frames = down > -d ? down : -d;
    st_rlx(&r->device_lead_frames, imin(n, (int64_t)nearbyint(r->lead_up_frames + r->lead_down_frames)));
    /* the steady timeline: this block's handoff as the device takes it (the mean lead's); a step of
     * more than a block, or the device running dry (pb_period), starts it afresh, and until it is
     * known the callback's time stands */
    double t = lead - r->timeline_mean_frames;
    if (r->timeline_blocks == 0 || fabs(t) > (double)n) {
        r->timeline_mean_frames = lead;
        r->timeline_blocks = 0;
        t = 0.0;
    }
    r->timeline_blocks += 1;
    r->timeline_mean_frames += t / (double)imin(r->timeline_blocks, TIMELINE_MEAN_BLOCKS);
    r->timeline_now = r->timeline_blocks >= TIMELINE_MIN_BLOCKS
                          ? now + (lead - r->timeline_mean_frames) / RATE_HZ : now;
    r->handed_frames += n;
}

/* Renderer._stream_ended: PLAYING or DRY at the stream's end mark: report, give growth back, IDLE. */
static void stream_ended(Renderer *r) {
    r->dry_frames = 0;
    r_emit(r, EV_STOPPED, ring_read_index(&r->ring));
    if (r->stream_underruns == 0) {   /* a clean stream: give back half of what underruns added */
        int64_t extra = r->growth_frames;
        st_rlx(&r->growth_frames, r->growth_frames - (extra > RATE_HZ / 100 ? floordiv(extra, 2) : extra));
        r_retarget(r);
    }
    r->stream_underruns = 0;
    r_go(r, RE_ENDED);
}

/* FlushFade.apply: fade buf[:valid] from its start, silence the rest; frames still sounding. */
static int64_t flush_fade(const float *ramp, int64_t ramp_frames, int16_t *buf, int64_t n, int64_t valid) {
    int64_t k = imin(imin(valid, n), ramp_frames);
    for (int64_t i = 0; i < k; i++)
        buf[i] = (int16_t)((float)buf[i] * ramp[i]);
    k = imax(k, 0);
    if (n > k)
        memset(buf + k, 0, (size_t)(n - k) * 2);
    return k;
}

static int64_t r_stretch(Renderer *r, int16_t *out, int64_t n) {
    ring_t *ring = &r->ring;
    int64_t level = ring_available(ring) - n;
    int low = level < r->low_water_frames;
    int cushion = r->cushion_left_frames > 0 && r->since_cushion_frames >= CUSHION_EVERY_FRAMES;
    int expand = low || cushion;
    int64_t extra = r->stretch_frames - r->cushion_frames;
    int64_t keep = r->prebuffer_frames - n + r->cushion_frames;   /* the level the stretcher keeps */
    if (ld_rlx(&ring->hdr[S_CONTINUOUS])) {   /* its least level of the last window above that is latency too */
        int64_t least = r->level_low_frames;
        r->level_low_frames = least < 0 ? level : imin(least, level);
        r->level_seen_frames += n;
        if (r->level_seen_frames >= LEVEL_WINDOW_FRAMES) {
            r->level_floor_frames = r->level_low_frames;
            r->level_low_frames = -1;
            r->level_seen_frames = 0;
        }
        if (r->level_floor_frames >= 0)
            extra = imax(extra, r->level_floor_frames - keep - CONTINUOUS_SLACK_FRAMES);
    }
    int accelerate = extra >= MIN_PERIOD && level - imin(MAX_PERIOD, extra) >= keep;
    if (!(expand || accelerate) || stream_complete(r))
        return 0;
    int64_t na = ring_peek(ring, r->ahead, LOOKAHEAD);
    if (expand) {
        int urgent = level < floordiv(r->low_water_frames, 2);
        int64_t t = stretch_expand(&r->st, r->ahead, na, out, n,
                                   low ? (urgent ? 3 * n / 4 : n / 2) : imin(r->cushion_left_frames, n / 2));
        if (!low && t) {
            r->cushion_left_frames = imax(0, r->cushion_left_frames - t);
            r->cushion_frames += t;
            r->since_cushion_frames = 0;
        }
        r->stretch_frames += t;
        r->stream_expanded_frames += t;
        st_rlx(&r->expanded_frames, r->expanded_frames + t);
        return t;
    }
    int64_t t = stretch_accelerate(&r->st, r->ahead, na, out, n, extra);
    ring_skip(ring, 2 * t);
    r->stretch_frames -= imin(t, imax(0, r->stretch_frames - r->cushion_frames));   /* its own stretch first */
    if (r->level_floor_frames >= 0)
        r->level_floor_frames = imax(0, r->level_floor_frames - t);
    st_rlx(&r->accelerated_frames, r->accelerated_frames + t);
    return t;
}

/* Renderer._played: got of out's n frames were filled. */
static void r_played(Renderer *r, int16_t *out, int64_t n, int64_t got, int64_t heard_base, int64_t latency,
                     int fade_in) {
    ring_t *ring = &r->ring;
    if (fade_in && got > 0) {
        int64_t k = imin(got, FADE_FRAMES);
        for (int64_t i = 0; i < k; i++)
            out[i] = (int16_t)((float)out[i] * r->fade_up[i]);
    }
    r->since_cushion_frames += got;
    if (got < n) {
        memset(out + got, 0, (size_t)(n - got) * 2);
        if (got > 0) {
            int64_t k = imin(got, FADE_FRAMES);
            for (int64_t i = 0; i < k; i++)
                out[got - k + i] = (int16_t)((float)out[got - k + i] * r->fade_down[FADE_FRAMES - k + i]);
        }
        if (at_stream_end(r)) {
            stream_ended(r);
        } else {   /* dry mid-stream: an underrun if more of it comes, its end if the end mark comes first */
            r->dry_index = ring_read_index(ring);
            r->dry_frames = n - got;
            r_go(r, RE_RAN_DRY);
        }
    } else {
        stretch_remember(&r->st, out, n);
    }
    set_heard(ring, imax(heard_index(ring), heard_base - latency), latency);
}

/* Renderer._play: PLAYING: lead frames of silence, then the stream (stretched unless it starts
 * here or fades in after a gap). */
static void r_play(Renderer *r, int16_t *out, int64_t n, int64_t lead, int64_t heard_base, int64_t latency,
                   int fade_in) {
    ring_t *ring = &r->ring;
    if (lead) {
        memset(out, 0, (size_t)lead * 2);
        int64_t got = ring_read(ring, out + lead, n - lead);
        r_played(r, out + lead, n - lead, got, heard_base, latency, fade_in);
        return;
    }
    int64_t got = (r->stretch && !fade_in) ? r_stretch(r, out, n) : 0;
    got += ring_read(ring, out + got, n - got);
    r_played(r, out, n, got, heard_base, latency, fade_in);
}

/* Renderer._flush: a pending flush, from any state (rule 3): fade out what plays, drop the rest. */
static void r_flush(Renderer *r, int16_t *out, int64_t n, int64_t heard_base, int64_t latency) {
    ring_t *ring = &r->ring;
    int64_t got = 0;
    if (r->state == R_PLAYING) {
        int64_t want = imin(imin(r->fade_on_flush ? FLUSH_FADE_FRAMES : n, n),
                            imax(0, flush_index(ring) - ring_read_index(ring)));
        got = ring_read(ring, out, want);
    }
    if (r->fade_on_flush)
        flush_fade(r->flush_ramp, FLUSH_FADE_FRAMES, out, n, got);
    else if (n > got)
        memset(out + got, 0, (size_t)(n - got) * 2);
    int64_t played_index = heard_base + imin(FLUSH_FADE_FRAMES, r->backlog_frames + got);
    take_flush(ring);
    st_rlx(&r->flush_mono_ns, (int64_t)(r->timeline_now * 1e9));   /* this block's first frame, on the steady timeline */
    if (r->state == R_IDLE) {   /* nothing playing or waiting: the flush cut nothing */
        r->stream_start = played_index;
        r->stretch_frames = r->stream_expanded_frames = r->stream_device_underflows = 0;
    }
    r_emit(r, EV_FLUSHED, played_index);
    r->dry_frames = 0;
    r_go(r, RE_FLUSHED);
    set_heard(ring, played_index, latency);
}

/* Renderer._arrive: IDLE or DRY. Silence while the ring is empty (DRY: the gap grows, or the
 * stream ends when its end mark came late); returns 1 when frames are there and the wait for the
 * prebuffer begins (a new stream, or an underrun after a gap). */
static int r_arrive(Renderer *r, int16_t *out, int64_t n, int64_t heard_base, int64_t latency, double now) {
    ring_t *ring = &r->ring;
    if (ring_available(ring) == 0) {
        memset(out, 0, (size_t)n * 2);
        if (r->state == R_DRY) {
            if (at_stream_end(r))
                stream_ended(r);   /* it ran dry at its very end: the end mark came late */
            else
                r->dry_frames += n;
        }
        if (r->state == R_IDLE)
            set_heard(ring, heard_base, latency);
        return 0;
    }
    if (r->state == R_DRY) {   /* audio came back after running dry: an underrun */
        r->stream_underruns += 1;
        st_rlx(&ring->hdr[S_UNDERRUN], ld_rlx(&ring->hdr[S_UNDERRUN]) + r->dry_frames);
        r_emit(r, EV_UNDERRUN, r->dry_index);
        st_rlx(&r->growth_frames, imin(r->max_prebuffer_frames, r->growth_frames + RATE_HZ / 50));
        r_retarget(r);
        r->dry_frames = 0;
        r->waiting_since = r->timeline_now;
        r_go(r, RE_RETURNED);
    } else {
        r->stream_start = ring_read_index(ring);
        int64_t start_ns = stream_start_ns(ring, r->stream_start);
        double since = (double)(start_ns ? start_ns : ld_rlx(&ring->hdr[S_W_NS])) / 1e9;
        r->waiting_since = now < since ? now : since;
        r_go(r, RE_ARRIVED);
    }
    return 1;
}

/* Renderer._wait_prebuffer: PREBUFFERING or REBUFFERING: silence until the prebuffer has passed,
 * on the device's steady timeline. */
static void r_wait_prebuffer(Renderer *r, int16_t *out, int64_t n, int64_t heard_base, int64_t latency) {
    ring_t *ring = &r->ring;
    double now = r->timeline_now;
    int rebuffering = r->state == R_REBUFFERING;
    double waited = (now - r->waiting_since) * RATE_HZ + (double)r->backlog_frames;
    int complete = stream_complete(r);
    int64_t early = rebuffering ? n / 2 : n;
    if (waited + (double)early <= (double)r->prebuffer_frames && !complete) {
        memset(out, 0, (size_t)n * 2);
        return;
    }
    int64_t lead = 0;
    if (!complete && !rebuffering) {
        double want = nearbyint((double)r->prebuffer_frames - waited);   /* round half to even, as round() */
        lead = imin(n - 1, imax(0, (int64_t)want));
    }
    if (!rebuffering) {
        st_rlx(&r->first_sample_mono_ns, (int64_t)(now * 1e9) + (r->backlog_frames + lead) * 1000000000LL / RATE_HZ);
        st_rlx(&r->arrived_mono_ns, (int64_t)(r->waiting_since * 1e9));
        st_rlx(&r->start_delay_frames, r->prebuffer_frames);
        int64_t target = ld_rlx(&ring->hdr[S_TARGET]);
        st_rlx(&r->start_device_lead_frames, target > 0 ? r->device_lead_frames : 0);
        r->stretch_frames = r->stream_expanded_frames = r->stream_device_underflows = 0;
        r->level_low_frames = r->level_floor_frames = -1;
        r->level_seen_frames = 0;
        r->cushion_left_frames = target > 0 ? imin(CUSHION_MAX_FRAMES, imax(CUSHION_MIN_FRAMES, floordiv(target, 2))) : 0;
        r->cushion_frames = r->since_cushion_frames = 0;
        r_emit(r, EV_STARTED, ring_read_index(ring));
    }
    r->st.history_frames = 0;   /* a new stream or after a gap: no past to splice to */
    r_go(r, RE_PREBUFFERED);
    r_play(r, out, n, lead, heard_base, latency, rebuffering);
}

/* Renderer._render: fill out[:n] completely. */
static void r_render_core(Renderer *r, int16_t *out, int64_t n, int64_t latency, double now) {
    ring_t *ring = &r->ring;
    st_rlx(&r->render_frames, n);
    r_measure_lead(r, n, now);
    r_retarget(r);
    int64_t heard_base = ring_read_index(ring) - r->backlog_frames;
    if (flush_pending(ring)) {
        r_flush(r, out, n, heard_base, latency);
        return;
    }
    int64_t state = r->state;
    if (state == R_PLAYING) {
        r_play(r, out, n, 0, heard_base, latency, 0);
        return;
    }
    if ((state == R_IDLE || state == R_DRY) && !r_arrive(r, out, n, heard_base, latency, now))
        return;
    r_wait_prebuffer(r, out, n, heard_base, latency);
}

/* Renderer._stamp_ref: the reference block about to be written, when it is due at the DAC (the
 * callback's time, the output latency and what the callback still holds), and where its run
 * without a gap began; a sequence lock around the three (odd while written). */
static void stamp_ref(Renderer *r, int64_t frames, int64_t latency, double now) {
    int64_t *h = r->ref.hdr;
    int64_t due = (int64_t)(now * 1e9) + (latency + r->backlog_frames) * 1000000000LL / RATE_HZ;
    int64_t w = ld_rlx(&h[S_W_INDEX]);
    if (llabs(due - r->ref_next_due_ns) > REF_RUN_TOLERANCE_NS)
        r->ref_run_index = w;
    r->ref_next_due_ns = due + frames * 1000000000LL / RATE_HZ;
    int64_t seq = ld_rlx(&h[S_DUE_SEQ]);
    st_rlx(&h[S_DUE_SEQ], seq + 1);
    __atomic_thread_fence(__ATOMIC_RELEASE);   /* odd before the fields change */
    st_rlx(&h[S_DUE_INDEX], w);
    st_rlx(&h[S_DUE_NS], due);
    st_rlx(&h[S_DUE_RUN], r->ref_run_index);
    st_rel(&h[S_DUE_SEQ], seq + 2);            /* even after them */
}

/* Renderer.render: the block, then the reference ring (stamped), the level tap and the listen ring. */
static void r_render(Renderer *r, int16_t *out, int64_t n, int64_t latency, double now) {
    r_render_core(r, out, n, latency, now);
    if (r->has_ref) {
        stamp_ref(r, n, latency, now);
        ring_write(&r->ref, out, n);
    }
    tap_push(&r->tap, out, n);
    if (r->has_listen && ld_rlx(&r->listen_on))
        ring_write(&r->listen, out, n);
}

/* DeviceFeeder.fill: frame_count device-rate frames into dst. */
static void r_fill(Renderer *r, int16_t *dst, int64_t frame_count, int64_t latency, double now) {
    fifo_t *f = &r->fifo;
    int flushing = flush_pending(&r->ring);
    while (f->len < frame_count || flushing) {
        if (f->len + r->rs_cap > f->cap)   /* more than the FIFO holds was asked for: never loop on a full one */
            break;
        /* what was rendered and not handed to the device yet: in the FIFO, and in the resampler,
         * which hands out its output in bunches (its DFT blocks, SOXR_LOG2_DFT: 4.4 ms at most at 24 -> 48 kHz) */
        r->backlog_frames = imax(0, (r->fill_rendered_frames * r->device_rate_hz - r->fill_handed_device_frames * RATE_HZ)
                                    / r->device_rate_hz);
        r_render(r, r->block, r->block_frames, latency, now);
        r->fill_rendered_frames += r->block_frames;
        int64_t m = soxr_chunk(r->resampler, r->block, r->block_frames, r->rs_out, r->rs_cap);
        fifo_push(f, r->rs_out, m);
        if (flushing)
            break;
    }
    if (flushing) {   /* fade what this callback hands out from its start; drop the rest */
        int64_t room = imin(frame_count, 4 * r->device_block);
        int64_t m = imin(room, f->len);
        memcpy(dst, f->buf, (size_t)m * 2);
        flush_fade(r->device_ramp, r->device_ramp_frames, dst, room, m);
        if (frame_count > room)
            memset(dst + room, 0, (size_t)(frame_count - room) * 2);
        f->len = 0;
        soxr_clear(r->resampler);
        /* DeviceFeeder.fill: what was rendered beyond this callback's frames is never handed over */
        r->handed_frames -= floordiv(r->fill_rendered_frames * r->device_rate_hz
                                     - (r->fill_handed_device_frames + frame_count) * RATE_HZ, r->device_rate_hz);
        r->fill_rendered_frames = r->fill_handed_device_frames = 0;   /* nothing rendered waits any more */
        return;
    }
    int64_t m = imin(frame_count, f->len);
    r->fill_handed_device_frames += m;
    memcpy(dst, f->buf, (size_t)m * 2);
    if (frame_count > m)
        memset(dst + m, 0, (size_t)(frame_count - m) * 2);
    fifo_drop(f, m);
}

/* One device period (either host's callback): ``latency_s`` until its first frame is played
 * (<= 0: unknown, the stream's), ``underflow``: the device ran out before it. */
static void pb_period(void *user, int16_t *output, int64_t frames, double latency_s, int underflow) {
    Renderer *r = user;
    int64_t k = ld_rlx(&r->callbacks);
    st_rlx(&r->callback_ns[k % CB_STAMPS], now_ns());
    st_rel(&r->callbacks, k + 1);
    if (underflow) {   /* the device ran out before this callback: a click we caused (Renderer.device_underflowed) */
        st_rlx(&r->device_underflows, r->device_underflows + 1);
        if (r_in_stream(r))
            r->stream_device_underflows += 1;
        r->timeline_blocks = 0;   /* the device went on from there: the steady timeline starts afresh */
    }
    if (latency_s <= 0 || latency_s > 1)
        latency_s = r->stream_latency_s;
    int64_t latency = (int64_t)(latency_s * RATE_HZ);
    if (r->device_rate_hz == RATE_HZ)
        r_render(r, output, frames, latency, now_s());
    else
        r_fill(r, output, frames, latency, now_s());
}

static int pb_callback(const void *input, void *output, unsigned long frames, const PaStreamCallbackTimeInfo *ti,
                       PaStreamCallbackFlags flags, void *user) {
    pb_period(user, output, (int64_t)frames, ti ? ti->outputBufferDacTime - ti->currentTime : 0.0,
              (flags & paOutputUnderflow) != 0);
    return paContinue;
}

static int fill_ramp(float *ramp, int64_t frames) {
    for (int64_t i = 0; i < frames; i++)
        ramp[i] = (float)(0.5 + 0.5 * cos(M_PI * (double)i / (double)frames));
    return 0;
}

static int Renderer_init(Renderer *r, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"speaker", "prebuffer_frames", "max_prebuffer_frames", "ref", "stretch",
                             "device_rate_hz", "block_frames", "tap", NULL};
    PyObject *speaker, *ref = Py_None, *tap = Py_None;
    long long prebuffer, max_prebuffer = 7200, device_rate = RATE_HZ, block = 240;
    int stretch = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OL|LOpLLO", kwlist, &speaker, &prebuffer, &max_prebuffer, &ref,
                                     &stretch, &device_rate, &block, &tap))
        return -1;
    if (r->ring.attached) {
        PyErr_SetString(PyExc_RuntimeError, "a Renderer is initialised once");
        return -1;
    }
    if (device_rate <= 0 || block <= 0 || block > RATE_HZ) {
        PyErr_SetString(PyExc_ValueError, "device_rate_hz and block_frames must be positive");
        return -1;
    }
    r->wake_fd = -1;
    if (ring_attach(&r->ring, speaker, -1, "speaker") < 0)
        return -1;
    if (ref != Py_None) {
        if (ring_attach(&r->ref, ref, -1, "reference") < 0)
            return -1;
        r->has_ref = 1;
    }
    if (tap_attach(&r->tap, tap) < 0)
        return -1;
    r->fade_on_flush = device_rate == RATE_HZ;   /* a resampling callback fades at the device rate instead */
    r->stretch = stretch;
    r->low_water_frames = prebuffer / 2;
    r->prebuffer_frames = r->base_prebuffer_frames = prebuffer;
    r->max_prebuffer_frames = max_prebuffer > prebuffer ? max_prebuffer : prebuffer;
    r->level_low_frames = r->level_floor_frames = -1;
    fill_ramp(r->flush_ramp, FLUSH_FADE_FRAMES);
    for (int i = 0; i < FADE_FRAMES; i++) {   /* np.linspace(1, 0) and (0, 1), float32 */
        r->fade_down[i] = (float)(i == FADE_FRAMES - 1 ? 0.0 : 1.0 + i * (-1.0 / (FADE_FRAMES - 1)));
        r->fade_up[i] = (float)(i == FADE_FRAMES - 1 ? 1.0 : i * (1.0 / (FADE_FRAMES - 1)));
    }
    r->device_rate_hz = device_rate;
    r->block_frames = block;
    if (device_rate != RATE_HZ) {
        r->resampler = soxr_new(RATE_HZ, (double)device_rate);
        if (!r->resampler)
            return -1;
        int64_t device_block = device_rate * block / RATE_HZ;
        r->device_block = device_block;
        r->block = PyMem_Calloc((size_t)block, 2);
        r->rs_cap = 4 * device_block + 64;
        r->rs_out = PyMem_Calloc((size_t)r->rs_cap, 2);
        r->device_ramp_frames = device_rate * FLUSH_FADE_MS / 1000;
        r->device_ramp = PyMem_Calloc((size_t)r->device_ramp_frames, sizeof(float));
        if (!r->block || !r->rs_out || !r->device_ramp) {
            PyErr_NoMemory();
            return -1;
        }
        fill_ramp(r->device_ramp, r->device_ramp_frames);
        if (fifo_init(&r->fifo, device_block * 8) < 0)
            return -1;
    }
    r->stream_latency_s = 0.04;
    return 0;
}

static void Renderer_dealloc(Renderer *r) {
    host_end(&r->host, 1);
    ring_release(&r->ring);
    ring_release(&r->ref);
    ring_release(&r->listen);
    tap_release(&r->tap);
    if (r->resampler)
        soxr_delete(r->resampler);
    PyMem_Free(r->block);
    PyMem_Free(r->rs_out);
    PyMem_Free(r->device_ramp);
    fifo_free(&r->fifo);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static int not_running(Renderer *r) {
    if (r->running) {
        PyErr_SetString(PyExc_RuntimeError, "the device stream runs this renderer: stop it first");
        return 0;
    }
    return 1;
}

static int writable_int16(PyObject *obj, Py_buffer *v) {
    if (PyObject_GetBuffer(obj, v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (v->itemsize != 2) {
        PyBuffer_Release(v);
        PyErr_SetString(PyExc_TypeError, "an int16 buffer is needed");
        return -1;
    }
    return 0;
}

static PyObject *Renderer_render(Renderer *r, PyObject *args) {
    PyObject *out;
    long long latency;
    double now;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OLd", &out, &latency, &now) || !not_running(r) || writable_int16(out, &v) < 0)
        return NULL;
    r_render(r, v.buf, v.len / 2, latency, now);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *Renderer_fill(Renderer *r, PyObject *args) {
    PyObject *out;
    long long latency;
    double now;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "OLd", &out, &latency, &now) || !not_running(r))
        return NULL;
    if (r->device_rate_hz == RATE_HZ) {
        PyErr_SetString(PyExc_RuntimeError, "fill() is for a resampling renderer (device_rate_hz != 24000)");
        return NULL;
    }
    if (writable_int16(out, &v) < 0)
        return NULL;
    r_fill(r, v.buf, v.len / 2, latency, now);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *Renderer_drain_events(Renderer *r, PyObject *unused) {
    PyObject *list = PyList_New(0);
    if (!list)
        return NULL;
    int64_t tail = ld_rlx(&r->ev_tail), head = ld_acq(&r->ev_head);
    for (; tail < head; tail++) {
        event_t *e = &r->ev[tail % EVQ];
        PyObject *t = Py_BuildValue("(sLLLLL)", EV_NAMES[e->kind], (long long)e->index, (long long)e->start_index,
                                    (long long)e->stretch_frames, (long long)e->expanded_frames,
                                    (long long)e->device_underflows);
        if (!t || PyList_Append(list, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(t);
    }
    st_rel(&r->ev_tail, tail);
    return list;
}

static PyObject *Renderer_set_listen(Renderer *r, PyObject *mm) {
    if (!not_running(r))
        return NULL;
    ring_release(&r->listen);
    r->has_listen = 0;
    if (mm != Py_None) {
        if (ring_attach(&r->listen, mm, -1, "listen") < 0)
            return NULL;
        r->has_listen = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *pa_error(const char *what, PaError err) {
    PyErr_Format(PyExc_OSError, "%s: %s", what, Pa_GetErrorText(err));
    return NULL;
}

/* Open and start a device stream of one int16 channel: libpulse's when the PortAudio device is a
 * PulseAudio one (see "the device host"), else PortAudio's as PyAudio opens one (the device's
 * default low latency, no clipping). ``running`` is set before a callback can run, and cleared
 * with everything undone on a failure (an OSError naming ``what``). On success ``h`` holds the
 * stream and *latency_s its latency as the host reports it (0 when it does not). */
static int host_open(PyObject *args, int64_t made_for_hz, int output, PaStreamCallback *cb, host_play_fn play,
                     host_rec_fn rec, void *user, host_t *h, int *running, double *latency_s, const char *what) {
    int device;
    double rate;
    unsigned long frames;
    if (!PyArg_ParseTuple(args, "idk", &device, &rate, &frames))
        return -1;
    if (h->pa || h->pulse) {
        PyErr_SetString(PyExc_RuntimeError, "the stream is already open");
        return -1;
    }
    if ((int64_t)rate != made_for_hz) {
        PyErr_Format(PyExc_ValueError, "the %s was made for %lld Hz, not %g", what, (long long)made_for_hz, rate);
        return -1;
    }
    PaError err;
    Py_BEGIN_ALLOW_THREADS
    err = Pa_Initialize();
    Py_END_ALLOW_THREADS
    if (err != paNoError) {
        pa_error("PortAudio", err);
        return -1;
    }
    const PaDeviceInfo *info = Pa_GetDeviceInfo(device);
    if (!info) {
        Pa_Terminate();
        PyErr_Format(PyExc_OSError, "no PortAudio device %d", device);
        return -1;
    }
    double suggested = output ? info->defaultLowOutputLatency : info->defaultLowInputLatency;
    char pulse_device[256];
    if (host_is_pulse(info->name, pulse_device, sizeof pulse_device)) {
#ifdef REALTALK_PULSE
        Pa_Terminate();
        char why[512] = "";
        pulse_t *opened;
        *running = 1;
        Py_BEGIN_ALLOW_THREADS
        opened = pu_open(pulse_device, rate, (int64_t)frames, suggested, play, rec, user, why, sizeof why);
        Py_END_ALLOW_THREADS
        if (!opened) {
            *running = 0;
            PyErr_Format(PyExc_OSError, "opening the %s: %s", output ? "speaker" : "mic", why);
            return -1;
        }
        h->pulse = opened;
        *latency_s = pu_stream_latency_s(opened, rate);
        return 0;
#endif
    }
    PaStreamParameters p = {device, 1, paInt16, suggested, NULL};
    PaStream *opened = NULL;
    *running = 1;
    Py_BEGIN_ALLOW_THREADS
    err = Pa_OpenStream(&opened, output ? NULL : &p, output ? &p : NULL, rate, frames, paClipOff, cb, user);
    if (err == paNoError && (err = Pa_StartStream(opened)) != paNoError)
        Pa_CloseStream(opened);
    Py_END_ALLOW_THREADS
    if (err != paNoError) {
        *running = 0;
        Pa_Terminate();
        PyErr_Format(PyExc_OSError, "opening the %s: %s", output ? "speaker" : "mic", Pa_GetErrorText(err));
        return -1;
    }
    const PaStreamInfo *si = Pa_GetStreamInfo(opened);
    *latency_s = si ? (output ? si->outputLatency : si->inputLatency) : 0.0;
    h->pa = opened;
    return 0;
}

/* open(device_index, rate_hz, frames_per_buffer): open and start the output stream; returns its
 * output latency in seconds (the one made with when PortAudio reports none). */
static PyObject *Renderer_open(Renderer *r, PyObject *args) {
    double latency_s;
    if (host_open(args, r->device_rate_hz, 1, pb_callback, pb_period, NULL, r, &r->host, &r->running, &latency_s,
                  "renderer") < 0)
        return NULL;
    if (latency_s > 0)
        r->stream_latency_s = latency_s;
    return PyFloat_FromDouble(r->stream_latency_s);
}

static PyObject *Renderer_close(Renderer *r, PyObject *unused) {
    host_end(&r->host, 0);
    r->running = 0;
    Py_RETURN_NONE;
}

static PyObject *Renderer_is_active(Renderer *r, PyObject *unused) {
    return PyBool_FromLong(host_is_active(&r->host));
}

/* The callback stamps as a list, oldest first (playback.cadence, every few seconds). */
static PyObject *Renderer_callback_stamps(Renderer *r, PyObject *unused) {
    int64_t k = ld_acq(&r->callbacks), n = imin(k, CB_STAMPS);
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (!list)
        return NULL;
    for (int64_t i = 0; i < n; i++)
        PyList_SET_ITEM(list, (Py_ssize_t)i, PyLong_FromLongLong(ld_rlx(&r->callback_ns[(k - n + i) % CB_STAMPS])));
    return list;
}

static PyMethodDef Renderer_methods[] = {
    {"render", (PyCFunction)Renderer_render, METH_VARARGS,
     "render(out, latency_frames, now_s): fill a 24 kHz int16 block (Renderer.render). Not while a stream runs."},
    {"fill", (PyCFunction)Renderer_fill, METH_VARARGS,
     "fill(out, latency_frames, now_s): fill device-rate frames (DeviceFeeder.fill). Not while a stream runs."},
    {"drain_events", (PyCFunction)Renderer_drain_events, METH_NOARGS,
     "The queued stream events: (kind, index, start_index, stretch_frames, expanded_frames, device_underflows)."},
    {"set_listen", (PyCFunction)Renderer_set_listen, METH_O, "set_listen(mapping or None): the listen ring."},
    {"open", (PyCFunction)Renderer_open, METH_VARARGS,
     "open(device_index, rate_hz, frames_per_buffer) -> output latency s: start the device stream."},
    {"close", (PyCFunction)Renderer_close, METH_NOARGS, "Stop and close the device stream."},
    {"is_active", (PyCFunction)Renderer_is_active, METH_NOARGS, "The device stream runs."},
    {"callback_stamps", (PyCFunction)Renderer_callback_stamps, METH_NOARGS, "Callback times (mono ns), oldest first."},
    {NULL, NULL, 0, NULL},
};

/* attributes: (name, offset, writable) over int64 fields read with relaxed atomics */
#define I64(field, rw) {#field, offsetof(Renderer, field), rw}
typedef struct { const char *name; Py_ssize_t offset; int writable; } field_t;
static const field_t R_FIELDS[] = {
    I64(prebuffer_frames, 1), I64(base_prebuffer_frames, 1), I64(max_prebuffer_frames, 1),
    I64(low_water_frames, 1), I64(stretch_frames, 0), I64(stream_expanded_frames, 0),
    I64(cushion_left_frames, 0), I64(cushion_frames, 0), I64(since_cushion_frames, 0),
    I64(expanded_frames, 0), I64(accelerated_frames, 0), I64(stream_underruns, 0), I64(dry_frames, 0),
    I64(dry_index, 0), I64(stream_start, 0), I64(wake_errors, 0), I64(stream_device_underflows, 0),
    I64(backlog_frames, 1), I64(first_sample_mono_ns, 0), I64(arrived_mono_ns, 0), I64(flush_mono_ns, 0),
    I64(callbacks, 0), I64(device_underflows, 0), I64(listen_on, 1), I64(ev_dropped, 0),
    I64(growth_frames, 0), I64(start_delay_frames, 0), I64(start_device_lead_frames, 0), I64(render_frames, 0),
    I64(device_lead_frames, 0), I64(handed_frames, 0), I64(state, 0), I64(transition_errors, 0),
    I64(timeline_blocks, 0), I64(level_floor_frames, 0),
    {NULL, 0, 0},
};

static PyObject *Renderer_getattro(Renderer *r, PyObject *name) {
    const char *s = PyUnicode_AsUTF8(name);
    if (s) {
        for (const field_t *f = R_FIELDS; f->name; f++)
            if (strcmp(s, f->name) == 0)
                return PyLong_FromLongLong(ld_rlx((int64_t *)((char *)r + f->offset)));
        if (strcmp(s, "in_stream") == 0)
            return PyBool_FromLong(r_in_stream(r));
        if (strcmp(s, "wake_fd") == 0)
            return PyLong_FromLong(r->wake_fd);
        if (strcmp(s, "fade_on_flush") == 0)
            return PyBool_FromLong(r->fade_on_flush);
        if (strcmp(s, "device_rate_hz") == 0)
            return PyLong_FromLongLong(r->device_rate_hz);
        if (strcmp(s, "host") == 0)
            return PyUnicode_FromString(host_name(&r->host));
        if (strcmp(s, "device_buffer") == 0)
            return host_buffer(&r->host);
    } else {
        PyErr_Clear();
    }
    return PyObject_GenericGetAttr((PyObject *)r, name);
}

static int Renderer_setattro(Renderer *r, PyObject *name, PyObject *value) {
    const char *s = PyUnicode_AsUTF8(name);
    if (!s)
        return -1;
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "%s cannot be deleted", s);
        return -1;
    }
    if (strcmp(s, "wake_fd") == 0) {
        if (r->running) {
            PyErr_SetString(PyExc_AttributeError, "wake_fd is set before the device stream starts");
            return -1;
        }
        int fd = value == Py_None ? -1 : (int)PyLong_AsLong(value);
        if (fd == -1 && PyErr_Occurred())
            return -1;
        r->wake_fd = fd;
        return 0;
    }
    for (const field_t *f = R_FIELDS; f->name; f++) {
        if (strcmp(s, f->name) == 0) {
            if (!f->writable || (r->running && strcmp(s, "listen_on") != 0)) {
                PyErr_Format(PyExc_AttributeError, "%s is the callback's to write%s", s,
                             r->running ? " while the device stream runs" : "");
                return -1;
            }
            long long v = PyLong_AsLongLong(value);
            if (v == -1 && PyErr_Occurred())
                return -1;
            st_rlx((int64_t *)((char *)r + f->offset), v);
            return 0;
        }
    }
    PyErr_Format(PyExc_AttributeError, "the native renderer has no settable attribute %s", s);
    return -1;
}

static PyTypeObject RendererType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine.audio._native.Renderer",
    .tp_basicsize = sizeof(Renderer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The playback renderer in C: Renderer and DeviceFeeder of engine/playback/renderer.py, "
              "run from a PortAudio output callback (open) or driven by render()/fill() in tests.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Renderer_init,
    .tp_dealloc = (destructor)Renderer_dealloc,
    .tp_methods = Renderer_methods,
    .tp_getattro = (getattrofunc)Renderer_getattro,
    .tp_setattro = (setattrofunc)Renderer_setattro,
};

/* ------------------------------------------------------------------ the residual-echo guard (echo.py) */
enum { G_QUIET = 0, G_ECHO = 1, G_TALK = 2 };
typedef struct {
    /* echo.py's constants */
    double talk_db, hold_release_db, hold_decay, echo_beat_db, erl_up_db, erl_down_db, far_active_dbfs, attenuation;
    int64_t onset_blocks, hang_blocks_max, hold_blocks_min, hold_max_blocks, erl_learn_blocks, window_blocks,
            erle_window_blocks;
    /* TalkGuard */
    double loud_ratio, talk_ratio, beat_ratio, release_ratio, active_rms;
    int state, holding;
    int64_t run_blocks, hang_blocks, hold_blocks, hold_age, erl_blocks, talks, holds, held_blocks;
    int64_t hold_min_age;         /* far-end speech blocks the first hold lasts at least */
    double out_energy, far_peak, erl_db;   /* erl_db: the echo path's gain, its 90th percentile tracked in dB */
} guard_t;

/* Read echo.py's constants from a dict (set-up only). */
static int guard_constants(guard_t *g, PyObject *d) {
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "the guard's constants are a dict (engine.capture.echo's, by name)");
        return -1;
    }
    struct { const char *name; double *f; int64_t *i; } want[] = {
        {"TALK_DB", &g->talk_db, NULL}, {"HOLD_RELEASE_DB", &g->hold_release_db, NULL},
        {"HOLD_DECAY", &g->hold_decay, NULL}, {"ECHO_BEAT_DB", &g->echo_beat_db, NULL},
        {"ERL_UP_DB", &g->erl_up_db, NULL}, {"ERL_DOWN_DB", &g->erl_down_db, NULL},
        {"FAR_ACTIVE_DBFS", &g->far_active_dbfs, NULL},
        {"GUARD_ATTENUATION", &g->attenuation, NULL},
        {"TALK_ONSET_BLOCKS", NULL, &g->onset_blocks}, {"TALK_HANG_BLOCKS", NULL, &g->hang_blocks_max},
        {"HOLD_BLOCKS", NULL, &g->hold_blocks_min}, {"HOLD_MAX_BLOCKS", NULL, &g->hold_max_blocks},
        {"ERL_LEARN_BLOCKS", NULL, &g->erl_learn_blocks}, {"GUARD_WINDOW_BLOCKS", NULL, &g->window_blocks},
        {"ERLE_WINDOW_BLOCKS", NULL, &g->erle_window_blocks},
    };
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        PyObject *v = PyDict_GetItemString(d, want[k].name);
        if (!v) {
            PyErr_Format(PyExc_KeyError, "the guard's constants lack %s", want[k].name);
            return -1;
        }
        if (want[k].f)
            *want[k].f = PyFloat_AsDouble(v);
        else
            *want[k].i = PyLong_AsLongLong(v);
        if (PyErr_Occurred())
            return -1;
    }
    if (g->window_blocks < 1 || g->window_blocks > MAX_GUARD_WINDOW || g->erle_window_blocks < 1) {
        PyErr_SetString(PyExc_ValueError, "GUARD_WINDOW_BLOCKS must be 1..256, ERLE_WINDOW_BLOCKS positive");
        return -1;
    }
    g->active_rms = 32768.0 * pow(10.0, g->far_active_dbfs / 20.0);
    return 0;
}

/* TalkGuard.__init__ (the constants already read). */
static void guard_init(guard_t *g, double loud_db) {
    g->loud_ratio = pow(10.0, loud_db / 20.0);
    g->talk_ratio = pow(10.0, g->talk_db / 20.0);
    g->beat_ratio = pow(10.0, g->echo_beat_db / 20.0);
    g->release_ratio = pow(10.0, (g->talk_db - g->hold_release_db) / 20.0);
    g->state = G_QUIET;
    g->holding = 1;                        /* from the start: until AEC3 has converged on the echo path */
    g->hold_min_age = g->hold_blocks_min;  /* its echo must arrive first */
    g->run_blocks = g->hang_blocks = g->hold_blocks = g->hold_age = g->erl_blocks = 0;
    g->talks = g->holds = g->held_blocks = 0;
    g->out_energy = g->far_peak = g->erl_db = 0.0;
}

/* TalkGuard.hold: the far end is uncertain. */
static void guard_hold(guard_t *g, int64_t blocks) {
    if (!g->holding) {
        g->holding = 1;
        g->holds += g->far_peak > g->active_rms;
    }
    g->hold_blocks = imax(g->hold_blocks, blocks);
    g->hold_age = 0;
}

/* TalkGuard.attenuate: advance by one block; 1 if the block is taken for residual echo. */
static int guard_attenuate(guard_t *g, double out_rms, double far_peak, double near_rms) {
    int held = g->holding;
    g->far_peak = far_peak;
    if (far_peak > g->active_rms)
        g->out_energy = g->out_energy * g->hold_decay + out_rms * out_rms;
    if (held) {   /* this block is judged held; the hold may end after it */
        g->hold_age += far_peak > g->active_rms;   /* far-end speech blocks */
        if (g->hold_blocks > 0) {
            g->hold_blocks -= 1;
        } else if ((g->hold_age >= g->hold_min_age &&
                    sqrt(g->out_energy * (1 - g->hold_decay)) <= g->release_ratio * far_peak) ||
                   g->hold_age >= g->hold_max_blocks) {
            g->holding = 0;
            g->hold_min_age = 0;
        }
    }
    if (far_peak <= g->active_rms) {
        g->state = G_QUIET;
        g->run_blocks = g->hang_blocks = 0;
        return 0;
    }
    if (held)
        g->held_blocks += 1;
    double erl = g->erl_blocks >= g->erl_learn_blocks ? pow(10.0, g->erl_db / 20.0) : 1.0;
    int evidence = (held && g->state != G_TALK) ? near_rms >= g->beat_ratio * erl * far_peak
                                                 : out_rms >= g->talk_ratio * far_peak;
    if (g->state == G_TALK) {
        if (evidence) {
            g->hang_blocks = 0;
            return 0;
        }
        g->hang_blocks += 1;
        if (g->hang_blocks <= g->hang_blocks_max)
            return 0;
        g->state = G_ECHO;
        g->run_blocks = 0;
        return 1;
    }
    g->state = G_ECHO;
    if (!evidence) {   /* echo only (the mic's level says nothing of AEC3): learn the echo path's gain */
        double ratio_db = 20 * log10((near_rms > 1e-3 ? near_rms : 1e-3) / far_peak);
        if (g->erl_blocks < g->erl_learn_blocks)   /* the loudest of the first blocks: an upper start */
            g->erl_db = (g->erl_blocks == 0 || ratio_db > g->erl_db) ? ratio_db : g->erl_db;
        else   /* then its 90th percentile, tracked */
            g->erl_db += ratio_db > g->erl_db ? g->erl_up_db : -g->erl_down_db;
        g->erl_blocks += 1;
    }
    g->run_blocks = evidence ? g->run_blocks + 1 : 0;
    if (g->run_blocks >= g->onset_blocks) {
        g->state = G_TALK;
        g->hang_blocks = 0;
        g->talks += 1;
        return 0;
    }
    if (held)
        return !evidence;
    return out_rms < g->loud_ratio * far_peak;
}

/* talk_guard(constants, loud_db, blocks) -> (list of bools, counts): TalkGuard over a sequence of
 * blocks, each (out_rms, far_peak, near_rms, hold_blocks): hold_blocks > 0 calls hold() before the
 * block; then its counters and state (the tests hold both against the Python one). */
static PyObject *py_talk_guard(PyObject *mod, PyObject *args) {
    PyObject *consts, *blocks;
    double loud_db;
    if (!PyArg_ParseTuple(args, "OdO", &consts, &loud_db, &blocks))
        return NULL;
    guard_t g;
    if (guard_constants(&g, consts) < 0)
        return NULL;
    guard_init(&g, loud_db);
    PyObject *seq = PySequence_Fast(blocks, "blocks must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *res = PyList_New(n);
    for (Py_ssize_t i = 0; res && i < n; i++) {
        double out_rms, far_peak, near_rms;
        long long hold;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "dddL", &out_rms, &far_peak, &near_rms, &hold)) {
            Py_CLEAR(res);
            break;
        }
        if (hold > 0)
            guard_hold(&g, hold);
        PyList_SET_ITEM(res, i, PyBool_FromLong(guard_attenuate(&g, out_rms, far_peak, near_rms)));
    }
    Py_DECREF(seq);
    if (!res)
        return NULL;
    return Py_BuildValue("(N{s:L,s:L,s:L,s:d,s:L,s:s})", res, "talks", (long long)g.talks, "holds", (long long)g.holds,
                         "held_blocks", (long long)g.held_blocks, "erl_db", g.erl_db, "erl_blocks",
                         (long long)g.erl_blocks, "state", (const char *[]){"quiet", "echo", "talk"}[g.state]);
}

/* ------------------------------------------------------------------ the far end (echo.py FarEnd, MicClock) */
/* FarEnd and MicClock of engine/capture/echo.py, line for line (rule 5): the capture step takes
 * the reference for each mic chunk here, with no Python call (it cost the worker ~90 µs a chunk).
 * Their constants are echo.py's, handed in by name (far_constants()). tests/test_echo_far_end.py
 * drives both implementations with the same input. Not real-time code: the worker's step. */
#define NS_PER_S 1000000000LL

typedef struct {
    int64_t frames, origin_ns, reports, off_reports, jumps;
    int has_origin, doubtful;
    int64_t tolerance_ns, jump_blocks, settle_reports;
} micclock_t;

static inline int64_t frames_ns(int64_t frames) { return frames_at_ns(frames, RATE_HZ); }

static inline int clock_settled(const micclock_t *k) { return k->reports >= k->settle_reports; }

/* MicClock.place: the capture time (ns) of the first of the next ``frames`` mic frames. */
static int64_t clock_place(micclock_t *k, int64_t frames, int64_t adc_ns) {
    if (!k->has_origin) {
        k->origin_ns = adc_ns - frames_ns(k->frames);
        k->has_origin = 1;
    }
    int64_t at_ns = k->origin_ns + frames_ns(k->frames);
    int64_t off_ns = adc_ns - at_ns;
    if (off_ns <= k->tolerance_ns && off_ns >= -k->tolerance_ns) {
        k->reports += 1;
        k->origin_ns += floordiv(off_ns, imin(k->reports, k->settle_reports));
        k->off_reports = 0;
        k->doubtful = 0;
    } else {
        k->off_reports += 1;
        k->doubtful = k->off_reports >= 2;
        if (k->off_reports >= k->jump_blocks) {
            k->origin_ns += off_ns;
            at_ns = adc_ns;
            k->jumps += 1;
            k->off_reports = 0;
        }
    }
    k->frames += frames;
    return at_ns;
}

/* Ring.due_stamp: the producer's latest stamp (index, due_ns, run_index); 0 if none (or it was
 * being written at each of three tries). */
static int ring_due_stamp(ring_t *r, int64_t *index, int64_t *due_ns, int64_t *run_index) {
    for (int i = 0; i < 3; i++) {
        int64_t seq = ld_acq(&r->hdr[S_DUE_SEQ]);
        if (seq == 0)
            return 0;
        if (seq & 1)
            continue;
        *index = ld_rlx(&r->hdr[S_DUE_INDEX]);
        *due_ns = ld_rlx(&r->hdr[S_DUE_NS]);
        *run_index = ld_rlx(&r->hdr[S_DUE_RUN]);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (ld_rlx(&r->hdr[S_DUE_SEQ]) == seq)
            return 1;
    }
    return 0;
}

typedef struct {
    PyObject_HEAD
    ring_t ring;
    micclock_t clock;
    int16_t *buf;
    int64_t buf_frames;
    int64_t lead_ns, tolerance_frames, retime_frames, settle_frames, settle_s, uncertain_zero_frames;
    int64_t missing_frames, gap_frames, skipped_frames, realignments, uncertain_frames;
    int uncertain;
    int has_anchor, has_next;
    int64_t anchor_index, anchor_due_ns, next_index, next_due_ns;
    int aligned, padded, run_fresh;
    int64_t settle_until, zero_run, run;
} FarEnd;

static void far_begin_run(FarEnd *f, int64_t run_index) {
    if (run_index != f->run) {
        f->run = run_index;
        f->run_fresh = 1;
    }
}

/* FarEnd._moved: count a realignment (not those while the mic clock settles); whether it counted. */
static int far_moved(FarEnd *f) {
    if (f->aligned && clock_settled(&f->clock)) {
        f->realignments += 1;
        return 1;
    }
    return 0;
}

static void far_set_uncertain(FarEnd *f, int uncertain, int64_t frames) {
    f->uncertain = uncertain;
    if (uncertain)
        f->uncertain_frames += frames;
}

static void far_follow_stamps(FarEnd *f, int64_t read_index) {
    int64_t index, due_ns, run_index;
    if (!ring_due_stamp(&f->ring, &index, &due_ns, &run_index))
        return;
    if (run_index <= read_index || !f->has_anchor) {
        f->has_anchor = 1;
        f->anchor_index = index;
        f->anchor_due_ns = due_ns;
        f->has_next = 0;
        far_begin_run(f, run_index);
    } else {   /* unread frames of an earlier run before it: they keep that run's anchor */
        f->has_next = 1;
        f->next_index = run_index;
        f->next_due_ns = due_ns - frames_ns(index - run_index);
    }
}

/* FarEnd.take: the reference for the next ``frames`` mic frames (at most buf_frames), the first
 * captured at ``adc_ns``, into the object's buffer; how many frames. */
static int64_t far_end_take(FarEnd *f, int64_t frames, int64_t adc_ns) {
    int16_t *out = f->buf;
    frames = imax(0, imin(frames, f->buf_frames));
    ring_t *ring = &f->ring;
    int64_t start_ns = clock_place(&f->clock, frames, adc_ns) + f->lead_ns;
    int uncertain = f->clock.doubtful;
    far_follow_stamps(f, ring_read_index(ring));
    if (!f->has_anchor) {   /* nothing stamped yet: by count */
        int64_t got = ring_read(ring, out, frames);
        if (got < frames) {
            memset(out + got, 0, (size_t)(frames - got) * 2);
            f->missing_frames += frames - got;
        }
        far_set_uncertain(f, uncertain, frames);
        return frames;
    }
    int64_t pos = 0, zeros = 0;
    while (pos < frames) {
        int64_t r = ring_read_index(ring);
        if (f->has_next && r >= f->next_index) {
            far_begin_run(f, f->next_index);
            f->anchor_index = f->next_index;
            f->anchor_due_ns = f->next_due_ns;
            f->has_next = 0;
        }
        /* > 0: frame r is due after the mic frame at pos (silence first); < 0: before it (skip) */
        int64_t early = floordiv((f->anchor_due_ns + frames_ns(r - f->anchor_index) - start_ns - frames_ns(pos)) * RATE_HZ,
                                 NS_PER_S);
        int64_t available = ring_write_index(ring) - r;
        int64_t tolerance = (f->padded || !f->aligned || !clock_settled(&f->clock)) ? f->retime_frames
                          : f->clock.frames < f->settle_until ? f->settle_frames : f->tolerance_frames;
        if (early < -tolerance && available > 0) {
            f->skipped_frames += ring_skip(ring, imin(-early, available));
            int moved = far_moved(f);
            if (moved && (f->run_fresh || f->clock.frames < f->settle_until)) {
                uncertain = 1;
                if (f->run_fresh)
                    f->settle_until = f->clock.frames + RATE_HZ * f->settle_s;
            }
        } else if (early > tolerance) {
            int64_t n = imin(early, frames - pos);
            memset(out + pos, 0, (size_t)n * 2);
            pos += n;
            f->missing_frames += n;
            f->gap_frames += n;
            if (far_moved(f)) {   /* the speaker ran dry: its DAC times right after are off for a while */
                uncertain = 1;
                f->settle_until = f->clock.frames + RATE_HZ * f->settle_s;
            }
        } else if (available <= 0) {
            memset(out + pos, 0, (size_t)(frames - pos) * 2);
            zeros += frames - pos;
            f->missing_frames += frames - pos;
            f->padded = 1;
            break;
        } else {
            int64_t n = imin(frames - pos, available);
            if (f->has_next)
                n = imin(n, f->next_index - r);
            pos += ring_read(ring, out + pos, n);
            f->aligned = 1;
            f->padded = 0;
            f->run_fresh = 0;
        }
    }
    f->zero_run = zeros ? f->zero_run + zeros : 0;
    uncertain = uncertain || f->zero_run >= f->uncertain_zero_frames;
    far_set_uncertain(f, uncertain, frames);
    return frames;
}

static int FarEnd_init(FarEnd *f, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"ref", "constants", NULL};
    PyObject *ref, *d;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO!", kwlist, &ref, &PyDict_Type, &d))
        return -1;
    if (f->ring.attached) {
        PyErr_SetString(PyExc_RuntimeError, "a FarEnd is initialised once");
        return -1;
    }
    int64_t lead_ms, tolerance_ms, retime_ms, settle_ms, uncertain_ms, clock_tolerance_ms;
    struct { const char *name; int64_t *v; } want[] = {
        {"lead_ms", &lead_ms}, {"tolerance_ms", &tolerance_ms}, {"FAR_RETIME_MS", &retime_ms},
        {"FAR_SETTLE_MS", &settle_ms}, {"FAR_SETTLE_S", &f->settle_s}, {"FAR_UNCERTAIN_MS", &uncertain_ms},
        {"MIC_CLOCK_TOLERANCE_MS", &clock_tolerance_ms}, {"MIC_CLOCK_JUMP_BLOCKS", &f->clock.jump_blocks},
        {"MIC_CLOCK_SETTLE_REPORTS", &f->clock.settle_reports},
    };
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        PyObject *v = PyDict_GetItemString(d, want[k].name);
        if (!v) {
            PyErr_Format(PyExc_KeyError, "the far end's constants lack %s", want[k].name);
            return -1;
        }
        *want[k].v = PyLong_AsLongLong(v);
        if (PyErr_Occurred())
            return -1;
    }
    if (f->clock.settle_reports < 1 || f->clock.jump_blocks < 1) {
        PyErr_SetString(PyExc_ValueError, "the mic clock's settle reports and jump blocks must be positive");
        return -1;
    }
    if (ring_attach(&f->ring, ref, -1, "reference") < 0)
        return -1;
    f->buf_frames = RATE_HZ;   /* one second: more than any callback asks for */
    if (!(f->buf = PyMem_Calloc((size_t)f->buf_frames, 2))) {
        PyErr_NoMemory();
        return -1;
    }
    f->lead_ns = lead_ms * 1000000;
    f->tolerance_frames = RATE_HZ * tolerance_ms / 1000;
    f->retime_frames = RATE_HZ * retime_ms / 1000;
    f->settle_frames = RATE_HZ * settle_ms / 1000;
    f->uncertain_zero_frames = RATE_HZ * uncertain_ms / 1000;
    f->clock.tolerance_ns = clock_tolerance_ms * 1000000;
    f->run = -1;
    return 0;
}

static void FarEnd_dealloc(FarEnd *f) {
    ring_release(&f->ring);
    PyMem_Free(f->buf);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

/* take(frames, adc_ns) -> int: FarEnd.take into the object's own buffer (``buffer()``). */
static PyObject *FarEnd_take(FarEnd *f, PyObject *args) {
    long long frames, adc_ns;
    if (!PyArg_ParseTuple(args, "LL", &frames, &adc_ns))
        return NULL;
    return PyLong_FromLongLong(far_end_take(f, frames, adc_ns));
}

/* buffer() -> memoryview: the buffer take() writes (int16, one second), for a numpy view. */
static PyObject *FarEnd_buffer(FarEnd *f, PyObject *unused) {
    return PyMemoryView_FromMemory((char *)f->buf, (Py_ssize_t)f->buf_frames * 2, PyBUF_WRITE);
}

static PyMethodDef FarEnd_methods[] = {
    {"take", (PyCFunction)FarEnd_take, METH_VARARGS, "take(frames, adc_ns) -> frames: the reference into buffer()."},
    {"buffer", (PyCFunction)FarEnd_buffer, METH_NOARGS, "The int16 buffer take() writes."},
    {NULL, NULL, 0, NULL},
};

static PyObject *FarEnd_getattro(FarEnd *f, PyObject *name) {
    const char *s = PyUnicode_AsUTF8(name);
    if (!s)
        return NULL;
    struct { const char *name; int64_t v; } ints[] = {
        {"missing_frames", f->missing_frames}, {"gap_frames", f->gap_frames}, {"skipped_frames", f->skipped_frames},
        {"realignments", f->realignments}, {"uncertain_frames", f->uncertain_frames},
        {"clock_jumps", f->clock.jumps}, {"clock_frames", f->clock.frames},
    };
    for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++)
        if (strcmp(s, ints[k].name) == 0)
            return PyLong_FromLongLong(ints[k].v);
    if (strcmp(s, "uncertain") == 0)
        return PyBool_FromLong(f->uncertain);
    if (strcmp(s, "clock_doubtful") == 0)
        return PyBool_FromLong(f->clock.doubtful);
    if (strcmp(s, "clock_settled") == 0)
        return PyBool_FromLong(clock_settled(&f->clock));
    return PyObject_GenericGetAttr((PyObject *)f, name);
}

static PyTypeObject FarEndType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine.audio._native.FarEnd",
    .tp_basicsize = sizeof(FarEnd),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "engine.capture.echo.FarEnd in C: the reference ring read for each mic chunk, lined up by time.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FarEnd_init,
    .tp_dealloc = (destructor)FarEnd_dealloc,
    .tp_methods = FarEnd_methods,
    .tp_getattro = (getattrofunc)FarEnd_getattro,
};

/* ------------------------------------------------------------------ capture */
#define MAX_AEC_BLOCKS 16
#define ADC_STAMPS 64

typedef struct {
    PyObject_HEAD
    ring_t mic;
    int64_t device_rate_hz, period_frames;
    /* the device's frames: the callback's ring (it writes, the worker step reads) */
    int16_t *dev;
    int64_t dev_cap, dev_w, dev_r, dev_dropped;
    int wake_fd;
    int aec_on;
    /* worker buffers */
    soxr_t to24, near_up, far_up, down;
    int64_t chunk_cap;            /* device frames per step at most */
    int16_t *chunk, *raw24, *near_aec_tmp, *far_aec_tmp, *out24;
    int64_t raw24_cap, aec_cap;
    fifo_t near_aec, far_aec;
    float *out_f;
    int16_t *out_aec;
    PyObject *near_views, *far_views;   /* numpy views of 1..MAX_AEC_BLOCKS blocks, for the AEC call */
    Py_buffer near_buf, far_buf;
    PyObject *raw_view, *far_view, *out_view;   /* numpy views the worker hands to extras() */
    Py_buffer raw_buf, farv_buf, outv_buf;
    int has_bufs;
    /* echo statistics (EchoCanceller) */
    double near_energy, out_energy, window_near, window_out;
    int64_t far_active_blocks, window_blocks, blocks, guarded_blocks, errors, busy_ns, steps;
    /* the worker thread's CPU time (CLOCK_THREAD_CPUTIME_ID): in step(), and of it inside the AEC's
     * Python call and inside far_take (bench/capture_step.py: what the batched call costs) */
    int64_t step_cpu_ns, aec_call_cpu_ns, far_take_cpu_ns;
    double erle_windows[ERLE_WINDOWS];
    int64_t erle_count;
    double far_rms[MAX_GUARD_WINDOW];
    int64_t far_pos;
    int guard_on;
    guard_t guard;                /* its constants serve the statistics too, with the guard off */
    PyObject *last_error;
    tap_t tap_in, tap_out;
    /* the stream */
    host_t host;
    int64_t callbacks, input_overflows;
    int64_t callback_ns[CB_STAMPS];
    /* when device frames were captured (the callback's, written before dev_w publishes them):
     * (device frame index, its ADC time in CLOCK_MONOTONIC ns) per callback */
    int64_t adc_index[ADC_STAMPS], adc_ns[ADC_STAMPS];
    int64_t adc_count;
    int64_t out24_total;          /* 24 kHz frames made so far (the worker's): what soxr holds back */
    /* what the step holds back of the mic after each chunk, in 24 kHz frames: what its resamplers
     * hold (soxr_delay) and the mic frames waiting for a whole AEC3 block, read from their state
     * after the chunk (a failed call or a dropped frame does not skew the chunks after it); summed
     * and the most since the last take_held_back() (the worker's, like step) */
    double held_sum, held_max;
    int64_t held_steps;
    int far_adc;                  /* far_take(n, adc_ns) rather than far_take(n) */
    double stream_latency_s;
    int running;
} Capture;

static int Capture_init(Capture *c, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"mic", "mic_fd", "device_rate_hz", "period_frames", "aec", "guard_db", "buffers",
                             "tap_in", "tap_out", "far_adc", "echo", NULL};
    PyObject *mic, *guard_db = Py_None, *bufs = Py_None, *tap_in = Py_None, *tap_out = Py_None, *echo = Py_None;
    int mic_fd = -1, aec = 0, far_adc = 0;
    long long rate, period;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiLL|pOOOOpO", kwlist, &mic, &mic_fd, &rate, &period, &aec, &guard_db,
                                     &bufs, &tap_in, &tap_out, &far_adc, &echo))
        return -1;
    if (c->mic.attached) {
        PyErr_SetString(PyExc_RuntimeError, "a Capture is initialised once");
        return -1;
    }
    if (rate <= 0 || period <= 0 || period > rate) {
        PyErr_SetString(PyExc_ValueError, "device_rate_hz and period_frames must be positive");
        return -1;
    }
    c->wake_fd = -1;
    if (ring_attach(&c->mic, mic, mic_fd, "mic") < 0)
        return -1;
    if (tap_attach(&c->tap_in, tap_in) < 0 || tap_attach(&c->tap_out, tap_out) < 0)
        return -1;
    c->device_rate_hz = rate;
    c->period_frames = period;
    c->far_adc = far_adc;
    c->dev_cap = 1;
    while (c->dev_cap < rate)   /* a second of the device */
        c->dev_cap <<= 1;
    c->dev = PyMem_Calloc((size_t)c->dev_cap, 2);
    c->chunk_cap = 4 * period;
    c->chunk = PyMem_Calloc((size_t)c->chunk_cap, 2);
    c->raw24_cap = c->chunk_cap * RATE_HZ / rate + 256;
    c->raw24 = PyMem_Calloc((size_t)c->raw24_cap, 2);
    c->aec_cap = c->raw24_cap * AEC_RATE_HZ / RATE_HZ + 512;   /* a chunk's 24 kHz frames at AEC_RATE_HZ */
    c->near_aec_tmp = PyMem_Calloc((size_t)c->aec_cap, 2);
    c->far_aec_tmp = PyMem_Calloc((size_t)c->aec_cap, 2);
    c->out24 = PyMem_Calloc((size_t)c->raw24_cap + MAX_AEC_BLOCKS * AEC_BLOCK, 2);
    c->out_f = PyMem_Calloc(MAX_AEC_BLOCKS * AEC_BLOCK, sizeof(float));
    c->out_aec = PyMem_Calloc(MAX_AEC_BLOCKS * AEC_BLOCK, 2);
    if (!c->dev || !c->chunk || !c->raw24 || !c->near_aec_tmp || !c->far_aec_tmp || !c->out24 || !c->out_f || !c->out_aec) {
        PyErr_NoMemory();
        return -1;
    }
    c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->wake_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (rate != RATE_HZ && !(c->to24 = soxr_new((double)rate, RATE_HZ)))
        return -1;
    c->aec_on = aec;
    if (aec) {   /* echo.py's constants, for the statistics and the guard */
        if (echo == Py_None) {
            PyErr_SetString(PyExc_ValueError, "echo cancellation needs echo.py's constants (echo=)");
            return -1;
        }
        if (guard_constants(&c->guard, echo) < 0)
            return -1;
        double db = 0.0;
        if (guard_db != Py_None) {
            db = PyFloat_AsDouble(guard_db);
            if (PyErr_Occurred())
                return -1;
            c->guard_on = 1;
        }
        guard_init(&c->guard, db);
    }
    if (aec) {
        /* the near end goes to AEC3's rate from the 24 kHz mic, as EchoCanceller takes it (not from the
         * device's frames): both ends band-limited alike, and the same echo path as the PyAudio backend */
        if (!(c->near_up = soxr_new(RATE_HZ, AEC_RATE_HZ)))
            return -1;
        if (!(c->far_up = soxr_new(RATE_HZ, AEC_RATE_HZ)) || !(c->down = soxr_new(AEC_RATE_HZ, RATE_HZ)))
            return -1;
        if (fifo_init(&c->near_aec, AEC_RATE_HZ) < 0 || fifo_init(&c->far_aec, AEC_RATE_HZ) < 0)
            return -1;
    }
    /* buffers: (near_base, far_base, near_views, far_views, raw_view, far_view, out_view), numpy arrays the
     * Python side made: the AEC's inputs, and the views extras() gets */
    if (bufs != Py_None) {
        PyObject *nb, *fb, *nv, *fv, *rv, *fav, *ov;
        if (!PyArg_ParseTuple(bufs, "OOOOOOO", &nb, &fb, &nv, &fv, &rv, &fav, &ov))
            return -1;
        if (PyObject_GetBuffer(nb, &c->near_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            return -1;
        if (PyObject_GetBuffer(fb, &c->far_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
            PyBuffer_Release(&c->near_buf);
            return -1;
        }
        if (PyObject_GetBuffer(rv, &c->raw_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0 ||
            PyObject_GetBuffer(fav, &c->farv_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0 ||
            PyObject_GetBuffer(ov, &c->outv_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            return -1;   /* (a half-made object: dealloc releases nothing it did not get) */
        c->has_bufs = 1;
        if (c->near_buf.len < MAX_AEC_BLOCKS * AEC_BLOCK * 2 || c->far_buf.len < MAX_AEC_BLOCKS * AEC_BLOCK * 2 ||
            !PyTuple_Check(nv) || !PyTuple_Check(fv) || PyTuple_GET_SIZE(nv) < MAX_AEC_BLOCKS ||
            PyTuple_GET_SIZE(fv) < MAX_AEC_BLOCKS || c->raw_buf.len < c->raw24_cap * 2 ||
            c->farv_buf.len < c->raw24_cap * 2 || c->outv_buf.len < (c->raw24_cap + MAX_AEC_BLOCKS * AEC_BLOCK) * 2) {
            PyErr_SetString(PyExc_ValueError, "the capture's buffers are too small");
            return -1;
        }
        Py_INCREF(nv);
        Py_INCREF(fv);
        Py_INCREF(rv);
        Py_INCREF(fav);
        Py_INCREF(ov);
        c->near_views = nv;
        c->far_views = fv;
        c->raw_view = rv;
        c->far_view = fav;
        c->out_view = ov;
    } else if (aec) {
        PyErr_SetString(PyExc_ValueError, "echo cancellation needs the buffers for its calls");
        return -1;
    }
    c->stream_latency_s = 0.0;
    return 0;
}

static void Capture_dealloc(Capture *c) {
    host_end(&c->host, 1);
    ring_release(&c->mic);
    tap_release(&c->tap_in);
    tap_release(&c->tap_out);
    if (c->has_bufs) {
        PyBuffer_Release(&c->near_buf);
        PyBuffer_Release(&c->far_buf);
        PyBuffer_Release(&c->raw_buf);
        PyBuffer_Release(&c->farv_buf);
        PyBuffer_Release(&c->outv_buf);
    }
    Py_XDECREF(c->near_views);
    Py_XDECREF(c->far_views);
    Py_XDECREF(c->raw_view);
    Py_XDECREF(c->far_view);
    Py_XDECREF(c->out_view);
    Py_XDECREF(c->last_error);
    soxr_t all[4] = {c->to24, c->near_up, c->far_up, c->down};
    for (int i = 0; i < 4; i++)
        if (all[i])
            soxr_delete(all[i]);
    PyMem_Free(c->dev);
    PyMem_Free(c->chunk);
    PyMem_Free(c->raw24);
    PyMem_Free(c->near_aec_tmp);
    PyMem_Free(c->far_aec_tmp);
    PyMem_Free(c->out24);
    PyMem_Free(c->out_f);
    PyMem_Free(c->out_aec);
    fifo_free(&c->near_aec);
    fifo_free(&c->far_aec);
    if (c->wake_fd >= 0)
        close(c->wake_fd);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

/* The device's frames into the capture's own ring (the callback's half, also push() in tests). */
static void cap_push(Capture *c, const int16_t *in, int64_t n, int64_t adc_ns) {
    int64_t w = ld_rlx(&c->dev_w), room = c->dev_cap - (w - ld_acq(&c->dev_r));
    if (n > room) {
        st_rlx(&c->dev_dropped, c->dev_dropped + n - room);
        n = room;
    }
    if (n <= 0)
        return;
    int64_t k = ld_rlx(&c->adc_count);   /* the stamp goes out with the frames (dev_w's release) */
    st_rlx(&c->adc_index[k % ADC_STAMPS], w);
    st_rlx(&c->adc_ns[k % ADC_STAMPS], adc_ns);
    st_rel(&c->adc_count, k + 1);
    int64_t pos = w & (c->dev_cap - 1), first = imin(n, c->dev_cap - pos);
    memcpy(c->dev + pos, in, (size_t)first * 2);
    if (n > first)
        memcpy(c->dev, in + first, (size_t)(n - first) * 2);
    st_rel(&c->dev_w, w + n);
    uint64_t one = 1;
    ssize_t rc = write(c->wake_fd, &one, sizeof one);   /* EAGAIN: the worker is already due to wake */
    (void)rc;
}

/* When device frame ``rd`` was captured (the worker's): the newest stamp at or before it, paced on
 * at the device's rate; when the stamps that far back are rewritten already (more than ADC_STAMPS
 * periods waited: a backlog, a stalled worker), the oldest one kept, paced back (the periods
 * between came one after another). 0 before any stamp. A slot is read as a seqlock's reader
 * reads: the slot, then the count again; a slot the callback may have rewritten meanwhile makes
 * the search start over (it gives up after a few tries: 0). */
static int64_t cap_adc_of(Capture *c, int64_t rd) {
    for (int tries = 0; tries < 4; tries++) {
        int64_t kk = ld_acq(&c->adc_count), oldest_idx = -1, oldest_ns = 0;
        int torn = 0;
        for (int64_t j = kk - 1; j >= 0 && j > kk - ADC_STAMPS; j--) {
            int64_t idx = ld_rlx(&c->adc_index[j % ADC_STAMPS]), ns = ld_rlx(&c->adc_ns[j % ADC_STAMPS]);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (ld_rlx(&c->adc_count) - j >= ADC_STAMPS) {   /* the callback is at this slot again */
                torn = 1;
                break;
            }
            if (idx <= rd)
                return ns + (rd - idx) * 1000000000LL / c->device_rate_hz;
            oldest_idx = idx;
            oldest_ns = ns;
        }
        if (torn)
            continue;
        return oldest_idx < 0 ? 0 : oldest_ns - (oldest_idx - rd) * 1000000000LL / c->device_rate_hz;
    }
    return 0;
}

/* One device period (either host's, host_rec_fn): ``frames`` device frames, the first captured
 * at ``adc_ns`` (CLOCK_MONOTONIC); the device dropped frames before them (``overflow``). */
static void cap_period(void *user, const int16_t *input, int64_t frames, int64_t adc_ns, int overflow) {
    Capture *c = user;
    int64_t k = ld_rlx(&c->callbacks);
    st_rlx(&c->callback_ns[k % CB_STAMPS], now_ns());
    st_rel(&c->callbacks, k + 1);
    if (overflow)
        st_rlx(&c->input_overflows, c->input_overflows + 1);
    if (input)
        cap_push(c, input, frames, adc_ns);
}

static int cap_callback(const void *input, void *output, unsigned long frames, const PaStreamCallbackTimeInfo *ti,
                        PaStreamCallbackFlags flags, void *user) {
    Capture *c = user;
    /* when the block's first frame was captured: PortAudio's ADC time, as an age (its clock need not
     * be CLOCK_MONOTONIC); the stream's latency and a period when the device gives none */
    double age_s = ti ? ti->currentTime - ti->inputBufferAdcTime : 0.0;
    if (!(age_s > 0 && age_s < 2))
        age_s = c->stream_latency_s + (double)c->period_frames / (double)c->device_rate_hz;
    cap_period(c, input, (int64_t)frames, now_ns() - (int64_t)(age_s * 1e9), (flags & paInputOverflow) != 0);
    return paContinue;
}

/* One AEC call on ``blocks`` 10 ms blocks from the AEC-rate FIFOs (EchoCanceller.process's middle):
 * statistics, the guard; the cancelled blocks land in out_aec. 0, or -1 when the call
 * failed (counted; the caller passes the mic through). */
static int cap_aec(Capture *c, PyObject *aec, int64_t blocks, int far_uncertain) {
    int64_t n = blocks * AEC_BLOCK;
    memcpy(c->near_buf.buf, c->near_aec.buf, (size_t)n * 2);
    memcpy(c->far_buf.buf, c->far_aec.buf, (size_t)n * 2);
    static PyObject *process_name = NULL;
    if (!process_name && !(process_name = PyUnicode_InternFromString("process")))
        return -1;
    int64_t t0 = thread_cpu_ns();
    PyObject *res = PyObject_CallMethodObjArgs(aec, process_name, PyTuple_GET_ITEM(c->near_views, blocks - 1),
                                               PyTuple_GET_ITEM(c->far_views, blocks - 1), NULL);
    c->aec_call_cpu_ns += thread_cpu_ns() - t0;
    Py_buffer v;
    if (res && PyObject_GetBuffer(res, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        if (v.itemsize != 2 || v.len < n * 2) {
            PyBuffer_Release(&v);
            PyErr_SetString(PyExc_ValueError, "the echo canceller returned fewer frames than it was given");
        } else {
            const int16_t *o = v.buf;
            for (int64_t i = 0; i < n; i++)
                c->out_f[i] = (float)o[i];
            PyBuffer_Release(&v);
        }
    }
    Py_XDECREF(res);
    if (PyErr_Occurred()) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        Py_XSETREF(c->last_error, value);
        c->errors += 1;
        return -1;
    }
    const int16_t *near = c->near_aec.buf, *far = c->far_aec.buf;
    guard_t *g = &c->guard;
    for (int64_t b = 0; b < blocks; b++) {
        const int16_t *fb = far + b * AEC_BLOCK, *nb = near + b * AEC_BLOCK;
        float *ob = c->out_f + b * AEC_BLOCK;
        double fe = 0, oe = 0, ne = 0;
        for (int i = 0; i < AEC_BLOCK; i++) {
            fe += (double)fb[i] * fb[i];
            oe += (double)ob[i] * ob[i];
            ne += (double)nb[i] * nb[i];
        }
        double far_rms = sqrt(fe / AEC_BLOCK);
        c->blocks += 1;
        if (far_rms > g->active_rms) {
            c->near_energy += ne;
            c->out_energy += oe;
            c->far_active_blocks += 1;
            c->window_near += ne;
            c->window_out += oe;
            c->window_blocks += 1;
            if (c->window_blocks == g->erle_window_blocks) {
                if (c->window_near > 0) {
                    c->erle_windows[c->erle_count % ERLE_WINDOWS] =
                        10 * log10(c->window_near / (c->window_out > 1.0 ? c->window_out : 1.0));
                    c->erle_count += 1;
                }
                c->window_near = c->window_out = 0;
                c->window_blocks = 0;
            }
        }
        double peak = 0;
        for (int64_t i = 0; i < g->window_blocks; i++)
            peak = c->far_rms[i] > peak ? c->far_rms[i] : peak;
        /* a reference that may not be what the speaker played (zeros for missing frames) says nothing
         * of the far end's level: the window keeps its loudest instead */
        c->far_rms[c->far_pos] = far_uncertain && peak > far_rms ? peak : far_rms;
        c->far_pos = (c->far_pos + 1) % g->window_blocks;
        if (c->guard_on) {
            double now_peak = 0;
            for (int64_t i = 0; i < g->window_blocks; i++)
                now_peak = c->far_rms[i] > now_peak ? c->far_rms[i] : now_peak;
            if (guard_attenuate(g, sqrt(oe / AEC_BLOCK), now_peak, sqrt(ne / AEC_BLOCK))) {
                for (int i = 0; i < AEC_BLOCK; i++)
                    ob[i] *= (float)g->attenuation;
                c->guarded_blocks += 1;
            }
        }
    }
    for (int64_t i = 0; i < n; i++)
        c->out_aec[i] = (int16_t)c->out_f[i];
    return 0;
}

/* step(far_take, aec, extras) -> chunks: the worker's batch, with the GIL: every device frame
 * the callback wrote since the last step, at most chunk_cap a chunk, each chunk:
 *   device -> 24 kHz (raw); the far end: far_take(len(raw)) (FarEnd.take; with far_adc,
 *   far_take(len(raw), adc_ns): when raw's first frame was captured), or silence;
 *   with aec: device -> 24 kHz -> AEC_RATE_HZ and far -> AEC_RATE_HZ into the FIFOs, one aec.process call on their
 *   whole 10 ms blocks, the statistics and the guard, AEC_RATE_HZ -> 24 kHz (cancelled);
 *   then extras(raw, far, cancelled) if given (it writes the mic ring itself), else the level taps
 *   and one mic ring write (the realtime process wakes once per chunk). */
static PyObject *Capture_step(Capture *c, PyObject *args) {
    PyObject *far_take = Py_None, *aec = Py_None, *extras = Py_None;
    if (!PyArg_ParseTuple(args, "|OOO", &far_take, &aec, &extras))
        return NULL;
    if (aec != Py_None && !c->aec_on) {
        PyErr_SetString(PyExc_ValueError, "this capture was made without echo cancellation");
        return NULL;
    }
    if (extras != Py_None && !c->has_bufs) {
        PyErr_SetString(PyExc_ValueError, "extras needs the capture's buffers");
        return NULL;
    }
    uint64_t drained;
    ssize_t rc = read(c->wake_fd, &drained, sizeof drained);
    (void)rc;
    long chunks = 0;
    int64_t cpu0 = thread_cpu_ns();
    for (;;) {
        int64_t rd = ld_rlx(&c->dev_r), avail = ld_acq(&c->dev_w) - rd;
        if (avail <= 0)
            break;
        int64_t t0 = now_ns();
        int64_t n = imin(avail, c->chunk_cap);
        int64_t pos = rd & (c->dev_cap - 1), first = imin(n, c->dev_cap - pos);
        memcpy(c->chunk, c->dev + pos, (size_t)first * 2);
        if (n > first)
            memcpy(c->chunk + first, c->dev, (size_t)(n - first) * 2);
        st_rel(&c->dev_r, rd + n);
        chunks += 1;
        int16_t *raw;
        int64_t n24;
        if (c->to24) {
            n24 = soxr_chunk(c->to24, c->chunk, n, c->raw24, c->raw24_cap);
            raw = c->raw24;
        } else {
            raw = c->chunk;
            n24 = n;
        }
        /* when this chunk's first 24 kHz frame was captured: its first device frame's stamp, less
         * what soxr holds back (the device frames before it, less the 24 kHz frames made before it) */
        int64_t adc = cap_adc_of(c, rd);
        if (c->to24)
            adc -= frames_at_ns(rd, c->device_rate_hz) - frames_at_ns(c->out24_total, RATE_HZ);
        c->out24_total += n24;
        /* the far end, frame for frame with the 24 kHz mic */
        const int16_t *far = NULL;
        Py_buffer fv;
        int have_fv = 0;
        int far_uncertain = 0;
        if (n24 > 0 && Py_IS_TYPE(far_take, &FarEndType)) {   /* the C far end: no Python call */
            FarEnd *fe = (FarEnd *)far_take;
            int64_t t_far = thread_cpu_ns();
            if (far_end_take(fe, n24, adc) == n24)
                far = fe->buf;
            far_uncertain = fe->uncertain;
            c->far_take_cpu_ns += thread_cpu_ns() - t_far;
        } else if (far_take != Py_None && n24 > 0) {
            /* a FarEnd (its take(), then its ``uncertain``), or a plain function of the frame count */
            static PyObject *take_name = NULL;
            if (!take_name && !(take_name = PyUnicode_InternFromString("take")))
                return NULL;
            int64_t t_far = thread_cpu_ns();
            PyObject *fn = PyObject_HasAttr(far_take, take_name) ? PyObject_GetAttr(far_take, take_name)
                                                                : (Py_INCREF(far_take), far_take);
            PyObject *arr = !fn ? NULL
                          : c->far_adc ? PyObject_CallFunction(fn, "LL", (long long)n24, (long long)adc)
                                       : PyObject_CallFunction(fn, "L", (long long)n24);
            Py_XDECREF(fn);
            if (arr && fn != far_take) {
                PyObject *u = PyObject_GetAttrString(far_take, "uncertain");
                far_uncertain = u ? PyObject_IsTrue(u) == 1 : 0;
                Py_XDECREF(u);
                PyErr_Clear();   /* a reader without the flag: certain */
            }
            c->far_take_cpu_ns += thread_cpu_ns() - t_far;
            if (arr && PyObject_GetBuffer(arr, &fv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
                if (fv.itemsize == 2 && fv.len >= n24 * 2) {
                    far = fv.buf;
                    have_fv = 1;
                } else {
                    PyBuffer_Release(&fv);
                }
            }
            Py_XDECREF(arr);
            if (PyErr_Occurred()) {   /* a bug in the reader: counted, the far end is silence for this chunk */
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                PyErr_NormalizeException(&type, &value, &tb);
                Py_XDECREF(type);
                Py_XDECREF(tb);
                Py_XSETREF(c->last_error, value);
                c->errors += 1;
            }
        }
        int16_t *far_copy = c->has_bufs ? (int16_t *)c->farv_buf.buf : NULL;
        if (far_copy && n24 > 0) {
            if (far)
                memcpy(far_copy, far, (size_t)n24 * 2);
            else
                memset(far_copy, 0, (size_t)n24 * 2);
        }
        if (have_fv)
            PyBuffer_Release(&fv);
        const int16_t *final = raw;
        int64_t nfinal = n24;
        if (aec != Py_None) {
            if (far_uncertain && c->guard_on)   /* EchoCanceller.process(..., far_uncertain) */
                guard_hold(&c->guard, c->guard.hold_blocks_min);
            int64_t mn = soxr_chunk(c->near_up, raw, n24, c->near_aec_tmp, c->aec_cap);
            fifo_push(&c->near_aec, c->near_aec_tmp, mn);
            int64_t m = soxr_chunk(c->far_up, far_copy, n24, c->far_aec_tmp, c->aec_cap);
            fifo_push(&c->far_aec, c->far_aec_tmp, m);
            int64_t blocks = imin(imin(c->near_aec.len, c->far_aec.len) / AEC_BLOCK, MAX_AEC_BLOCKS);
            nfinal = 0;
            if (blocks > 0) {
                if (cap_aec(c, aec, blocks, far_uncertain) == 0) {
                    nfinal = soxr_chunk(c->down, c->out_aec, blocks * AEC_BLOCK, c->out24,
                                        c->raw24_cap + MAX_AEC_BLOCKS * AEC_BLOCK);
                    final = c->out24;
                } else {
                    final = raw;   /* the canceller failed: the mic goes through as is */
                    nfinal = n24;
                }
                fifo_drop(&c->near_aec, blocks * AEC_BLOCK);
                fifo_drop(&c->far_aec, blocks * AEC_BLOCK);
            }
        }
        if (extras != Py_None) {
            memcpy(c->raw_buf.buf, raw, (size_t)n24 * 2);
            memcpy(c->outv_buf.buf, final, (size_t)nfinal * 2);
            /* with echo cancellation, what it made is what goes on, even none of it (no whole 10 ms
             * block yet): never the mic's own frames in its place */
            PyObject *res = PyObject_CallFunction(extras, "LLO", (long long)n24, (long long)nfinal,
                                                  aec != Py_None ? Py_True : Py_False);
            if (!res)
                return NULL;   /* extras is the process's own code: its exception is the caller's */
            Py_DECREF(res);
        } else {
            tap_push(&c->tap_in, raw, n24);
            tap_push(&c->tap_out, final, nfinal);
            ring_write(&c->mic, final, nfinal);
        }
        c->busy_ns += now_ns() - t0;
        c->steps += 1;
        double held = c->to24 ? soxr_delay(c->to24) : 0.0;
        if (aec != Py_None)
            held += (soxr_delay(c->near_up) + (double)c->near_aec.len) * RATE_HZ / AEC_RATE_HZ + soxr_delay(c->down);
        c->held_sum += held;
        c->held_max = held > c->held_max ? held : c->held_max;
        c->held_steps += 1;
    }
    c->step_cpu_ns += thread_cpu_ns() - cpu0;
    return PyLong_FromLong(chunks);
}

/* take_held_back() -> (mean ms, max ms, steps) of what the steps since the last take held back of the
 * mic (see held_sum); (None, None, 0) without a step. The worker's thread, as step. */
static PyObject *Capture_take_held_back(Capture *c, PyObject *unused) {
    (void)unused;
    int64_t steps = c->held_steps;
    PyObject *res = steps == 0 ? Py_BuildValue("(OOL)", Py_None, Py_None, 0LL)
                               : Py_BuildValue("(ddL)", c->held_sum * 1000.0 / RATE_HZ / (double)steps,
                                               c->held_max * 1000.0 / RATE_HZ, (long long)steps);
    if (res) {
        c->held_sum = c->held_max = 0.0;
        c->held_steps = 0;
    }
    return res;
}

/* wait(timeout_s) -> bool: sleep until the callback has written frames (the GIL released). */
static PyObject *Capture_wait(Capture *c, PyObject *args) {
    double timeout;
    if (!PyArg_ParseTuple(args, "d", &timeout))
        return NULL;
    if (ld_acq(&c->dev_w) != ld_rlx(&c->dev_r))
        Py_RETURN_TRUE;
    struct pollfd p = {c->wake_fd, POLLIN, 0};
    int rc;
    uint64_t drained;
    Py_BEGIN_ALLOW_THREADS
    rc = poll(&p, 1, (int)(timeout * 1000));
    if (rc > 0 && read(c->wake_fd, &drained, sizeof drained) < 0)   /* a wake-up for frames already taken */
        rc = 0;
    Py_END_ALLOW_THREADS
    if (rc < 0 && errno != EINTR)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(ld_acq(&c->dev_w) != ld_rlx(&c->dev_r));
}

/* push(frames, adc_ns=None): device frames as the callback would write them (tests, and a WAV mic),
 * the first captured at adc_ns (CLOCK_MONOTONIC; None: as if the last was captured just now). */
static PyObject *Capture_push(Capture *c, PyObject *args) {
    PyObject *obj, *adc = Py_None;
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "O|O", &obj, &adc))
        return NULL;
    if (c->running) {
        PyErr_SetString(PyExc_RuntimeError, "the device stream writes this capture: stop it first");
        return NULL;
    }
    long long adc_ns = 0;
    if (adc != Py_None && (adc_ns = PyLong_AsLongLong(adc)) == -1 && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(obj, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (v.itemsize != 2) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_TypeError, "an int16 buffer is needed");
        return NULL;
    }
    int64_t n = v.len / 2;
    cap_push(c, v.buf, n, adc != Py_None ? (int64_t)adc_ns : now_ns() - n * 1000000000LL / c->device_rate_hz);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

static PyObject *Capture_open(Capture *c, PyObject *args) {
    if (host_open(args, c->device_rate_hz, 0, cap_callback, NULL, cap_period, c, &c->host, &c->running,
                  &c->stream_latency_s, "capture") < 0)
        return NULL;
    return PyFloat_FromDouble(c->stream_latency_s);
}

static PyObject *Capture_close(Capture *c, PyObject *unused) {
    host_end(&c->host, 0);
    c->running = 0;
    Py_RETURN_NONE;
}

static PyObject *Capture_is_active(Capture *c, PyObject *unused) {
    return PyBool_FromLong(host_is_active(&c->host));
}

/* ERLE per second of far-end speech, oldest first (EchoCanceller.erle_windows_db). */
static PyObject *Capture_erle_windows(Capture *c, PyObject *unused) {
    int64_t n = imin(c->erle_count, ERLE_WINDOWS);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (int64_t i = 0; list && i < n; i++)
        PyList_SET_ITEM(list, (Py_ssize_t)i, PyFloat_FromDouble(c->erle_windows[(c->erle_count - n + i) % ERLE_WINDOWS]));
    return list;
}

static PyObject *Capture_take_error(Capture *c, PyObject *unused) {
    PyObject *e = c->last_error ? c->last_error : Py_None;
    Py_INCREF(e);
    return e;
}

static PyMethodDef Capture_methods[] = {
    {"step", (PyCFunction)Capture_step, METH_VARARGS,
     "step(far_take=None, aec=None, extras=None) -> chunks: process what the callback wrote (see the source)."},
    {"wait", (PyCFunction)Capture_wait, METH_VARARGS, "wait(timeout_s) -> bool: frames are waiting (GIL released)."},
    {"push", (PyCFunction)Capture_push, METH_VARARGS,
     "push(int16 frames, adc_ns=None): device frames, as the callback writes them, first captured at adc_ns."},
    {"open", (PyCFunction)Capture_open, METH_VARARGS,
     "open(device_index, rate_hz, frames_per_buffer) -> input latency s: start the device stream."},
    {"close", (PyCFunction)Capture_close, METH_NOARGS, "Stop and close the device stream."},
    {"is_active", (PyCFunction)Capture_is_active, METH_NOARGS, "The device stream runs."},
    {"erle_windows", (PyCFunction)Capture_erle_windows, METH_NOARGS, "ERLE per second of far-end speech, dB."},
    {"last_error", (PyCFunction)Capture_take_error, METH_NOARGS, "The latest exception from far_take or the AEC call."},
    {"take_held_back", (PyCFunction)Capture_take_held_back, METH_NOARGS,
     "(mean ms, max ms, steps) the steps since the last take held the mic back; then starts afresh."},
    {NULL, NULL, 0, NULL},
};

static PyObject *Capture_getattro(Capture *c, PyObject *name) {
    const char *s = PyUnicode_AsUTF8(name);
    if (!s) {
        PyErr_Clear();
        return PyObject_GenericGetAttr((PyObject *)c, name);
    }
#define INT_FIELD(f) if (strcmp(s, #f) == 0) return PyLong_FromLongLong(ld_rlx(&c->f));
    INT_FIELD(callbacks) INT_FIELD(input_overflows) INT_FIELD(dev_dropped) INT_FIELD(blocks)
    INT_FIELD(far_active_blocks) INT_FIELD(guarded_blocks) INT_FIELD(errors) INT_FIELD(busy_ns) INT_FIELD(steps)
    INT_FIELD(step_cpu_ns) INT_FIELD(aec_call_cpu_ns) INT_FIELD(far_take_cpu_ns)
#undef INT_FIELD
    if (strcmp(s, "near_energy") == 0)
        return PyFloat_FromDouble(c->near_energy);
    if (strcmp(s, "out_energy") == 0)
        return PyFloat_FromDouble(c->out_energy);
    if (strcmp(s, "talks") == 0)
        return PyLong_FromLongLong(c->guard.talks);
    if (strcmp(s, "holds") == 0)
        return PyLong_FromLongLong(c->guard.holds);
    if (strcmp(s, "held_blocks") == 0)
        return PyLong_FromLongLong(c->guard.held_blocks);
    if (strcmp(s, "erl_db") == 0)
        return PyFloat_FromDouble(c->guard.erl_db);
    if (strcmp(s, "erl_blocks") == 0)
        return PyLong_FromLongLong(c->guard.erl_blocks);
    if (strcmp(s, "guard_state") == 0)
        return PyUnicode_FromString(c->guard_on ? (const char *[]){"quiet", "echo", "talk"}[c->guard.state] : "off");
    if (strcmp(s, "wake_fd") == 0)
        return PyLong_FromLong(c->wake_fd);
    if (strcmp(s, "host") == 0)
        return PyUnicode_FromString(host_name(&c->host));
    return PyObject_GenericGetAttr((PyObject *)c, name);
}

static PyTypeObject CaptureType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "engine.audio._native.Capture",
    .tp_basicsize = sizeof(Capture),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The capture path in C: a PortAudio input callback writes the device's frames to a ring; "
              "step() (the worker, once per chunk) resamples, cancels the echo and writes the mic ring.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Capture_init,
    .tp_dealloc = (destructor)Capture_dealloc,
    .tp_methods = Capture_methods,
    .tp_getattro = (getattrofunc)Capture_getattro,
};

/* ------------------------------------------------------------------ module */
/* pulse_device(alsa_name) -> str | None: the PulseAudio device a PortAudio device of that ALSA
 * name opens on ("" the server's default), or None when PortAudio opens it (the host rule above,
 * REALTALK_NATIVE_HOST included). */
static PyObject *py_pulse_device(PyObject *mod, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    char out[256];
    if (!host_is_pulse(name, out, sizeof out))
        Py_RETURN_NONE;
    return PyUnicode_FromString(out);
}

static PyObject *py_versions(PyObject *mod, PyObject *unused) {
#ifdef REALTALK_PULSE
    return Py_BuildValue("{s:s,s:s,s:s}", "portaudio", Pa_GetVersionText(), "soxr", soxr_version(),
                         "pulse", pa_get_library_version());
#else
    return Py_BuildValue("{s:s,s:s}", "portaudio", Pa_GetVersionText(), "soxr", soxr_version());
#endif
}

/* window_levels(buffer, pos, count, window) -> (energies, peaks): LevelTap's measure of ``count``
 * windows of ``window`` int16 frames from ``pos`` in a circular buffer (the console's meters),
 * in one call where numpy makes four. */
static PyObject *py_window_levels(PyObject *mod, PyObject *args) {
    PyObject *obj;
    Py_ssize_t pos, count, w;
    if (!PyArg_ParseTuple(args, "Onnn", &obj, &pos, &count, &w))
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(obj, &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    Py_ssize_t cap = v.len / 2;
    if (v.itemsize != 2 || w <= 0 || count < 0 || pos < 0 || pos >= cap || count * w > cap) {
        PyBuffer_Release(&v);
        PyErr_SetString(PyExc_ValueError, "window_levels: an int16 buffer, and windows that fit in it");
        return NULL;
    }
    const int16_t *buf = v.buf;
    PyObject *energies = PyList_New(count), *peaks = PyList_New(count);
    for (Py_ssize_t k = 0; energies && peaks && k < count; k++) {
        double e = 0;
        int peak = 0;
        Py_ssize_t at = (pos + k * w) % cap, first = w < cap - at ? w : cap - at;
        for (Py_ssize_t i = 0; i < w; i++) {   /* the window, wrapping at the buffer's end at most once */
            int x = buf[i < first ? at + i : i - first];
            e += (double)x * x;
            peak = abs(x) > peak ? abs(x) : peak;
        }
        PyList_SET_ITEM(energies, k, PyFloat_FromDouble(e));
        PyList_SET_ITEM(peaks, k, PyFloat_FromDouble(peak));
    }
    PyBuffer_Release(&v);
    if (!energies || !peaks) {
        Py_XDECREF(energies);
        Py_XDECREF(peaks);
        return NULL;
    }
    return Py_BuildValue("(NN)", energies, peaks);
}

static PyMethodDef module_methods[] = {
    {"window_levels", py_window_levels, METH_VARARGS,
     "window_levels(buffer, pos, count, window) -> (energies, peaks): the level meter's windows."},
    {"talk_guard", py_talk_guard, METH_VARARGS,
     "talk_guard(constants, loud_db, blocks) -> (decisions, counts): the C TalkGuard over (out, far_peak, near, hold) blocks."},
    {"pulse_device", py_pulse_device, METH_VARARGS,
     "pulse_device(alsa_name) -> str or None: the PulseAudio device it opens on, if libpulse's."},
    {"versions", py_versions, METH_NOARGS, "The PortAudio and libsoxr this module was linked with."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "engine.audio._native",
    "realtalk's audio periods in C: the playback renderer and the capture path behind PortAudio callbacks.",
    -1, module_methods,
};

/* The renderer's table for Python: (state names, event names, ((state, event, next), ...)), so
 * tests/test_playback.py can check it is engine/playback/renderer.py's TRANSITIONS. */
static PyObject *render_table(void) {
    PyObject *states = PyTuple_New(R_STATES), *events = PyTuple_New(R_EVENTS), *rows = PyList_New(0);
    if (!states || !events || !rows)
        goto fail;
    for (int i = 0; i < R_STATES; i++)
        PyTuple_SET_ITEM(states, i, PyUnicode_FromString(R_STATE_NAMES[i]));
    for (int i = 0; i < R_EVENTS; i++)
        PyTuple_SET_ITEM(events, i, PyUnicode_FromString(R_EVENT_NAMES[i]));
    for (int i = 0; i < R_STATES; i++)
        for (int e = 0; e < R_EVENTS; e++)
            if (R_NEXT[i][e] != NO_STATE) {
                PyObject *row = Py_BuildValue("(iii)", i, e, (int)R_NEXT[i][e]);
                if (!row || PyList_Append(rows, row) < 0) {
                    Py_XDECREF(row);
                    goto fail;
                }
                Py_DECREF(row);
            }
    PyObject *table = Py_BuildValue("(NNN)", states, events, PyList_AsTuple(rows));
    Py_DECREF(rows);
    return table;
fail:
    Py_XDECREF(states);
    Py_XDECREF(events);
    Py_XDECREF(rows);
    return NULL;
}

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&RendererType) < 0 || PyType_Ready(&CaptureType) < 0 || PyType_Ready(&FarEndType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    Py_INCREF(&RendererType);
    Py_INCREF(&CaptureType);
    Py_INCREF(&FarEndType);
    if (PyModule_AddObject(m, "Renderer", (PyObject *)&RendererType) < 0 ||
        PyModule_AddObject(m, "Capture", (PyObject *)&CaptureType) < 0 ||
        PyModule_AddObject(m, "FarEnd", (PyObject *)&FarEndType) < 0 ||
        PyModule_AddIntConstant(m, "RATE_HZ", RATE_HZ) < 0 ||
        PyModule_AddIntConstant(m, "LAYOUT_VERSION", LAYOUT_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "MAX_AEC_BLOCKS", MAX_AEC_BLOCKS) < 0 ||
        PyModule_AddIntConstant(m, "AEC_RATE_HZ", AEC_RATE_HZ) < 0 ||
        PyModule_AddStringConstant(m, "source_sha", NATIVE_SOURCE_SHA) < 0 ||
        PyModule_AddObject(m, "RENDER_TABLE", render_table()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
