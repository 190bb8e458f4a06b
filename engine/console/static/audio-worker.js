// realtalk console: the listen and talk WebSockets, in a Worker of their own so that a busy
// page (drawing, thousands of events) never holds the sound up. The audio goes between this
// worker and the audio thread (AudioWorklet, or the page's ScriptProcessor) through a
// MessagePort the page hands over; only small status messages go to the page.
"use strict";

const socks = { listen: null, talk: null };

function closeSock(kind) {
  const s = socks[kind];
  socks[kind] = null;
  if (s && s.ws.readyState <= WebSocket.OPEN) s.ws.close(1000);
  if (s && s.port) s.port.close();
}

function listen(id, url, port) {
  closeSock("listen");
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const me = { ws, port };
  socks.listen = me;
  ws.onmessage = (e) => {
    if (typeof e.data === "string") { postMessage({ kind: "listen", id, msg: JSON.parse(e.data) }); return; }
    const pcm = new Int16Array(e.data), f = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
    port.postMessage(f, [f.buffer]);
  };
  ws.onclose = (e) => { if (socks.listen === me) { socks.listen = null; port.close(); } postMessage({ kind: "listen-closed", id, code: e.code, reason: e.reason }); };
}

function talk(id, url, rate, port) {
  closeSock("talk");
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  const me = { ws, port, sent: 0, dropped: 0 };
  socks.talk = me;
  ws.onopen = () => {
    ws.send(JSON.stringify({ op: "start", rate_hz: rate }));
    port.onmessage = (e) => {
      if (ws.readyState !== WebSocket.OPEN) return;
      if (ws.bufferedAmount > 256 * 1024) { me.dropped++; return; }   // the network is behind: drop, do not queue up delay
      ws.send(e.data.buffer); me.sent += e.data.length;
    };
    postMessage({ kind: "talk-open", id });
  };
  ws.onmessage = (e) => postMessage({ kind: "talk", id, msg: JSON.parse(e.data), sent: me.sent, dropped: me.dropped });
  ws.onclose = (e) => { if (socks.talk === me) { socks.talk = null; port.close(); } postMessage({ kind: "talk-closed", id, code: e.code, reason: e.reason }); };
}

onmessage = (e) => {
  const m = e.data;
  if (m.op === "listen") listen(m.id, m.url, m.port);
  else if (m.op === "talk") talk(m.id, m.url, m.rate, m.port);
  else if (m.op === "stop") closeSock(m.kind);
};
