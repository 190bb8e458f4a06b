// realtalk console: the listen player and the talk capture, as AudioWorklet processors.
// The same cores run in a ScriptProcessor where AudioWorklet is missing (this file is then
// loaded as a plain script too). No allocation in the render path but the talk blocks posted.
// The audio comes from and goes to the page's audio worker (audio-worker.js) through a
// MessagePort handed over as {port}; stats go to the page on the node's own port.
"use strict";

// Plays 24 kHz float samples pushed by the page at the context's rate (linear interpolation
// when that is not 24 kHz). The console sends them in chunks of about 120 ms, every 120 ms.
// Waits for startFrames (240 ms: two chunks) before playing, and again after
// running dry (counted as underrun frames; each time the wait grows 50 ms, up to 400 ms, so a
// jittery network or a busy page costs one gap, not one a second); cuts a backlog over
// maxFrames back to startFrames (counted as dropped). Reports the RMS of each 20 ms window
// it played, in dBFS.
class ListenCore {
  constructor(rate) {
    this.buf = new Float32Array(1 << 17); this.mask = (1 << 17) - 1;
    this.w = 0; this.r = 0; this.step = 24000 / rate;
    this.startFrames = 5760; this.maxFrames = 15360;    // 240 ms to start, 640 ms at most (24 kHz frames)
    this.underruns = 0;
    this.playing = false; this.started = false;
    this.played = 0; this.underrunFrames = 0; this.droppedFrames = 0; this.received = 0;
    this.win = Math.max(1, Math.round(rate * 0.02)); this.acc = 0; this.accN = 0; this.env = [];
  }
  push(x) {
    const cap = this.mask + 1;
    for (let i = 0; i < x.length; i++) this.buf[(this.w + i) & this.mask] = x[i];
    this.w += x.length; this.received += x.length;
    if (this.w - this.r > cap - 2) { const cut = this.w - this.r - this.startFrames; this.r += cut; this.droppedFrames += cut; }
  }
  render(out) {
    let avail = this.w - this.r;
    if (avail > this.maxFrames || (!this.started && avail > this.startFrames)) {
      // a backlog (the sender's clock runs fast, or a burst): cut back; before the first sample
      // played it is the context starting up, not a gap anyone hears (not counted)
      const cut = Math.floor(avail - this.startFrames); this.r += cut; avail -= cut;
      if (this.started) this.droppedFrames += cut;
    }
    if (!this.playing && avail >= this.startFrames) { this.playing = true; this.started = true; }
    const buf = this.buf, mask = this.mask;
    for (let i = 0; i < out.length; i++) {
      let v = 0;
      if (this.playing) {
        if (this.w - this.r >= 2) {
          const i0 = Math.floor(this.r), f = this.r - i0;
          v = buf[i0 & mask] * (1 - f) + buf[(i0 + 1) & mask] * f;
          this.r += this.step; this.played++;
        } else {   // ran dry: wait longer before playing again
          this.playing = false; this.underruns++;
          this.startFrames = Math.min(9600, this.startFrames + 1200); this.maxFrames = this.startFrames + 9600;
        }
      }
      if (!this.playing && this.started) this.underrunFrames++;
      out[i] = v;
      this.acc += v * v;
      if (++this.accN === this.win) {
        const rms = Math.sqrt(this.acc / this.win);
        this.env.push(rms > 0 ? Math.max(-90, 20 * Math.log10(rms)) : -90);
        this.acc = 0; this.accN = 0;
      }
    }
  }
  stats() {
    const env = this.env; this.env = [];
    return { op: "stats", played: this.played, received: this.received, underrunFrames: this.underrunFrames,
      underruns: this.underruns, bufferMs: this.startFrames / 24,
      droppedFrames: this.droppedFrames, queuedFrames: this.w - this.r, env };
  }
}

// Collects the mic's float samples into int16 blocks of about 20 ms at the context's rate.
class TalkCore {
  constructor(rate) { this.n = Math.max(128, Math.round(rate * 0.02)); this.block = new Int16Array(this.n); this.k = 0; }
  push(x, post) {
    for (let i = 0; i < x.length; i++) {
      const s = Math.max(-1, Math.min(1, x[i]));
      this.block[this.k++] = s < 0 ? s * 32768 : s * 32767;
      if (this.k === this.n) { post(this.block); this.block = new Int16Array(this.n); this.k = 0; }
    }
  }
}

if (typeof registerProcessor === "function") {
  class ListenPlayer extends AudioWorkletProcessor {
    constructor() {
      super();
      this.core = new ListenCore(sampleRate);
      this.blocks = 0;
      this.port.onmessage = (e) => {
        if (e.data && e.data.port) e.data.port.onmessage = (m) => this.core.push(m.data);   // the worker's
        else this.core.push(e.data);
      };
    }
    process(inputs, outputs) {
      const out = outputs[0];
      this.core.render(out[0]);
      for (let c = 1; c < out.length; c++) out[c].set(out[0]);
      if (++this.blocks % 40 === 0) this.port.postMessage(this.core.stats());   // about every 200 ms
      return true;
    }
  }
  class TalkCapture extends AudioWorkletProcessor {
    constructor() {
      super();
      this.core = new TalkCore(sampleRate);
      this.out = this.port;
      this.port.onmessage = (e) => { if (e.data && e.data.port) this.out = e.data.port; };   // the worker's
    }
    process(inputs, outputs) {
      const input = inputs[0];
      if (input && input[0]) this.core.push(input[0], (b) => this.out.postMessage(b, [b.buffer]));
      for (const ch of outputs[0] || []) ch.fill(0);
      return true;
    }
  }
  registerProcessor("listen-player", ListenPlayer);
  registerProcessor("talk-capture", TalkCapture);
} else if (typeof window !== "undefined") {
  window.ListenCore = ListenCore;
  window.TalkCore = TalkCore;
}
