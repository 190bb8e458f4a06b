// realtalk bus client for Node.js: subscribe to the conversation, send commands.
// Wire format (docs/bus-protocol.md, protocol 2): [topic utf-8, msgpack map with v, ts, mono_ns, pub, seq, ...payload],
// and on the engine's control topics a third frame, its signature (only the engine can sign; readers ignore it).
// A tcp bus needs CURVE: the keys are in the connection file (curve_server_key, curve_public_key, curve_secret_key).
// Commands: the engine acks each at once on cmd.ack (queued, accepted, taken or refused) and reports what it did
// on cmd.done; a command is sent again only while no ack came.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const crypto = require("crypto");
const zmq = require("zeromq");
const { encode, decode } = require("@msgpack/msgpack");

const PROTOCOL_VERSION = 2;
const RESEND_MS = 500;    // a command not acked this long after it was sent is sent again (slow joiner)
const OUTCOME_RESEND_MS = 3000;   // while its outcome has not come, a command is sent again (a copy asks for it)
const PROBE_MS = 20;      // the reply subscriber's join probe goes out again this often until it comes back
let probes = 0;

/** What `promise` resolves to, or null once `ms` pass first (the timer is cleared either way). */
async function until(promise, ms) {
  let timer;
  const result = await Promise.race([promise, new Promise((r) => { timer = setTimeout(() => r(null), Math.max(0, ms)); })]);
  clearTimeout(timer);
  return result;
}

/** Why an lstat/fstat result is not this user's own private directory or regular file (null: it is),
 *  as bus/runtime.py decides: another user's connection file or directory is never believed. */
function privateProblem(st, directory) {
  if (st.isSymbolicLink()) return "is a symbolic link";
  if (directory ? !st.isDirectory() : !st.isFile()) return `is not a ${directory ? "directory" : "regular file"}`;
  if (st.uid !== process.geteuid()) return `is owned by uid ${st.uid}, not by you (uid ${process.geteuid()})`;
  if (st.mode & 0o077) return `has mode ${(st.mode & 0o777).toString(8).padStart(4, "0")}: others may use it`;
  return null;
}

function connectionFile() {
  let xdg = process.env.XDG_RUNTIME_DIR;   // only the user's own 0700 one; else $TMPDIR/realtalk-UID
  try { if (xdg && privateProblem(fs.lstatSync(xdg), true)) xdg = null; } catch { xdg = null; }
  const dir = process.env.REALTALK_RUNTIME_DIR
    || (xdg ? path.join(xdg, "realtalk") : path.join(os.tmpdir(), `realtalk-${process.geteuid()}`));
  return path.join(dir, "engine.json");
}

/** The connection file's JSON if it is this user's own private file (opened without following a link). */
function readConnection(file) {
  let fd;
  try {
    fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  } catch (e) {
    if (e.code !== "ELOOP") throw e;
    throw new Error(`refused the connection file ${file}: it is a symbolic link; it is not trusted: remove it`);
  }
  try {
    const problem = privateProblem(fs.fstatSync(fd), false);
    if (problem) throw new Error(`refused the connection file ${file}: it ${problem}; it is not trusted: remove it`);
    return JSON.parse(fs.readFileSync(fd, "utf8"));
  } finally {
    fs.closeSync(fd);
  }
}

/** Socket options for the engine's bus: CURVE client keys when the connection file has them (tcp). */
function socketOptions(conn) {
  if (!conn.curve_server_key) return {};
  return { curveServerKey: conn.curve_server_key, curvePublicKey: conn.curve_public_key, curveSecretKey: conn.curve_secret_key };
}

/** Messages lost on the way to a subscriber of every topic, from the gaps in each publisher's `seq`
 *  (docs/bus-protocol.md, "Drops"; the same rules as the Python `Subscriber`): the broker and the
 *  publishers drop past their high-water marks without telling anyone, so the reader counts.
 *  A message sent before the counter existed (the broker's last-value replay) starts no count;
 *  a lower `seq` with a later `mono_ns` is a publisher restarted under the same name. */
class GapCounter {
  constructor({ createdNs = Number(process.hrtime.bigint()), maxPublishers = 4096 } = {}) {
    this.createdNs = createdNs;           // CLOCK_MONOTONIC, as the bodies' mono_ns
    this.maxPublishers = maxPublishers;
    this.last = new Map();                // publisher -> [seq, mono_ns] of the newest seen
    this.dropped = {};                    // publisher -> messages lost in all
    this.reported = {};
  }

  /** Count the messages missing between `body` and the previous one of its publisher. */
  count(body) {
    const { seq, pub } = body;
    const mono = Number.isInteger(body.mono_ns) ? body.mono_ns : 0;
    if (!Number.isInteger(seq) || seq <= 0 || typeof pub !== "string") return;  // join probes, foreign bodies
    const last = this.last.get(pub);
    if (last === undefined) {
      if (mono && mono < this.createdNs) return;  // a replay of an older state message: no start point
      if (this.last.size >= this.maxPublishers) this.last.delete(this.last.keys().next().value);
      this.last.set(pub, [seq, mono]);
      return;
    }
    const [lastSeq, lastMono] = last;
    if (seq > lastSeq) {
      if (seq > lastSeq + 1) this.dropped[pub] = (this.dropped[pub] || 0) + seq - lastSeq - 1;
      this.last.set(pub, [seq, mono]);
    } else if (mono > lastMono) {
      this.last.set(pub, [seq, mono]);  // restarted under the same name: count from here
    }  // else: an older message again (a state replay for another subscriber): nothing lost
  }

  /** True if losses were counted since the last report. */
  pending() {
    return Object.entries(this.dropped).some(([pub, total]) => total !== (this.reported[pub] || 0));
  }

  /** `[{publisher, count, total}]` of the losses since the last call (empty if none). */
  takeReport() {
    const out = [];
    for (const [pub, total] of Object.entries(this.dropped)) {
      const count = total - (this.reported[pub] || 0);
      if (count > 0) out.push({ publisher: pub, count, total });
      this.reported[pub] = total;
    }
    return out;
  }
}

class Bus {
  /** Connect to the running engine's bus (endpoints and, over tcp, CURVE keys from its connection file).
   *  A bus of every topic (`prefixes` [""]) counts what it lost (`dropped`: publisher -> messages) and,
   *  with `reportDrops`, publishes it at most once a second as `bus.dropped`, as the engine's own do. */
  constructor({ name = `node:${process.pid}`, prefixes = [""], file = connectionFile(), reportDrops = true } = {}) {
    const conn = readConnection(file);
    this.conn = conn;
    this.name = name;
    this.seq = 0;
    this.pub = new zmq.Publisher(socketOptions(conn));
    this.pub.connect(conn.publish);
    this.sub = new zmq.Subscriber(socketOptions(conn));
    this.sub.connect(conn.subscribe);
    for (const p of prefixes) this.sub.subscribe(p);
    this.malformed = 0;
    // a prefix subscriber cannot tell a drop from a message its filter left out: it counts nothing
    this.gaps = prefixes.length === 1 && prefixes[0] === "" ? new GapCounter() : null;
    this.reportDrops = reportDrops;
    this.dropReportAt = 0;
  }

  /** Messages lost per publisher (seq gaps) since this bus connected; empty for a prefix subscriber. */
  get dropped() {
    return this.gaps ? { ...this.gaps.dropped } : {};
  }

  /** Publish the losses since the last report, one `bus.dropped` {subscriber, publisher, count, total}
   *  each, at most once a second; resolves with the number published. */
  async publishDropReports() {
    if (!this.gaps || this.closed) return 0;
    const wait = this.dropReportAt + 1000 - Date.now();
    if (wait > 0) {  // too soon: what is counted meanwhile goes out when it is due, even if nothing else comes
      if (!this.dropTimer && this.gaps.pending()) {
        this.dropTimer = setTimeout(() => { this.dropTimer = null; this.publishDropReports().catch(() => {}); }, wait);
        this.dropTimer.unref();
      }
      return 0;
    }
    const report = this.gaps.takeReport();
    if (report.length) this.dropReportAt = Date.now();
    for (const r of report) await this.publish("bus.dropped", { subscriber: this.name, ...r });
    return report.length;
  }

  /** Publish `payload` on `topic`. */
  async publish(topic, payload = {}) {
    this.seq += 1;
    await this.pub.send([topic, encode({ ...this._header(this.seq), ...payload })]);
  }

  /** A body's header (docs/bus-protocol.md); `seq` 0 for a join probe, which no gap counter counts. */
  _header(seq) {
    return { v: PROTOCOL_VERSION, ts: Date.now() / 1000, mono_ns: Number(process.hrtime.bigint()), pub: this.name, seq };
  }

  /** Async iterator of {topic, body}; malformed messages are counted and skipped.
   *  A third frame is the engine's signature of a control message: accepted, not checked here. */
  async *messages() {
    for await (const frames of this.sub) {
      if (frames.length !== 2 && frames.length !== 3) { this.malformed += 1; continue; }
      let body;
      try { body = decode(frames[1]); } catch { this.malformed += 1; continue; }
      if (body === null || typeof body !== "object" || Array.isArray(body)) { this.malformed += 1; continue; }
      if (this.gaps) {
        this.gaps.count(body);
        if (this.reportDrops) await this.publishDropReports();
      }
      yield { topic: frames[0].toString("utf8"), body };
    }
  }

  /** The subscriber of acks and outcomes (cmd.ack, cmd.done), made at the first command; waiters by topic and id.
   *  It also takes a private join probe (`_join.*`, seq 0: no subscriber counts it): once the probe
   *  comes back through the broker, so do the acks and outcomes (the ZeroMQ slow joiner). */
  _replies() {
    if (!this.replySub) {
      this.replySub = new zmq.Subscriber(socketOptions(this.conn));
      this.replySub.connect(this.conn.subscribe);
      this.replySub.subscribe("cmd.ack");
      this.replySub.subscribe("cmd.done");
      probes += 1;
      this.replyProbe = `_join.${this.name}.${process.pid}.${probes}`;
      this.replySub.subscribe(this.replyProbe);
      this.replyJoined = false;
      this.replyJoin = new Promise((resolve) => { this._replyJoinedNow = resolve; });
      this.waiting = new Map();   // "cmd.ack id" / "cmd.done id" -> resolve
      this.replyLoop = (async () => {
        try {
          for await (const frames of this.replySub) {
            const topic = frames[0].toString("utf8");
            if (topic === this.replyProbe) { this.replyJoined = true; this._replyJoinedNow(); continue; }
            let body;
            try { body = decode(frames[1]); } catch { this.malformed += 1; continue; }
            const key = `${topic} ${body && body.id}`;
            const resolve = this.waiting.get(key);
            if (resolve) { this.waiting.delete(key); resolve(body); }
          }
        } catch (e) {
          if (!this.closed) throw e;
        }
      })();
    }
    return this.replySub;
  }

  _expect(topic, id) {
    return new Promise((resolve) => this.waiting.set(`${topic} ${id}`, resolve));
  }

  /** Send a command and resolve with its cmd.ack (`state` queued, accepted, taken; or `ok: false`, refused).
   *  Sent again only while no ack came (every 500 ms), for at most `timeoutMs`. With `outcome`, resolve
   *  instead with its cmd.done (what the engine did: a say's `item_id`, a refusal), waited for up to
   *  `outcomeTimeoutMs` (null: as long as the engine holds it), sending it again every 3 s meanwhile. */
  async command(topic, payload, { timeoutMs = 10000, outcome = false, outcomeTimeoutMs = 120000 } = {}) {
    const id = payload.id || crypto.randomUUID();
    this._replies();
    const deadline = Date.now() + timeoutMs;
    // the replies must reach us before the command goes: an outcome published before the subscriber
    // joined is lost (the engine says it again, "repeated", only to a command sent again)
    while (!this.replyJoined && Date.now() < deadline) {
      await this.pub.send([this.replyProbe, encode(this._header(0))]);
      await until(this.replyJoin, Math.min(PROBE_MS, deadline - Date.now()));
    }
    const acked = this._expect("cmd.ack", id);
    const done = outcome ? this._expect("cmd.done", id) : null;
    let ack = null;
    acked.then((a) => { ack = a; });
    while (ack === null && Date.now() < deadline) {
      await this.publish(topic, { ...payload, id });
      await until(acked, Math.min(RESEND_MS, deadline - Date.now()));
    }
    if (ack === null) {
      this.waiting.delete(`cmd.ack ${id}`);
      this.waiting.delete(`cmd.done ${id}`);
      throw new Error(`no cmd.ack for ${topic} within ${timeoutMs} ms: is the engine running?`);
    }
    if (!outcome || !ack.ok) {
      this.waiting.delete(`cmd.done ${id}`);
      return ack;
    }
    // an outcome lost with a broker that crashed comes again to a copy (`repeated`: carried out once, by id)
    const outcomeDeadline = outcomeTimeoutMs === null ? Infinity : Date.now() + outcomeTimeoutMs;
    let result = null;
    for (;;) {
      result = await until(done, Math.min(OUTCOME_RESEND_MS, outcomeDeadline - Date.now()));
      if (result !== null || Date.now() >= outcomeDeadline) break;
      await this.publish(topic, { ...payload, id });
    }
    if (result === null) {
      this.waiting.delete(`cmd.done ${id}`);
      throw new Error(`${topic} ${id} was acked (${ack.state}) but not carried out within ${outcomeTimeoutMs} ms`);
    }
    return result;
  }

  /** Add a message to the conversation (role user or system); the model answers if respond. Resolves
   *  with its cmd.done once the engine added it (`ok`, `item_id`), or its refusal. On GPT-Live
   *  (docs/live.md) role system is silent context, done when placed on the session's timeline
   *  (`start_ms`, `end_ms`), and role user is refused (`ok: false`, `error` names the Live commands). */
  say(text, { role = "user", respond = role === "user" } = {}) {
    return this.command("cmd.say", { text, role, respond }, { outcome: true });
  }

  /** GPT-Live: something the model says in its own words (`cmd.commentary`). Resolves with its
   *  cmd.done once the server placed it (`ok`, `start_ms`, `end_ms`), or its refusal (on Realtime:
   *  refused, naming `say(text, {role: "system", respond: true})`). */
  commentary(text) {
    return this.command("cmd.commentary", { text }, { outcome: true });
  }

  /** GPT-Live: more instructions for the model (`cmd.instructions`), kept through the server's
   *  compaction. Resolves with its cmd.done once placed, or its refusal (on Realtime: refused,
   *  naming `cmd.session.update`). */
  instructions(text) {
    return this.command("cmd.instructions", { text }, { outcome: true });
  }

  /** Serve a tool the model can call: `fn(args)` (may be async) returns a string or a JSON value.
   *  The engine ties the tool to this client (`owner` = this bus's name) and unregisters it when
   *  the client goes away: the broker sees its `_presence.<owner>` subscription end. On GPT-Live
   *  the same tool answers a delegation: the call (`tool.call` with `delegation: true`) carries
   *  `request`, what the user said since the previous delegation, also given as each required
   *  string parameter; the answer goes back as commentary on that delegation, and the model says it. */
  async registerTool(name, fn, { description = "", parameters = { type: "object", properties: {} }, timeoutS = 10 } = {}) {
    if (!this.tools) {
      this.tools = new Map();
      this.toolSub = new zmq.Subscriber(socketOptions(this.conn));
      this.toolSub.connect(this.conn.subscribe);
      this.toolSub.subscribe("tool.call");
      this.toolSub.subscribe(`_presence.${this.name}`);  // held while this client lives: tool ownership
      this.toolLoop = this._answerToolCalls();
    }
    this.tools.set(name, fn);
    const done = await this.command("cmd.tool.register", { name, description, parameters, timeout_s: timeoutS, owner: this.name },
                                    { outcome: true });
    if (!done.ok) throw new Error(`tool ${name} refused: ${done.error}`);
    return done;
  }

  async _answerToolCalls() {
    try {
      for await (const frames of this.toolSub) {
        let body;
        try { body = decode(frames[1]); } catch { this.malformed += 1; continue; }
        if (frames[0].toString("utf8") !== "tool.call" || !this.tools.has(body.name)) continue;
        let output;
        try {
          const result = await this.tools.get(body.name)(JSON.parse(body.arguments || "{}"));
          output = typeof result === "string" ? result : JSON.stringify(result);
        } catch (e) {
          output = JSON.stringify({ error: `${e.name}: ${e.message}` });  // the model hears it instead of waiting
        }
        await this.publish("cmd.tool.result", { call_id: body.call_id, output });
      }
    } catch (e) {
      if (!this.closed) throw e;
    }
  }

  close() {
    this.closed = true;
    if (this.dropTimer) clearTimeout(this.dropTimer);
    this.pub.close(); this.sub.close();
    if (this.toolSub) this.toolSub.close();
    if (this.replySub) this.replySub.close();
  }
}

module.exports = { Bus, GapCounter, connectionFile, readConnection, socketOptions, PROTOCOL_VERSION };
