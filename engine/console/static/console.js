// realtalk debug console: plain JS, no build step. One WebSocket brings the bus (binary batches
// of the bus's own msgpack messages, decoded by wire.js); the page keeps bounded windows of
// everything it draws.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const MAX_EVENTS = 2000;          // the inspector's window
const MAX_EVENT_ROWS = 600;       // rows in the DOM at once
const MAX_LEVEL_POINTS = 30000;   // per lane (10 min at 20 ms)
const MAX_MARKERS = 3000;
const MAX_TURNS = 400;
const FIREHOSE = ["server.response.output_audio.delta", "playback.position", "playout.position",
  "capture.levels", "playback.levels", "server.rate_limits.updated", "model.transcript.delta",
  "model.text.delta", "server.response.output_audio_transcript.delta", "server.response.output_text.delta",
  "user.transcript.delta", "conversation.history", "console.listen", "console.mic.source"];

// ------------------------------------------------------------------ state
const state = {
  live: true,                 // false while looking back at a finished session
  offsetMs: null,             // engine CLOCK_MONOTONIC (ms) minus performance.now()
  lanes: { mic: [], sent: [], spk: [] },   // {t (ms, engine mono), db, peak}
  markers: [],                // {t, kind, label}
  events: [],                 // {topic, body} (bounded)
  eventCount: 0,
  paused: false,
  turns: new Map(),           // key -> turn object
  turnOrder: [],
  items: new Map(),           // assistant item_id -> {firstSampleT, responseId}
  firstDelta: new Set(),      // response ids whose first delta is marked
  underruns: 0, errors: 0, micOpen: true, budgetUsd: null, sessionUsd: 0, lastErle: null,
  realtimeState: null, supervisorState: null,
  lookback: null,             // {key, wavStartT, audio}
  counts: { levels: 0, batches: 0, drawn: 0 },
  lastDrawT: 0,
  // listen: what the page played of the speaker (env: RMS dBFS per 20 ms window played)
  listen: { on: false, engineOn: false, received: 0, played: 0, underrunFrames: 0, droppedFrames: 0,
    serverDropped: 0, notListened: 0, queuedFrames: 0, env: [] },
  // talk: the page's mic as the engine's; source is capture's (capture.source)
  talk: { on: false, sentFrames: 0, rateHz: null, dropped: 0, writtenFrames: 0, source: "device", sourceMsg: null },
  // GPT-Live (docs/live.md): the voice API, the model's continuous output track (segments: when it
  // played; speech: where the model spoke on it, from playback.levels), the latest raw transcript
  // fragment per speaker, a latency.turn waiting for its reply's turn
  api: null,
  track: { segments: [], speech: [], now: "–" },
  lastFragment: { user: null, model: null },
  lastContext: null,
  pendingLatency: null,
  contexts: 0,
};
window.consoleState = state;  // for tests and the curious

function nowMono() {
  if (state.lookback) {
    const lb = state.lookback;
    if (lb.audio && lb.wavStartT != null && lb.audio.src) return lb.wavStartT + lb.audio.currentTime * 1000 + windowMs() / 2;
    return lb.endT;
  }
  return state.offsetMs == null ? 0 : performance.now() + state.offsetMs;
}
function windowMs() { return Number($("window-s").value) * 1000; }
function ms(ns) { return typeof ns === "number" ? ns / 1e6 : null; }
function fmt(v, digits = 0, unit = "") { return v == null || Number.isNaN(v) ? "–" : v.toFixed(digits) + unit; }
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; }

// ------------------------------------------------------------------ markers and levels
function mark(t, kind, label) {
  if (t == null) return;
  state.markers.push({ t, kind, label });
  if (state.markers.length > MAX_MARKERS) state.markers.splice(0, state.markers.length - MAX_MARKERS);
}
function pushLevels(lane, startNs, periodMs, rms, peak) {
  const arr = state.lanes[lane];
  const t0 = ms(startNs);
  if (t0 == null || !Array.isArray(rms)) return;
  for (let i = 0; i < rms.length; i++) arr.push({ t: t0 + i * periodMs, db: rms[i], peak: peak ? peak[i] : rms[i] });
  if (arr.length > MAX_LEVEL_POINTS) arr.splice(0, arr.length - MAX_LEVEL_POINTS);
  state.counts.levels += rms.length;
}

// ------------------------------------------------------------------ conversation
function turn(key, kind, who) {
  let t = state.turns.get(key);
  if (t) return t;
  const node = el("div", "turn " + kind);
  const whoEl = el("div", "who", who);
  const textEl = el("div", "text");
  const numsEl = el("div", "nums");
  node.append(whoEl, textEl, numsEl);
  t = { key, kind, node, whoEl, textEl, numsEl, text: "", nums: {}, t: null };
  node.addEventListener("click", () => { if (state.lookback && t.t != null) seekTo(t.t); });
  state.turns.set(key, t);
  state.turnOrder.push(key);
  const conv = $("conversation");
  const stick = conv.scrollTop + conv.clientHeight >= conv.scrollHeight - 30;
  conv.append(node);
  if (state.turnOrder.length > MAX_TURNS) {
    const old = state.turnOrder.shift();
    const o = state.turns.get(old);
    if (o) o.node.remove();
    state.turns.delete(old);
  }
  if (stick) conv.scrollTop = conv.scrollHeight;
  return t;
}
function setText(t, text) { t.text = text; t.textEl.textContent = text; t.frags = 0; }
function setNums(t, patch) {
  Object.assign(t.nums, patch);
  const n = t.nums, parts = [];
  if (n.latency) parts.push(n.latency);
  if (n.usd != null) parts.push(`<b>$${n.usd.toFixed(4)}</b>` + (n.sessionUsd != null ? ` (session $${n.sessionUsd.toFixed(4)}${state.budgetUsd ? ` of $${state.budgetUsd}` : ""})` : ""));
  if (n.erle != null) parts.push(`ERLE <b>${n.erle.toFixed(1)} dB</b>`);
  if (n.underruns) parts.push(`<b style="color:var(--bad)">${n.underruns} underrun${n.underruns > 1 ? "s" : ""}</b>`);
  if (n.stretch != null && n.stretch !== 0) parts.push(`stretch <b>${n.stretch.toFixed(0)} ms</b>`);
  if (n.status && n.status !== "completed") parts.push(`<b style="color:var(--bad)">${n.status}${n.reason ? " (" + n.reason + ")" : ""}</b>`);
  if (n.timeline) parts.push(n.timeline);
  if (n.placed) parts.push(n.placed);
  if (n.extra) parts.push(n.extra);
  t.numsEl.innerHTML = parts.join(" · ");
}
function modelTurn(b) {
  const key = "r:" + (b.response_id || b.item_id);
  const fresh = !state.turns.has(key);
  const t = turn(key, "model", "model");
  if (fresh && state.pendingLatency) { setNums(t, { latency: state.pendingLatency }); state.pendingLatency = null; }
  if (b.item_id) { t.itemId = b.item_id; state.items.set(b.item_id, Object.assign(state.items.get(b.item_id) || {}, { key })); }
  if (t.t == null) t.t = ms(b.mono_ns);
  return t;
}
function turnOfItem(itemId) {
  const it = state.items.get(itemId);
  return it && it.key ? state.turns.get(it.key) : null;
}

// ------------------------------------------------------------------ one bus message
const handlers = {
  "capture.levels": (b) => { pushLevels("mic", b.start_mono_ns, b.period_ms, b.mic_dbfs, b.mic_peak_dbfs);
    pushLevels("sent", b.start_mono_ns, b.period_ms, b.sent_dbfs, b.sent_peak_dbfs); },
  "playback.levels": (b) => { pushLevels("spk", b.start_mono_ns, b.period_ms, b.dbfs, b.peak_dbfs); trackSpeech(b); },
  "capture.source": (b) => setSource(b),
  "playback.listen": (b) => { state.listen.engineOn = !!b.on; state.listen.notListened = b.not_listened_frames; },
  // on GPT-Live these come with the turn's fragments, after the speech: marked where the speech was
  "user.speech.started": (b) => { mark(ms(b.audio_start_mono_ns ?? b.mono_ns), "speech", "speech started");
    const t = turn("u:" + b.item_id, "user", "user (speaking)"); t.t = ms(b.mono_ns); if (!t.text) setText(t, "…"); },
  "user.speech.stopped": (b) => { mark(ms(b.audio_end_mono_ns ?? b.mono_ns), "speech", "speech stopped");
    const t = state.turns.get("u:" + b.item_id); if (t) t.whoEl.textContent = "user (spoken)"; },
  "user.transcript.delta": (b) => { const t = turn("u:" + b.item_id, "user", "user (spoken)");
    if (b.turn_id) { fragment(t, "user", b); return; }
    setText(t, (t.text === "…" ? "" : t.text) + (b.text || "")); },
  "user.transcript.done": (b) => { const t = turn("u:" + b.item_id, "user", "user (spoken)"); if (t.t == null) t.t = ms(b.mono_ns);
    if (b.turn_id) { turnDone(t, b); return; }
    setText(t, b.text || "(no transcript)"); if (b.usd != null) setNums(t, { extra: `transcription $${b.usd.toFixed(4)}` }); },
  "user.text": (b) => { const t = turn("u:" + b.item_id, "user", "user (typed" + (b.source ? " by " + b.source : "") + ")");
    if (t.t == null) t.t = ms(b.mono_ns); setText(t, b.text || ""); },
  "system.text": (b) => {
    if (b.kind) {   // GPT-Live: the placed append, already shown by its live.context
      const c = state.lastContext;
      if ((b.request_id && state.turns.has("x:" + b.request_id)) || (c && c.text === b.text)) return;
      liveContext({ kind: b.kind, text: b.text, request_id: b.request_id, mono_ns: b.mono_ns }); return;
    }
    const t = turn("s:" + b.item_id, "system", "system context" + (b.source ? " from " + b.source : ""));
    if (t.t == null) t.t = ms(b.mono_ns); setText(t, b.text || ""); },
  "live.transcript.fragment": (b) => { setApi("live"); if (b.speaker === "user" || b.speaker === "model") state.lastFragment[b.speaker] = b; },
  "live.context": (b) => { setApi("live"); liveContext(b); },
  "model.text.delta": (b) => { const t = modelTurn(b); t.streamed = (t.streamed || "") + (b.text || ""); setText(t, t.text + (b.text || "")); },
  "model.transcript.delta": (b) => { const t = modelTurn(b); t.streamed = (t.streamed || "") + (b.text || "");
    if (b.turn_id) { fragment(t, "model", b); return; }
    setText(t, t.text + (b.text || "")); },
  "model.text.done": (b) => { const t = modelTurn(b); setText(t, b.text || t.text); },
  "model.transcript.done": (b) => { const t = modelTurn(b); if (b.turn_id) { turnDone(t, b); return; }
    if (!b.truncated) setText(t, b.text || t.text); else showCut(t, b.text, null); },
  "model.transcript.truncated": (b) => { const t = turnOfItem(b.item_id); if (t) showCut(t, null, b.text_received, b.audio_end_ms); },
  "server.response.created": (b) => { mark(ms(b.mono_ns), "response", "response created"); },
  "server.response.output_audio.delta": (b) => firstDelta(b.response_id, b.mono_ns),
  "server.response.output_text.delta": (b) => firstDelta(b.response_id, b.mono_ns),
  "playout.started": (b) => { const t0 = ms(b.first_sample_mono_ns) ?? ms(b.mono_ns);
    if (b.item_id == null) { setApi("live"); trackStarted(t0); mark(t0, "played", "the model's track starts"); return; }   // GPT-Live: one track
    mark(t0, "played", "first sample played");
    if (b.item_id) state.items.set(b.item_id, Object.assign(state.items.get(b.item_id) || {}, { firstSampleT: t0 })); },
  "playout.stopped": (b) => { if (b.item_id == null) trackStopped(ms(b.mono_ns));
    const t = turnOfItem(b.item_id) || (b.response_id && state.turns.get("r:" + b.response_id));
    if (b.stretch_ms) mark(ms(b.mono_ns), "stretch", `stretch ${b.stretch_ms > 0 ? "+" : ""}${b.stretch_ms} ms`);
    if (t) setNums(t, { stretch: b.stretch_ms }); },
  "playout.underrun": (b) => { state.underruns++; $("underruns").textContent = state.underruns;
    mark(ms(b.mono_ns), "underrun", "underrun");
    const t = turnOfItem(b.item_id); if (t) setNums(t, { underruns: (t.nums.underruns || 0) + 1 }); },
  "playout.interrupted": (b) => {
    mark(ms(b.interrupt_mono_ns) ?? ms(b.mono_ns), "bargein", `barge-in (${b.reason || "?"})`);
    const it = state.items.get(b.item_id);
    if (it && it.firstSampleT != null && b.played_ms != null) mark(it.firstSampleT + b.played_ms, "cut", `cut at ${b.played_ms} ms`);
    const t = turnOfItem(b.item_id) || (b.response_id && state.turns.get("r:" + b.response_id));
    if (t) { t.cut = { played: b.played_ms, received: b.received_ms, reason: b.reason }; showCut(t, null, null); }
  },
  "playback.flushed": (b) => mark(ms(b.flush_mono_ns) ?? ms(b.mono_ns), "cut", "fade to silence"),
  "latency.turn": (b) => {
    if (b.api === "live") { liveLatency(b); return; }
    const text = b.trigger === "speech" ? "speech end" : "request";
    const lat = `${text} → first delta <b>${fmt(b.to_first_delta_ms)} ms</b> → speaker <b>${fmt(b.to_speaker_ms)} ms</b>`;
    $("latency").textContent = b.to_speaker_ms != null ? `${fmt(b.to_first_delta_ms)} / ${fmt(b.to_speaker_ms)} ms` : `${fmt(b.to_first_delta_ms)} ms`;
    const t = state.turns.get("r:" + b.response_id); if (t) setNums(t, { latency: lat });
  },
  "response.done": (b) => { const t = b.response_id ? state.turns.get("r:" + b.response_id) : null;
    if (t) setNums(t, { usd: b.usd, sessionUsd: b.session_usd, status: b.status, reason: b.reason, erle: state.lastErle });
    if (b.session_usd != null) setCost(b.session_usd); },
  "cost.session": (b) => { setCost(b.usd);
    if (b.seconds != null) { setApi("live");   // GPT-Live bills by the second of the session
      $("cost-seconds").textContent = ` · ${Number(b.seconds).toFixed(0)} s` + (b.per_minute_usd != null ? ` at $${b.per_minute_usd}/min` : ""); } },
  "session.config": (b) => { const m = b.session && b.session.model; if (typeof m === "string") setApi(m.startsWith("gpt-live") ? "live" : "realtime"); },
  "engine.budget": (b) => { state.budgetUsd = b.budget_usd; setCost(state.sessionUsd); if (b.message) banner(b.message); },
  "capture.echo": (b) => { if (b.erle_db != null) { state.lastErle = b.erle_db; $("erle").textContent = b.erle_db.toFixed(1) + " dB"; }
    else if (b.mode) $("erle").textContent = b.mode; },
  "input.mic": (b) => setMic(b.open),
  "tool.call": (b) => {
    if (b.delegation) {   // GPT-Live: the model delegated a task; the engine gave it to a bus tool
      const t = turn("c:" + b.call_id, "tool", b.registered === false ? "delegation (no tool registered)" : `delegation to ${b.name}`);
      if (t.t == null) t.t = ms(b.mono_ns); setText(t, `request: ${JSON.stringify(b.request || "")}` + (b.name ? `\n${b.name}(${b.arguments || ""})` : "")); return;
    }
    const t = turn("c:" + b.call_id, "tool", `tool call ${b.name}` + (b.registered === false ? " (no handler registered)" : ""));
    if (t.t == null) t.t = ms(b.mono_ns); setText(t, `${b.name}(${b.arguments || ""})`); },
  "cmd.tool.result": (b) => { const t = turn("c:" + b.call_id, "tool", "tool call");
    const out = typeof b.output === "string" ? b.output : JSON.stringify(b.output);
    setNums(t, { extra: `→ <b>${escapeHtml(out).slice(0, 400)}</b> answered by ${escapeHtml(b.pub || "?")}` }); },
  "engine.status": (b) => {
    if (b.api === "live") setApi("live");
    if ((b.pub || "").startsWith("supervisor")) { state.supervisorState = b.state; if (b.cost_usd != null) setCost(b.cost_usd); }
    else if ((b.pub || "").startsWith("realtime")) state.realtimeState = b.state + (b.close_code ? " " + b.close_code : "");
    const s = [state.supervisorState, state.realtimeState].filter(Boolean).join(" · ");
    const e = $("engine-state"); e.textContent = "engine " + (s || "…");
    e.className = "pill " + (/disconnected|reconnecting|stopping/.test(s) ? "warn" : (/ready|connected/.test(s) ? "ok" : ""));
  },
  "engine.error": (b) => {
    if (b.benign) return;
    state.errors++; $("errors").textContent = state.errors;
    const t = turn("e:" + state.errors + ":" + (b.mono_ns || 0), "error", `error from ${b.source || b.pub || "engine"} (${b.code || "?"})`);
    t.t = ms(b.mono_ns); setText(t, b.message || JSON.stringify(b));
    banner(`${b.source || "engine"}: ${b.message || b.code}`);
  },
  // bus protocol 2: the engine acks a command at once (queued), and reports what it did on cmd.done
  "cmd.ack": (b) => { if (pendingSay.has(b.id)) { $("say-status").textContent = b.ok ? `${b.state || "accepted"}, waiting for the engine to add it…` : `refused: ${b.error}`; if (!b.ok) pendingSay.delete(b.id); } },
  "cmd.done": (b) => { if (pendingSay.has(b.id)) {   // GPT-Live: placed on the session's timeline
      $("say-status").textContent = !b.ok ? `refused: ${b.error}` : b.start_ms != null ? `placed at ${secs(b.start_ms)}–${secs(b.end_ms)} s of the session`
        : `added as ${b.item_id || "ok"}`;
      pendingSay.delete(b.id); } },
  "console.command_failed": (b) => { $("say-status").textContent = b.message; },
};

// ------------------------------------------------------------------ GPT-Live
const SPEAK_DBFS = -50;      // a level window of the track louder than this: the model speaks
const SPEECH_JOIN_MS = 100;  // speaking windows this close are one stretch of speech
const LIVE_CONTEXT_KIND = { thinking: "context (silent)", instructions: "instructions", commentary: "commentary" };
function setApi(api) {
  if (state.api === api) return;
  state.api = api;
  const live = api === "live", pill = $("api");
  pill.hidden = false; pill.textContent = live ? "GPT-Live" : "Realtime"; pill.className = "pill" + (live ? " gptlive" : "");
  $("track-stat").hidden = !live; $("track-legend").hidden = !live;
  $("cancel").hidden = live;   // GPT-Live yields by itself: there is nothing to cancel
  const sel = $("say-role");
  sel.textContent = "";
  const roles = live ? [["system", "as context (silent)"], ["instructions", "as instructions"], ["commentary", "as commentary (the model says it)"]]
    : [["user", "as user"], ["system", "as system context"]];
  for (const [v, label] of roles) { const o = el("option", null, label); o.value = v; sel.append(o); }
  $("say-text").placeholder = live ? "Context, instructions or commentary for the model…" : "Type a message (cmd.say)…";
}
function trackStarted(t0) {
  const segs = state.track.segments;
  if (segs.length && segs[segs.length - 1].end == null) segs[segs.length - 1].end = t0;
  segs.push({ start: t0, end: null });
  if (segs.length > MAX_MARKERS) segs.splice(0, segs.length - MAX_MARKERS);
}
function trackStopped(t) {
  const segs = state.track.segments;
  if (segs.length && segs[segs.length - 1].end == null) segs[segs.length - 1].end = t;
  mark(t, "played", "the model's track ends");
}
function trackSpeech(b) {
  if (state.api !== "live" || !Array.isArray(b.dbfs)) return;
  const sp = state.track.speech, t0 = ms(b.start_mono_ns);
  if (t0 == null) return;
  for (let i = 0; i < b.dbfs.length; i++) {
    if (b.dbfs[i] <= SPEAK_DBFS) continue;
    const a = t0 + i * b.period_ms, e = a + b.period_ms, last = sp[sp.length - 1];
    if (last && a - last.end <= SPEECH_JOIN_MS) last.end = Math.max(last.end, e); else sp.push({ start: a, end: e });
  }
  if (sp.length > MAX_MARKERS) sp.splice(0, sp.length - MAX_MARKERS);
}
function trackNow(now) {   // what the track carries now: the model speaking, silence, or no track
  const segs = state.track.segments, last = segs[segs.length - 1];
  if (!last || (last.end != null && last.end <= now)) return segs.length ? "stopped" : "–";
  const sp = state.track.speech[state.track.speech.length - 1];
  return sp && sp.end >= now - 300 ? "model speaking" : "silent";
}
function secs(msv) { return typeof msv === "number" ? (msv / 1000).toFixed(1) : "?"; }
function fragment(t, speaker, b) {   // one raw fragment of a GPT-Live turn, with its time on the session's timeline
  if (t.text === "…" || !t.frags) { t.textEl.textContent = ""; t.text = ""; }
  const f = state.lastFragment[speaker], span = el("span", "frag", b.text || "");
  const times = f && f.text === b.text ? f : null;
  if (times) { span.dataset.startMs = times.start_ms; span.dataset.endMs = times.end_ms; span.title = `${times.start_ms}–${times.end_ms} ms of the session`; }
  t.textEl.append(span);
  t.text += b.text || ""; t.frags = (t.frags || 0) + 1;
}
function turnDone(t, b) {   // a GPT-Live turn closed: its text, its span on the session's timeline
  if (!t.frags || t.text !== (b.text || "")) setText(t, b.text || "(no transcript)");
  if (t.kind === "user") t.whoEl.textContent = "user (spoken)";
  setNums(t, { timeline: `session <b>${secs(b.start_ms)}–${secs(b.end_ms)} s</b>` + (t.frags ? ` · ${t.frags} fragment${t.frags > 1 ? "s" : ""}` : "") });
}
function liveContext(b) {   // a GPT-Live append placed on the session's timeline (live.context)
  const key = "x:" + (b.request_id || b.delegation_id || `n${++state.contexts}`);
  const who = (LIVE_CONTEXT_KIND[b.kind] || b.kind || "context") + (b.delegation_id ? " for a delegation" : "") + " placed";
  const t = turn(key, "system", who);
  t.whoEl.textContent = who;
  if (t.t == null) t.t = ms(b.mono_ns);
  setText(t, b.text || "");
  if (b.start_ms != null) setNums(t, { placed: `at <b>${secs(b.start_ms)}–${secs(b.end_ms)} s</b> of the session` });
  state.lastContext = { text: b.text, key };
}
function liveLatency(b) {   // GPT-Live: the user's speech end -> the reply's first sound heard
  const v = b.speech_end_to_heard_ms;
  $("latency").textContent = `${fmt(v)} ms`;
  mark(ms(b.speech_end_mono_ns), "speech", "speech end");
  mark(ms(b.heard_mono_ns), "played", "first sound heard");
  const text = `speech end → first sound heard <b>${fmt(v)} ms</b>`;
  const end = ms(b.speech_end_mono_ns);
  for (let i = state.turnOrder.length - 1; i >= 0; i--) {
    const t = state.turns.get(state.turnOrder[i]);
    if (t && t.kind === "model" && t.t != null && end != null && t.t >= end) { setNums(t, { latency: text }); return; }
  }
  state.pendingLatency = text;   // its reply's words have not come yet
}

function firstDelta(responseId, monoNs) {
  if (!responseId || state.firstDelta.has(responseId)) return;
  state.firstDelta.add(responseId);
  mark(ms(monoNs), "delta", "first delta");
}
function showCut(t, heard, textReceived, audioEndMs) {
  if (heard != null) t.heard = heard;
  if (textReceived) t.received = textReceived;
  const heardText = t.heard != null ? t.heard : t.text;
  const received = t.received || t.streamed || "";
  t.textEl.textContent = "";
  t.textEl.append(document.createTextNode(heardText || (received ? "" : "(nothing heard)")));
  const rest = received.startsWith(heardText) ? received.slice(heardText.length) : "";
  const cut = t.cut || {};
  t.textEl.append(el("span", "cut", ` ✂ cut at ${cut.played ?? audioEndMs ?? "?"} ms${cut.received ? " of " + cut.received + " ms" : ""} `));
  if (rest) t.textEl.append(el("span", "unheard", rest));
  t.text = heardText;
  t.node.classList.add("interrupted");
}
function setCost(usd) {
  if (usd == null) return;
  state.sessionUsd = usd;
  $("cost").textContent = "$" + Number(usd).toFixed(4);
  $("budget").textContent = state.budgetUsd ? ` of $${state.budgetUsd} (${(100 * usd / state.budgetUsd).toFixed(0)} %)` : "";
}
function setMic(open) { state.micOpen = open; const b = $("mic"); b.textContent = open ? "Mute mic" : "Unmute mic"; b.classList.toggle("on", !open); }
function banner(text) { const b = $("error-banner"); b.hidden = false; b.textContent = text; clearTimeout(banner.t); banner.t = setTimeout(() => { b.hidden = true; }, 15000); }
function escapeHtml(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c])); }

function handle(topic, body) {
  const h = handlers[topic];
  if (h) { try { h(body); } catch (e) { console.error("console: handling", topic, e); } }
  addEvent(topic, body);
}

// ------------------------------------------------------------------ events inspector
let pendingRows = [];
function addEvent(topic, body) {
  state.eventCount++;
  const ev = { topic, body, n: state.eventCount };
  state.events.push(ev);
  if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
  if (!state.paused && matches(ev)) pendingRows.push(ev);
}
function filters() {
  const prefixes = $("ev-filter").value.split(/[\s,]+/).filter(Boolean);
  return { prefixes, search: $("ev-search").value.toLowerCase(), hide: $("ev-hide").checked };
}
let currentFilter = null;
function matches(ev, f = currentFilter || filters()) {
  if (f.hide && FIREHOSE.some((p) => ev.topic.startsWith(p))) return false;
  if (f.prefixes.length && !f.prefixes.some((p) => ev.topic.startsWith(p))) return false;
  if (f.search) { ev.json = ev.json || JSON.stringify(ev.body).toLowerCase(); if (!ev.json.includes(f.search) && !ev.topic.includes(f.search)) return false; }
  return true;
}
function summary(b) {
  if (typeof b.text === "string") return JSON.stringify(b.text).slice(0, 160);
  if (b.message) return String(b.message).slice(0, 160);
  const skip = new Set(["pub", "ts", "mono_ns", "v", "seq"]);
  return JSON.stringify(Object.fromEntries(Object.entries(b).filter(([k]) => !skip.has(k)))).slice(0, 160);
}
function row(ev) {
  const r = el("div", "ev" + (ev.topic === "engine.error" ? " err" : ""));
  const ts = ev.body.ts ? new Date(ev.body.ts * 1000).toLocaleTimeString([], { hour12: false }) : "";
  r.append(el("span", "t", ts + " "), el("span", "tp", ev.topic), el("span", "pb", " " + (ev.body.pub || "") + " "), document.createTextNode(summary(ev.body)));
  r.addEventListener("click", (e) => {
    if (e.target.tagName === "PRE") return;
    const pre = r.querySelector("pre");
    if (pre) { pre.remove(); r.style.whiteSpace = ""; return; }
    r.style.whiteSpace = "normal";
    r.append(el("pre", null, JSON.stringify({ topic: ev.topic, ...ev.body }, null, 1)));
  });
  return r;
}
function flushRows() {
  if (!pendingRows.length) return;
  const list = $("events");
  const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 30;
  const frag = document.createDocumentFragment();
  for (const ev of pendingRows.slice(-MAX_EVENT_ROWS)) frag.append(row(ev));
  pendingRows = [];
  list.append(frag);
  while (list.childElementCount > MAX_EVENT_ROWS) list.firstElementChild.remove();
  if (stick) list.scrollTop = list.scrollHeight;
  $("ev-count").textContent = `${state.eventCount} received, ${list.childElementCount} shown`;
}
function rerenderRows() {
  currentFilter = filters();
  $("events").textContent = "";
  pendingRows = state.events.filter((ev) => matches(ev));
  flushRows();
}

// ------------------------------------------------------------------ drawing
const COLORS = { mic: "#4fb3ff", sent: "#57d18a", spk: "#ffb347" };
const TRACK_COLOR = "#3a4654";
const MARK_COLORS = { speech: "#4fb3ff", response: "#a58bff", delta: "#ffe066", played: "#ffb347",
  bargein: "#ff6b6b", cut: "#ff3b8d", underrun: "#ff3030", stretch: "#4fd1c5" };
const LANES = [["mic", "mic as captured"], ["sent", "mic after echo cancellation"], ["spk", "speaker as played"]];
const DB_MIN = -70;
function draw() {
  const c = $("levels");
  const dpr = window.devicePixelRatio || 1;
  const w = c.clientWidth, h = c.clientHeight;
  if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
  const g = c.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.fillStyle = "#0c0f12"; g.fillRect(0, 0, w, h);
  const axisH = 16, laneH = (h - axisH) / LANES.length, left = 4;
  const end = nowMono(), span = windowMs(), start = end - span;
  const x = (t) => left + ((t - start) / span) * (w - left);
  g.font = "10px system-ui";
  LANES.forEach(([lane, label], i) => {
    const top = i * laneH, base = top + laneH - 2;
    g.strokeStyle = "#1f262e"; g.beginPath();
    for (const db of [-60, -40, -20, 0]) { const y = base - ((db - DB_MIN) / -DB_MIN) * (laneH - 14); g.moveTo(left, y); g.lineTo(w, y); }
    g.stroke();
    const pts = state.lanes[lane];
    const col = COLORS[lane];
    // binary search for the first point in view
    let lo = 0, hi = pts.length;
    while (lo < hi) { const mid = (lo + hi) >> 1; if (pts[mid].t < start - 40) lo = mid + 1; else hi = mid; }
    g.fillStyle = col + "55"; g.strokeStyle = col;
    for (let k = lo; k < pts.length; k++) {
      const p = pts[k]; if (p.t > end) break;
      const x0 = x(p.t), x1 = Math.max(x0 + 1, x(p.t + 20));
      const hp = Math.max(0, (Math.min(0, p.peak) - DB_MIN) / -DB_MIN) * (laneH - 14);
      const hr = Math.max(0, (Math.min(0, p.db) - DB_MIN) / -DB_MIN) * (laneH - 14);
      g.fillStyle = col + "55"; g.fillRect(x0, base - hp, x1 - x0, hp);
      g.fillStyle = col; g.fillRect(x0, base - hr, x1 - x0, hr);
    }
    g.fillStyle = "#8793a0"; g.fillText(label + (lane === "spk" && state.api === "live" ? " — the model's track" : "")
      + "  (RMS solid, peak light; -70…0 dBFS)", left + 4, top + 11);
    if (lane === "spk" && state.track.segments.length) {   // GPT-Live: where the track played, where the model spoke
      const y = top + 14, bh = 5;
      g.fillStyle = TRACK_COLOR;
      for (const sg of state.track.segments) { const a = Math.max(sg.start, start), e = Math.min(sg.end ?? end, end); if (e > a) g.fillRect(x(a), y, x(e) - x(a), bh); }
      g.fillStyle = COLORS.spk;
      for (const sp of state.track.speech) { const a = Math.max(sp.start, start), e = Math.min(sp.end, end); if (e > a) g.fillRect(x(a), y, Math.max(1, x(e) - x(a)), bh); }
    }
  });
  if (state.api === "live") { state.track.now = trackNow(end); $("track").textContent = state.track.now; }
  // markers across all lanes, labels staggered
  let slot = 0;
  for (const m of state.markers) {
    if (m.t < start || m.t > end) continue;
    const mx = x(m.t);
    g.strokeStyle = MARK_COLORS[m.kind] || "#fff"; g.globalAlpha = 0.85;
    g.beginPath(); g.moveTo(mx, 0); g.lineTo(mx, h - axisH); g.stroke();
    g.globalAlpha = 1; g.fillStyle = MARK_COLORS[m.kind] || "#fff";
    g.fillText(m.label, mx + 2, 22 + (slot++ % 6) * 11);
  }
  // time axis: seconds before now (live) or the session clock (look back)
  g.fillStyle = "#8793a0"; g.strokeStyle = "#2a323c";
  const step = span <= 12000 ? 1000 : span <= 30000 ? 5000 : 10000;
  const origin = state.lookback ? state.lookback.originT : end;
  for (let t = Math.ceil(start / step) * step; t <= end; t += step) {
    const tx = x(t); g.beginPath(); g.moveTo(tx, h - axisH); g.lineTo(tx, h - axisH + 4); g.stroke();
    const label = state.lookback ? ((t - origin) / 1000).toFixed(0) + " s" : ((t - end) / 1000).toFixed(0) + " s";
    g.fillText(label, tx + 2, h - 4);
  }
  if (state.lookback && state.lookback.audio && state.lookback.audio.src) {
    const px = x(end - span / 2); g.strokeStyle = "#ffffff"; g.setLineDash([3, 3]);
    g.beginPath(); g.moveTo(px, 0); g.lineTo(px, h - axisH); g.stroke(); g.setLineDash([]);
  }
  state.counts.drawn++;
}
function frame(ts) {
  // the canvas at most every 40 ms (it is the costly part); new event rows (those not flushed with their batch) at every frame
  if (ts - state.lastDrawT >= 40) { state.lastDrawT = ts; draw(); }
  flushRows();
  requestAnimationFrame(frame);
}

// ------------------------------------------------------------------ the WebSocket
let ws = null, pendingSay = new Set(), nextRef = 1;
function connect() {
  ws = new WebSocket(sockUrl("/ws"));
  ws.binaryType = "arraybuffer";   // bus batches come binary (wire.js), replies as JSON text
  ws.onopen = () => { const c = $("conn"); c.textContent = "connected"; c.className = "pill ok"; };
  ws.onclose = () => { const c = $("conn"); c.textContent = "offline (retrying)"; c.className = "pill off"; setTimeout(connect, 1000); };
  ws.onmessage = (e) => {
    if (typeof e.data !== "string") { onBatch(e.data); return; }
    const msg = JSON.parse(e.data);
    clockFrom(msg.now_ns);
    if (msg.op === "sent") {
      if (["cmd.say", "cmd.instructions", "cmd.commentary"].includes(msg.topic)) { pendingSay.add(msg.id); $("say-status").textContent = "sent, waiting for the engine…"; }
    } else if (msg.op === "error") {
      $("say-status").textContent = msg.message;
    } else if (msg.op === "hello") {
      state.liveSession = msg.live_session;
    }
  };
}
// the engine's CLOCK_MONOTONIC in page time: the smallest delay seen is the best estimate
function clockFrom(nowNs) {
  if (nowNs == null) return;
  const off = nowNs / 1e6 - performance.now();
  if (state.offsetMs == null || off > state.offsetMs) state.offsetMs = off;
}
function onBatch(buffer) {
  let batch;
  try { batch = decodeBatch(buffer); }
  catch (e) { state.counts.badBatches = (state.counts.badBatches || 0) + 1; console.error("console: a bad batch", e); return; }
  clockFrom(batch.nowNs);
  state.counts.batches++;
  if (batch.malformed) state.counts.malformed = (state.counts.malformed || 0) + batch.malformed;
  if (state.lookback) { state.liveQueue = (state.liveQueue || []).concat(batch.events).slice(-MAX_EVENTS); return; }
  for (const ev of batch.events) handle(ev.topic, ev.body);
  flushRows();   // the batch's rows now, not at the next animation frame (up to 17 ms later)
  if (batch.dropped) banner(`the console dropped ${batch.dropped} bus messages for this page (it fell behind)`);
}
function send(obj) {
  if (!ws || ws.readyState !== WebSocket.OPEN) { $("say-status").textContent = "not connected to the console"; return; }
  obj.ref = nextRef++;
  ws.send(JSON.stringify(obj));
}

// ------------------------------------------------------------------ look back
async function api(path) {
  const r = await fetch(`${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}`);
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}
async function loadSessions() {
  try {
    const j = await api("/api/sessions");
    const sel = $("sessions");
    sel.length = 1;
    for (const s of j.sessions) {
      const o = el("option", null, s.key + (s.key === j.live_session ? " (live)" : "") + (s.has_wav ? " ♪" : ""));
      o.value = s.key; sel.append(o);
    }
  } catch (e) { /* no sessions directory: look back is unavailable */ }
}
function resetViews() {
  state.lanes = { mic: [], sent: [], spk: [] }; state.markers = []; state.events = []; state.eventCount = 0;
  state.turns.clear(); state.turnOrder = []; state.items.clear(); state.firstDelta.clear();
  state.underruns = 0; state.errors = 0;
  state.track = { segments: [], speech: [], now: "–" }; state.lastFragment = { user: null, model: null };
  state.lastContext = null; state.pendingLatency = null;
  $("conversation").textContent = ""; $("events").textContent = ""; pendingRows = [];
  $("underruns").textContent = "0"; $("errors").textContent = "0";
}
async function openSession(key) {
  const j = await api(`/api/session/events?key=${encodeURIComponent(key)}`);
  resetViews();
  state.lookback = { key, audio: $("lookback-audio"), wavStartT: null, endT: 0, originT: null };
  for (const ev of j.events) handle(ev.topic, ev.body);
  flushRows();
  const monos = j.events.map((e) => e.body.mono_ns).filter((v) => typeof v === "number");
  const firstT = monos.length ? ms(Math.min(...monos)) : 0, lastT = monos.length ? ms(Math.max(...monos)) : 0;
  const firstLevels = j.events.find((e) => e.topic === "capture.levels");
  state.lookback.originT = firstT; state.lookback.endT = lastT;
  const audio = $("lookback-audio");
  $("lookback-bar").hidden = false;
  $("mode").textContent = "look back: " + key; $("mode").className = "pill look";
  $("lookback-info").textContent = `${j.events.length} events` + (j.cut ? ` (latest; ${j.cut} older left out)` : "") + (j.has_wav ? "" : " · no conversation.wav (record: DIR records one)");
  if (j.has_wav) {
    // the recording starts with capture's first block: the first capture.levels window
    state.lookback.wavStartT = firstLevels ? ms(firstLevels.body.start_mono_ns) : firstT;
    audio.src = `/api/session/wav?key=${encodeURIComponent(key)}&token=${encodeURIComponent(TOKEN)}`;
    if (!firstLevels) {   // an old log without levels: draw the recording's envelopes instead
      const lv = await api(`/api/session/levels?key=${encodeURIComponent(key)}`);
      pushLevels("mic", state.lookback.wavStartT * 1e6, lv.period_ms, lv.mic_dbfs, null);
      pushLevels("spk", state.lookback.wavStartT * 1e6, lv.period_ms, lv.played_dbfs, null);
    }
  } else { audio.removeAttribute("src"); audio.load(); }
  state.lookback.loadedEvents = j.events.length;
}
function seekTo(t) {
  const lb = state.lookback;
  if (!lb) return;
  if (lb.audio && lb.audio.src && lb.wavStartT != null) lb.audio.currentTime = Math.max(0, (t - lb.wavStartT) / 1000);
  else lb.endT = t + windowMs() / 2;
}
function backToLive() {
  const queued = state.liveQueue || [];
  state.liveQueue = [];
  const audio = $("lookback-audio"); audio.pause(); audio.removeAttribute("src"); audio.load();
  state.lookback = null; resetViews();
  $("lookback-bar").hidden = true; $("mode").textContent = "live"; $("mode").className = "pill live";
  // the live view again: the console's backlog on a fresh connection, then what came meanwhile
  if (ws) ws.close(); else connect();
  void queued;
}

// ------------------------------------------------------------------ listen and talk
// The PCM goes over its own WebSockets (/listen, /talk), never through the bus. A Worker holds
// them (audio-worker.js), so a busy page never holds the sound up; the audio goes between it
// and the audio thread through a MessagePort. The page plays and records with the Web Audio
// API: an AudioWorklet, or a ScriptProcessor where it is missing.
const MAX_LISTEN_ENV = 3000;   // 60 s of played windows
const audio = { ctx: null, worker: null, gen: 0, listenId: 0, talkId: 0, listenNode: null, talkNode: null,
  talkStream: null, talkSrc: null, talkPort: null };
function sockUrl(path) { return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}${path}?token=${encodeURIComponent(TOKEN)}`; }
async function audioContext() {
  if (!audio.ctx) {
    try { audio.ctx = new AudioContext({ sampleRate: 24000, latencyHint: "interactive" }); }
    catch (e) { audio.ctx = new AudioContext(); }   // a browser that cannot run at 24 kHz: resampled
    audio.worklet = false;
    if (audio.ctx.audioWorklet) {
      try { await audio.ctx.audioWorklet.addModule("/static/audio-worklet.js"); audio.worklet = true; }
      catch (e) { console.warn("console: no AudioWorklet, using a ScriptProcessor", e); }
    }
  }
  if (audio.ctx.state !== "running") await audio.ctx.resume();
  return audio.ctx;
}
function audioWorker() {
  if (!audio.worker) { audio.worker = new Worker("/static/audio-worker.js"); audio.worker.onmessage = onWorker; }
  return audio.worker;
}
// a node that plays (listen) or taps (talk) through the worklet or, without one, a ScriptProcessor;
// ``port`` is the worker's end of the audio
function listenNode(ctx, port, onStats) {
  if (audio.worklet) {
    const node = new AudioWorkletNode(ctx, "listen-player", { numberOfInputs: 0, outputChannelCount: [1] });
    node.port.onmessage = (e) => onStats(e.data);
    node.port.postMessage({ port }, [port]);
    return node;
  }
  const core = new window.ListenCore(ctx.sampleRate);
  port.onmessage = (e) => core.push(e.data);
  const node = ctx.createScriptProcessor(2048, 1, 1);
  node.onaudioprocess = (e) => { core.render(e.outputBuffer.getChannelData(0)); onStats(core.stats()); };
  return node;
}
function talkNode(ctx, port) {
  if (audio.worklet) {
    const node = new AudioWorkletNode(ctx, "talk-capture", { numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1] });
    node.port.postMessage({ port }, [port]);
    return node;
  }
  const core = new window.TalkCore(ctx.sampleRate);
  const node = ctx.createScriptProcessor(2048, 1, 1);
  node.onaudioprocess = (e) => { core.push(e.inputBuffer.getChannelData(0), (b) => port.postMessage(b, [b.buffer])); e.outputBuffer.getChannelData(0).fill(0); };
  return node;
}
function onWorker(e) {
  const m = e.data, L = state.listen, T = state.talk;
  if (m.kind === "listen" && m.id === audio.listenId) {
    if (m.msg.op === "stats") { L.serverDropped = m.msg.dropped_frames; L.notListened = m.msg.not_listened_frames; }
  } else if (m.kind === "listen-closed" && m.id === audio.listenId) {
    stopListen(); if (m.code !== 1000 && m.reason) banner("listen: " + m.reason);
  } else if (m.kind === "talk-open" && m.id === audio.talkId) {
    const src = audio.ctx.createMediaStreamSource(audio.talkStream);
    const node = talkNode(audio.ctx, audio.talkPort);
    src.connect(node); node.connect(audio.ctx.destination);   // the node outputs silence; connected so it runs
    audio.talkSrc = src; audio.talkNode = node; audio.talkPort = null;
  } else if (m.kind === "talk" && m.id === audio.talkId) {
    T.sentFrames = m.sent; T.dropped = m.dropped;
    if (m.msg.op === "stats") T.writtenFrames = m.msg.written_frames;
  } else if (m.kind === "talk-closed" && m.id === audio.talkId) {
    stopTalk(); if (m.code !== 1000 && m.reason) banner("talk: " + m.reason);
  }
}
function avStatus() {
  const L = state.listen, T = state.talk, parts = [];
  if (L.on) parts.push(`listening: ${Math.round(L.queuedFrames / 24)} ms buffered` + (L.underrunFrames ? `, ${L.underruns} gaps (${Math.round(L.underrunFrames / 24)} ms)` : "")
    + (L.droppedFrames + L.serverDropped ? `, ${Math.round((L.droppedFrames + L.serverDropped) / 24)} ms dropped` : ""));
  if (T.on) parts.push(`talking: ${(T.sentFrames / (T.rateHz || 24000)).toFixed(1)} s sent` + (T.dropped ? `, ${T.dropped} blocks dropped` : ""));
  $("av-status").textContent = parts.join(" · ");
}
function setSource(b) {
  const T = state.talk;
  T.source = b.source; T.sourceMsg = b;
  const p = $("mic-source");
  p.textContent = "mic: " + b.source + (b.source === "browser" && b.browser_short_frames ? ` (${Math.round(b.browser_short_frames / 24)} ms short)` : "");
  p.className = "pill" + (b.source === "browser" ? " browser" : "");
  p.title = `capture.source: ${b.source}; device ${b.device || "?"}; browser frames ${b.browser_frames}, padded with silence ${b.browser_short_frames} in ${b.browser_gaps || 0} gaps, backlog cut ${b.browser_dropped_frames}`;
}
async function startListen() {
  const ctx = await audioContext();
  const L = state.listen;
  const ch = new MessageChannel();
  audio.listenNode = listenNode(ctx, ch.port1, (st) => {
    L.played = st.played; L.received = st.received; L.underrunFrames = st.underrunFrames; L.droppedFrames = st.droppedFrames;
    L.queuedFrames = st.queuedFrames; L.underruns = st.underruns; L.bufferMs = st.bufferMs;
    for (const v of st.env) L.env.push(v);
    if (L.env.length > MAX_LISTEN_ENV) L.env.splice(0, L.env.length - MAX_LISTEN_ENV);
  });
  audio.listenNode.connect(ctx.destination);
  audio.listenId = ++audio.gen;
  audioWorker().postMessage({ op: "listen", id: audio.listenId, url: sockUrl("/listen"), port: ch.port2 }, [ch.port2]);
  L.on = true; $("listen").textContent = "Stop listening"; $("listen").classList.add("on");
}
function stopListen() {
  audio.listenId = 0;
  if (audio.worker) audio.worker.postMessage({ op: "stop", kind: "listen" });
  if (audio.listenNode) { audio.listenNode.disconnect(); audio.listenNode = null; }
  state.listen.on = false; $("listen").textContent = "Listen"; $("listen").classList.remove("on");
}
async function startTalk() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    banner("talk: this page cannot use a microphone here (browsers allow it on https or localhost: open the console through an SSH tunnel)");
    return;
  }
  const ctx = await audioContext();
  const T = state.talk;
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false } });
  } catch (e) { banner("talk: no microphone: " + e.message); return; }
  const ch = new MessageChannel();
  audio.talkStream = stream; audio.talkPort = ch.port1;
  audio.talkId = ++audio.gen;
  audioWorker().postMessage({ op: "talk", id: audio.talkId, url: sockUrl("/talk"), rate: ctx.sampleRate, port: ch.port2 }, [ch.port2]);
  T.on = true; T.rateHz = ctx.sampleRate; T.sentFrames = 0; T.dropped = 0;
  $("talk").textContent = "Stop talking"; $("talk").classList.add("on");
}
function stopTalk() {
  audio.talkId = 0;
  if (audio.worker) audio.worker.postMessage({ op: "stop", kind: "talk" });   // the console switches the engine back to its device
  if (audio.talkNode) { audio.talkNode.disconnect(); audio.talkNode = null; }
  if (audio.talkSrc) { audio.talkSrc.disconnect(); audio.talkSrc = null; }
  if (audio.talkStream) { for (const t of audio.talkStream.getTracks()) t.stop(); audio.talkStream = null; }
  audio.talkPort = null;
  state.talk.on = false; $("talk").textContent = "Talk"; $("talk").classList.remove("on");
}
setInterval(avStatus, 500);

// ------------------------------------------------------------------ controls
$("listen").addEventListener("click", () => { if (state.listen.on) stopListen(); else startListen().catch((e) => { stopListen(); banner("listen: " + e.message); }); });
$("talk").addEventListener("click", () => { if (state.talk.on) stopTalk(); else startTalk().catch((e) => { stopTalk(); banner("talk: " + e.message); }); });
$("say-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("say-text").value;
  if (!text.trim()) { $("say-status").textContent = "type some text first"; return; }
  send({ op: "say", text, role: $("say-role").value });
  $("say-text").value = "";
});
$("say-text").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("say-form").requestSubmit(); } });
$("cancel").addEventListener("click", () => send({ op: "cancel" }));
$("mic").addEventListener("click", () => { send({ op: "mic", open: !state.micOpen }); setMic(!state.micOpen); });
$("ev-pause").addEventListener("click", () => {
  state.paused = !state.paused;
  $("ev-pause").textContent = state.paused ? "Resume" : "Pause";
  $("ev-pause").classList.toggle("on", state.paused);
  if (!state.paused) rerenderRows();
});
for (const id of ["ev-filter", "ev-search", "ev-hide"]) $(id).addEventListener("input", () => rerenderRows());
$("open-session").addEventListener("click", () => { const k = $("sessions").value; if (k) openSession(k).catch((e) => banner("look back: " + e.message)); });
$("sessions").addEventListener("focus", loadSessions);
$("back-live").addEventListener("click", backToLive);
$("levels").addEventListener("click", (e) => {
  if (!state.lookback) return;
  const c = $("levels"), r = c.getBoundingClientRect();
  const end = nowMono(), span = windowMs();
  seekTo(end - span + ((e.clientX - r.left) / r.width) * span);
});

currentFilter = filters();
connect();
loadSessions();
requestAnimationFrame(frame);
