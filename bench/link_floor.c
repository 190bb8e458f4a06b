/* The link's floor in C (bench/floor.py, "link-c"): the work of bench/floor.py's Python link floor
 * with no Python at all, to show what a native API link could cost at best. Over loopback TCP to
 * `python -m bench.floor link-server` (plain WebSocket, no TLS, no compression):
 *  - every 20 ms (a timerfd), one `input_audio_buffer.append` of 20 ms of 24 kHz PCM16, base64 in
 *    the same JSON text as the engine builds, sent as one masked text frame (a fresh mask from
 *    getrandom, as a client must);
 *  - every delta the server sends (100 ms of audio every 100 ms), its frame parsed and its
 *    `delta` base64-decoded.
 * It prints "ready" once the WebSocket is open and runs until its stdin closes.
 *
 *     gcc -O2 -o link_floor bench/link_floor.c && ./link_floor PORT
 */
#define _GNU_SOURCE   /* memmem */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#define CHUNK_FRAMES 480           /* 20 ms at 24 kHz */
#define RX_CAP (1 << 20)

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static int8_t B64D[256];

static size_t b64enc(const uint8_t *in, size_t n, char *out) {
    size_t o = 0, i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = B64[(v >> 6) & 63];
        out[o++] = B64[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = B64[v >> 18];
        out[o++] = B64[(v >> 12) & 63];
        out[o++] = i + 1 < n ? B64[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    return o;
}

static size_t b64dec(const char *in, size_t n, uint8_t *out) {
    size_t o = 0;
    uint32_t v = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int8_t d = B64D[(uint8_t)in[i]];
        if (d < 0)
            continue;   /* '=' and anything else */
        v = v << 6 | (uint32_t)d;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(v >> bits);
        }
    }
    return o;
}

static int send_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: link_floor PORT\n");
        return 2;
    }
    memset(B64D, -1, sizeof B64D);
    for (int i = 0; i < 64; i++)
        B64D[(uint8_t)B64[i]] = (int8_t)i;
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        perror("link_floor: connect");
        return 1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    const char *req = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    static uint8_t rx[RX_CAP];
    size_t have = 0;
    if (send_all(fd, (const uint8_t *)req, strlen(req)) < 0)
        return 1;
    for (;;) {   /* the upgrade's answer, up to its blank line */
        ssize_t k = recv(fd, rx + have, RX_CAP - have, 0);
        if (k <= 0)
            return 1;
        have += (size_t)k;
        uint8_t *end = memmem(rx, have, "\r\n\r\n", 4);
        if (end) {
            if (memcmp(rx, "HTTP/1.1 101", 12) != 0) {
                fprintf(stderr, "link_floor: the upgrade was refused\n");
                return 1;
            }
            size_t used = (size_t)(end + 4 - rx);
            memmove(rx, rx + used, have - used);
            have -= used;
            break;
        }
    }
    int16_t pcm[CHUNK_FRAMES];
    uint32_t seed = 1;
    for (int i = 0; i < CHUNK_FRAMES; i++) {
        seed = seed * 1103515245u + 12345u;
        pcm[i] = (int16_t)((int32_t)(seed >> 16) % 2000 - 1000);
    }
    static const char head[] = "{\"type\":\"input_audio_buffer.append\",\"audio\":\"";
    static char text[4096];
    static uint8_t frame[4200];
    static uint8_t audio[1 << 16];
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC);
    struct itimerspec every = {{0, 20000000}, {0, 20000000}};
    timerfd_settime(tfd, 0, &every, NULL);
    printf("ready\n");
    fflush(stdout);
    struct pollfd fds[3] = {{tfd, POLLIN, 0}, {fd, POLLIN, 0}, {0, POLLIN, 0}};
    long decoded = 0;
    for (;;) {
        if (poll(fds, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (fds[2].revents) {   /* stdin closed (or anything on it): done */
            fprintf(stderr, "link_floor: %ld bytes of audio decoded\n", decoded);
            return 0;
        }
        if (fds[0].revents & POLLIN) {
            uint64_t ticks;
            if (read(tfd, &ticks, sizeof ticks) < 0)
                return 1;
            size_t n = sizeof head - 1;
            memcpy(text, head, n);
            n += b64enc((const uint8_t *)pcm, sizeof pcm, text + n);
            text[n++] = '"';
            text[n++] = '}';
            uint8_t mask[4];
            if (getrandom(mask, 4, 0) != 4)
                return 1;
            frame[0] = 0x81;   /* FIN, text */
            frame[1] = 0x80 | 126;
            frame[2] = (uint8_t)(n >> 8);
            frame[3] = (uint8_t)n;
            memcpy(frame + 4, mask, 4);
            for (size_t i = 0; i < n; i++)
                frame[8 + i] = (uint8_t)text[i] ^ mask[i & 3];
            if (send_all(fd, frame, n + 8) < 0)
                return 1;
        }
        if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            ssize_t k = recv(fd, rx + have, RX_CAP - have, 0);
            if (k <= 0)
                return 1;
            have += (size_t)k;
            for (;;) {   /* every whole frame received (the server's: unmasked) */
                if (have < 2)
                    break;
                uint64_t len = rx[1] & 127;
                size_t hdr = 2;
                if (len == 126) {
                    if (have < 4)
                        break;
                    len = (uint64_t)rx[2] << 8 | rx[3];
                    hdr = 4;
                } else if (len == 127) {
                    if (have < 10)
                        break;
                    len = 0;
                    for (int i = 0; i < 8; i++)
                        len = len << 8 | rx[2 + i];
                    hdr = 10;
                }
                if (have < hdr + len)
                    break;
                const char *p = (const char *)rx + hdr;
                const char *d = memmem(p, len, "\"delta\": \"", 10);
                if (d) {
                    d += 10;
                    const char *q = memchr(d, '"', len - (size_t)(d - p));
                    if (q)
                        decoded += (long)b64dec(d, (size_t)(q - d), audio);
                }
                memmove(rx, rx + hdr + len, have - hdr - len);
                have -= hdr + len;
            }
        }
    }
}
