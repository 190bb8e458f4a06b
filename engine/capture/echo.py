"""Echo handling in the capture process: what the speaker played must not come back as
the user's voice.

* :class:`FarEnd` reads the reference ring, which the playback process fills with every
  frame it hands to the device (silence and truncation included), in step with the mic:
  n mic frames take n reference frames, zero-padded when playback is behind, and a
  lasting backlog is cut (clock drift, start-up), so the delay between reference and
  echo stays steady and bounded for the canceller's delay estimator.
* :class:`EchoCanceller` is WebRTC's audio processing module (pywebrtc-audio, AEC3) at
  48 kHz, fed 10 ms blocks of mic (near end) and reference (far end), in and out at the
  engine's 24 kHz through soxr. It also measures its echo return loss enhancement (ERLE).
* :class:`EchoGate` is half-duplex: the mic is silent while the model is audible.

Everything here runs in the audio callback: no logging, no raising, counters only.
"""
from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from engine.audio.ring import Ring, SampleFifo
from engine.pcm import RATE_HZ

AEC_RATE_HZ = 48000
AEC_BLOCK_FRAMES = AEC_RATE_HZ // 100      # WebRTC processes 10 ms blocks
FAR_ACTIVE_DBFS = -50.0                    # a reference block louder than this counts for ERLE
ERLE_WINDOW_BLOCKS = 100                   # one ERLE figure per second of far-end speech
GUARD_WINDOW_BLOCKS = 50                   # 500 ms of far-end history: longer than any echo path
GUARD_ATTENUATION = 0.03                   # -30 dB on blocks the guard takes for residual echo
TALK_DB = -40.0                            # a block above this (re the far end's recent peak) may be a talker
TALK_ONSET_BLOCKS = 15                     # 150 ms above TALK_DB in a row: a talker (AEC3's leaks are shorter)
TALK_HANG_BLOCKS = 30                      # a talker's blocks pass 300 ms past their last one above TALK_DB


class FarEnd:
    """The consumer side of the reference ring, aligned with the mic frame for frame.

    Any cut or inserted silence in the reference moves the echo's delay, and the canceller
    leaks until it has found the new one (on a loaded machine: echo the server takes for
    speech). So the reference is cut only at the start (to line up with the first mic
    frames) and when the backlog has stayed above ``max_backlog_frames`` for
    ``patience_takes`` callbacks in a row (clock drift), never for a late callback; and
    ``reserve_frames`` (20 ms) are held back in the ring, so a playback callback up to that
    late still finds its frames waiting and nothing is zero-padded. Holding back delays the
    reference by the reserve, which the echo's own delay (the device's output plus input
    latency, 60 ms on PulseAudio here, tens of ms on any PortAudio device) covers: the far end
    still leads its echo.
    """

    def __init__(self, ring: Ring, max_backlog_frames: int = RATE_HZ // 4, patience_takes: int = 50,
                 reserve_frames: int = RATE_HZ // 50) -> None:
        self.ring = ring
        self.reserve_frames = reserve_frames
        self.max_backlog_frames = max_backlog_frames
        self.patience_takes = patience_takes
        self.buf = np.zeros(RATE_HZ, dtype=np.int16)   # one second: more than any callback asks for
        self.missing_frames = 0                        #: reference frames playback had not produced yet
        self.skipped_frames = 0                        #: reference frames dropped to keep the delay bounded
        self.held_frames = 0                           #: silence handed out once, while the reserve was built
        self._aligned = False
        self._over_takes = 0

    def take(self, frames: int) -> np.ndarray:
        """The ``frames`` reference frames that go with the next ``frames`` mic frames (a view)."""
        frames = min(frames, len(self.buf))
        excess = self.ring.read_available - frames      # what stays in the ring after this take
        if not self._aligned:
            if excess < self.reserve_frames:
                # building the reserve (the first takes, before any echo): hand out what is above
                # it and silence before it, once; not counted as missing
                out = self.buf[:frames]
                held = min(frames, self.reserve_frames - excess)
                out[:held] = 0
                self.ring.read_into(out[held:])
                self.held_frames += held
                return out
            self._aligned = True
            if excess > self.reserve_frames:
                self.skipped_frames += self.ring.skip(excess - self.reserve_frames)
        elif excess > self.max_backlog_frames:
            self._over_takes += 1
            if self._over_takes >= self.patience_takes:
                self._over_takes = 0
                self.skipped_frames += self.ring.skip(excess - self.reserve_frames)
        else:
            self._over_takes = 0
        out = self.buf[:frames]
        got = self.ring.read_into(out)
        if got < frames:
            out[got:] = 0
            self.missing_frames += frames - got
        return out


class TalkGuard:
    """The residual-echo guard behind AEC3: per 10 ms block, whether to attenuate it. Pure.

    States: ``QUIET`` (the far end silent for the last 500 ms), ``ECHO`` (the far end active and
    no talker found), ``TALK`` (a talker is speaking over the far end). Inputs per block: the
    cancelled block's RMS and the loudest far-end block RMS of the last 500 ms (``far_peak``).

    | state       | block                                        | next  | block is   |
    |-------------|----------------------------------------------|-------|------------|
    | any         | far_peak not active                          | QUIET | passed     |
    | QUIET       | far_peak active                              | ECHO  | (as ECHO)  |
    | ECHO        | above ``loud_db``                            | ECHO  | passed     |
    | ECHO        | above TALK_DB, TALK_ONSET_BLOCKS in a row    | TALK  | passed     |
    | ECHO        | otherwise                                    | ECHO  | attenuated |
    | TALK        | above TALK_DB                                | TALK  | passed     |
    | TALK        | below, within TALK_HANG_BLOCKS of the last   | TALK  | passed     |
    | TALK        | below, longer                                | ECHO  | attenuated |

    Why: AEC3 leaves echo 50 dB down once converged, but leaks for tens of ms after the echo
    path moves; a threshold on level alone (``loud_db``, the old guard) cannot tell such a leak
    from someone talking more softly than the model's echo, and so lost soft double talk. A
    talker lasts: 150 ms above TALK_DB (well above a converged residual) makes one, whose
    speech then passes until 300 ms after it last rose above it. The cost: the first 150 ms of
    soft double talk are attenuated (a loud talker passes at once).
    """

    QUIET, ECHO, TALK = "quiet", "echo", "talk"

    def __init__(self, loud_db: float, active_rms: float) -> None:
        self.loud_ratio = 10 ** (loud_db / 20)
        self.talk_ratio = 10 ** (TALK_DB / 20)
        self.active_rms = active_rms
        self.state = self.QUIET
        self.run_blocks = 0       # blocks above TALK_DB in a row (ECHO)
        self.hang_blocks = 0      # blocks since the last one above TALK_DB (TALK)
        self.talks = 0            #: ECHO -> TALK transitions (talkers found over the far end)

    def attenuate(self, out_rms: float, far_peak: float) -> bool:
        """Advance by one block; True if this block is taken for residual echo."""
        if far_peak <= self.active_rms:
            self.state, self.run_blocks, self.hang_blocks = self.QUIET, 0, 0
            return False
        above = out_rms >= self.talk_ratio * far_peak
        if self.state == self.TALK:
            if above:
                self.hang_blocks = 0
                return False
            self.hang_blocks += 1
            if self.hang_blocks <= TALK_HANG_BLOCKS:
                return False
            self.state, self.run_blocks = self.ECHO, 0
            return True
        self.state = self.ECHO
        self.run_blocks = self.run_blocks + 1 if above else 0
        if self.run_blocks >= TALK_ONSET_BLOCKS:
            self.state, self.hang_blocks = self.TALK, 0
            self.talks += 1
            return False
        return out_rms < self.loud_ratio * far_peak


class EchoCanceller:
    """WebRTC AEC3 at 48 kHz behind a 24 kHz interface; ``process`` keeps the stream's length.

    Behind AEC3 sits a residual-echo guard (:class:`TalkGuard`): while the far end has been
    active within the last 500 ms, an output block is attenuated by 30 dB unless it is louder
    than ``guard_db`` below the loudest recent far-end block, or belongs to a talker (150 ms
    above TALK_DB in a row, then until 300 ms after it last was). AEC3 removes the echo; the
    guard catches what leaks for tens of ms while AEC3 re-converges after the echo path changes
    (a device's latency jumps). ``guard_db=None`` turns it off.
    ERLE is measured on AEC3's output, before the guard.
    """

    def __init__(self, stream_delay_ms: int = 0, guard_db: float | None = -6.0) -> None:
        from engine.audio.devices import resample_stream
        from pywebrtc_audio import EchoCanceller as WebRtcAec
        self._aec = WebRtcAec(sample_rate=AEC_RATE_HZ, num_channels=1, stream_delay_ms=stream_delay_ms)
        self._up_near = resample_stream(RATE_HZ, AEC_RATE_HZ)
        self._up_far = resample_stream(RATE_HZ, AEC_RATE_HZ)
        self._down = resample_stream(AEC_RATE_HZ, RATE_HZ)
        self._near = SampleFifo(AEC_RATE_HZ)    # 48 kHz, waiting for whole 10 ms blocks
        self._far = SampleFifo(AEC_RATE_HZ)
        self._out = np.zeros(AEC_RATE_HZ, dtype=np.int16)
        self._far_rms = np.zeros(GUARD_WINDOW_BLOCKS, dtype=np.float64)   # recent far-end block levels
        self._far_pos = 0
        self._active_rms = 32768.0 * 10 ** (FAR_ACTIVE_DBFS / 20)
        self.guard = TalkGuard(guard_db, self._active_rms) if guard_db is not None else None
        self.guarded_blocks = 0
        # ERLE over blocks where the far end is active: 10*log10(sum near^2 / sum out^2)
        self.near_energy = 0.0
        self.out_energy = 0.0
        self.far_active_blocks = 0
        # ERLE per second of far-end speech: the median is the steady state, unmoved by the
        # re-convergence after an echo-path jump (which the guard covers, and which would
        # dominate one ratio over the whole session)
        self._window_near = 0.0
        self._window_out = 0.0
        self._window_blocks = 0
        self.erle_windows_db: deque[float] = deque(maxlen=600)
        self.blocks = 0
        self.errors = 0                                #: process() calls that failed (the mic went through as is)
        self.last_error: BaseException | None = None   #: the latest such failure, for the main thread to report
        self.busy_ns = 0

    def process(self, near: np.ndarray, far: np.ndarray) -> np.ndarray:
        """Cancel ``far``'s echo from ``near`` (both 24 kHz int16, same length). Never raises: a
        failure counts in ``errors``, is kept in ``last_error`` and returns ``near`` uncancelled."""
        t0 = time.perf_counter_ns()
        try:
            self._near.push(self._up_near.resample_chunk(near))
            self._far.push(self._up_far.resample_chunk(far))
            blocks = min(self._near.length, self._far.length) // AEC_BLOCK_FRAMES
            n = blocks * AEC_BLOCK_FRAMES
            near_all, far_all = self._near.head(n), self._far.head(n)
            if blocks:
                # AEC3 takes several 10 ms blocks in one call; the statistics are per block
                out_f = np.asarray(self._aec.process(near_all, far_all), dtype=np.float32).reshape(blocks, -1)
                far_f = far_all.reshape(blocks, -1).astype(np.float32)
                near_f = near_all.reshape(blocks, -1).astype(np.float32)
                far_rms_all = np.sqrt(np.einsum("ij,ij->i", far_f, far_f) / AEC_BLOCK_FRAMES)
                out_energy_all = np.einsum("ij,ij->i", out_f, out_f)
                near_energy_all = np.einsum("ij,ij->i", near_f, near_f)
            for b in range(blocks):
                self.blocks += 1
                far_rms = float(far_rms_all[b])
                out_energy = float(out_energy_all[b])
                if far_rms > self._active_rms:
                    near_energy = float(near_energy_all[b])
                    self.near_energy += near_energy
                    self.out_energy += out_energy
                    self.far_active_blocks += 1
                    self._window_near += near_energy
                    self._window_out += out_energy
                    self._window_blocks += 1
                    if self._window_blocks == ERLE_WINDOW_BLOCKS:
                        if self._window_near > 0:
                            self.erle_windows_db.append(10 * math.log10(self._window_near / max(self._window_out, 1.0)))
                        self._window_near = self._window_out = 0.0
                        self._window_blocks = 0
                self._far_rms[self._far_pos] = far_rms
                self._far_pos = (self._far_pos + 1) % GUARD_WINDOW_BLOCKS
                if self.guard is not None and \
                        self.guard.attenuate((out_energy / AEC_BLOCK_FRAMES) ** 0.5, float(self._far_rms.max())):
                    out_f[b] *= GUARD_ATTENUATION
                    self.guarded_blocks += 1
            if blocks:
                self._out[:n] = out_f.reshape(-1)
            self._near.drop(n)
            self._far.drop(n)
            out = self._down.resample_chunk(self._out[:n]) if n else np.zeros(0, dtype=np.int16)
        except Exception as exc:  # counted and kept; capture's main thread reports it on engine.error
            self.errors += 1
            self.last_error = exc
            out = near
        self.busy_ns += time.perf_counter_ns() - t0
        return out

    def erle_db(self) -> float | None:
        """Echo return loss enhancement, steady state: the median over seconds of far-end speech
        (before the first whole second: the ratio so far)."""
        return self._erle_percentiles_db()[1]

    def erle_total_db(self) -> float | None:
        """One ratio over every block where the far end was active, re-convergence included."""
        if self.far_active_blocks == 0 or self.near_energy <= 0:
            return None
        return round(10 * math.log10(self.near_energy / max(self.out_energy, 1.0)), 1)

    def _erle_percentiles_db(self) -> tuple[float | None, float | None]:
        """(10th percentile, median) of the per-second ERLE, in one pass; before the first whole
        second (None, the ratio so far)."""
        if not self.erle_windows_db:
            return None, self.erle_total_db()
        p10, p50 = np.percentile(np.fromiter(self.erle_windows_db, np.float64), [10, 50]).tolist()
        return round(p10, 1), round(p50, 1)

    def stats(self) -> dict[str, float | int | None]:
        erle_p10_db, erle_db = self._erle_percentiles_db()
        return {"erle_db": erle_db, "erle_total_db": self.erle_total_db(), "erle_p10_db": erle_p10_db,
                "far_active_ms": self.far_active_blocks * 10, "blocks": self.blocks,
                "guarded_ms": self.guarded_blocks * 10,
                "talkers": self.guard.talks if self.guard is not None else 0, "errors": self.errors,
                "cpu_ms": round(self.busy_ns / 1e6, 1)}


class EchoGate:
    """Half-duplex: silence the mic while the speaker ring holds audio not yet heard."""

    def __init__(self, speaker: Ring | None, tail_s: float = 0.25) -> None:
        self.speaker = speaker
        self.tail_s = tail_s             # keep muting this long after the ring runs empty (device latency, room)
        self.muted_frames = 0
        self._last_audible = -1e9

    def model_audible(self) -> bool:
        s = self.speaker
        if s is None:
            return False
        now = time.monotonic()
        if s.read_available > 0:
            self._last_audible = now
        return now - self._last_audible < self.tail_s

    def apply(self, pcm: np.ndarray) -> np.ndarray:
        if self.model_audible():
            self.muted_frames += len(pcm)
            return np.zeros_like(pcm)
        return pcm
