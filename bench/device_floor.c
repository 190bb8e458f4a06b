/* The devices' floor in C (bench/floor.py, "input_c" and "output_c"): the native backend's device
 * path on a PulseAudio server with nothing behind it, to show what the engine's two audio processes
 * cost at the least before they do any work. One libpulse stream, opened as engine/audio/_native.c's
 * pu_open opens it (the same flags, buffer attributes and threaded mainloop), in a process of its own:
 *  - `mic`: a record stream whose fragment is a period; its read callback peeks and drops what the
 *    server sends (the engine gathers it into periods and hands each to its worker);
 *  - `speaker`: a playback stream asking for half a period at a time, its target the engine's
 *    opening one (two blocks, and the sink's 7 ms twice); its write callback hands over silence.
 * No resampling, no echo canceller, no ring, no Python: those are the engine's work and the audio
 * floor's (bench/floor.py's PyAudio sides). It prints "ready" once the stream runs and runs until its
 * stdin closes.
 *
 *     gcc -O2 -o device_floor bench/device_floor.c -lpulse && ./device_floor mic 48000 20 micsink.monitor
 */
#include <pulse/pulseaudio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SINK_LATENCY_MS 7        /* _native.c: PULSE_SINK_LATENCY_MS */
#define BLOCKS_PER_PERIOD 2      /* _native.c: PULSE_BLOCKS_PER_PERIOD */

static size_t block_bytes;

static void on_read(pa_stream *s, size_t nbytes, void *user) {
    (void)nbytes;
    (void)user;
    for (;;) {
        const void *data = NULL;
        size_t n = 0;
        if (pa_stream_peek(s, &data, &n) < 0 || n == 0)
            return;
        pa_stream_drop(s);
    }
}

static void on_write(pa_stream *s, size_t nbytes, void *user) {
    (void)user;
    while (nbytes >= block_bytes) {
        void *buf = NULL;
        size_t n = block_bytes;
        if (pa_stream_begin_write(s, &buf, &n) < 0 || !buf || n < block_bytes) {
            if (buf)
                pa_stream_cancel_write(s);
            return;
        }
        memset(buf, 0, block_bytes);
        if (pa_stream_write(s, buf, block_bytes, NULL, 0, PA_SEEK_RELATIVE) < 0)
            return;
        nbytes -= block_bytes;
    }
}

static void on_state(pa_context *c, void *ml) {
    (void)c;
    pa_threaded_mainloop_signal(ml, 0);
}

static void on_stream_state(pa_stream *s, void *ml) {
    (void)s;
    pa_threaded_mainloop_signal(ml, 0);
}

static int fail(const char *what, pa_context *ctx) {
    fprintf(stderr, "device_floor: %s: %s\n", what, ctx ? pa_strerror(pa_context_errno(ctx)) : "");
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 5 || (strcmp(argv[1], "mic") != 0 && strcmp(argv[1], "speaker") != 0)) {
        fprintf(stderr, "usage: device_floor mic|speaker RATE_HZ PERIOD_MS PULSE_DEVICE\n");
        return 2;
    }
    int speaker = strcmp(argv[1], "speaker") == 0;
    uint32_t rate = (uint32_t)atoi(argv[2]);
    uint32_t period_frames = rate * (uint32_t)atoi(argv[3]) / 1000;
    uint32_t frames = speaker ? (period_frames + BLOCKS_PER_PERIOD - 1) / BLOCKS_PER_PERIOD : period_frames;
    block_bytes = frames * 2;
    pa_threaded_mainloop *ml = pa_threaded_mainloop_new();
    pa_context *ctx = pa_context_new(pa_threaded_mainloop_get_api(ml), "realtalk device floor");
    pa_context_set_state_callback(ctx, on_state, ml);
    pa_threaded_mainloop_lock(ml);
    if (pa_threaded_mainloop_start(ml) != 0 || pa_context_connect(ctx, NULL, PA_CONTEXT_NOFLAGS, NULL) != 0)
        return fail("cannot reach the PulseAudio server", ctx);
    pa_context_state_t cs;
    while ((cs = pa_context_get_state(ctx)) != PA_CONTEXT_READY) {
        if (!PA_CONTEXT_IS_GOOD(cs))
            return fail("cannot reach the PulseAudio server", ctx);
        pa_threaded_mainloop_wait(ml);
    }
    pa_sample_spec spec = {PA_SAMPLE_S16LE, rate, 1};
    pa_stream *s = pa_stream_new(ctx, speaker ? "speaker" : "mic", &spec, NULL);
    if (!s)
        return fail("cannot make a stream", ctx);
    pa_stream_set_state_callback(s, on_stream_state, ml);
    pa_buffer_attr attr;
    memset(&attr, 0xff, sizeof attr);
    pa_stream_flags_t flags = PA_STREAM_ADJUST_LATENCY | PA_STREAM_INTERPOLATE_TIMING | PA_STREAM_AUTO_TIMING_UPDATE;
    int rc;
    if (speaker) {
        attr.tlength = (uint32_t)(2 * block_bytes + 2 * (rate * SINK_LATENCY_MS / 1000) * 2);
        attr.minreq = (uint32_t)block_bytes;
        attr.prebuf = (uint32_t)(BLOCKS_PER_PERIOD * block_bytes);
        pa_stream_set_write_callback(s, on_write, NULL);
        rc = pa_stream_connect_playback(s, argv[4], &attr, flags, NULL, NULL);
    } else {
        attr.fragsize = (uint32_t)block_bytes;
        pa_stream_set_read_callback(s, on_read, NULL);
        rc = pa_stream_connect_record(s, argv[4], &attr, flags);
    }
    pa_stream_state_t ss;
    while (rc == 0 && (ss = pa_stream_get_state(s)) != PA_STREAM_READY) {
        if (!PA_STREAM_IS_GOOD(ss))
            rc = -1;
        else
            pa_threaded_mainloop_wait(ml);
    }
    pa_threaded_mainloop_unlock(ml);
    if (rc != 0)
        return fail(argv[4], ctx);
    printf("ready\n");
    fflush(stdout);
    char sink[256];
    while (read(0, sink, sizeof sink) > 0)   /* until the bench closes our stdin */
        ;
    pa_threaded_mainloop_stop(ml);
    pa_stream_disconnect(s);
    pa_stream_unref(s);
    pa_context_disconnect(ctx);
    pa_context_unref(ctx);
    pa_threaded_mainloop_free(ml);
    return 0;
}
