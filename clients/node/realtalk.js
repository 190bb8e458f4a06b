// realtalk bus client for Node.js: subscribe to the conversation, send commands.
// Wire format (docs/bus-protocol.md): [topic utf-8, msgpack map with v, ts, mono_ns, pub, seq, ...payload],
// and on the engine's control topics a third frame, its signature (only the engine can sign; readers ignore it).
// A tcp bus needs CURVE: the keys are in the connection file (curve_server_key, curve_public_key, curve_secret_key).
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const crypto = require("crypto");
const zmq = require("zeromq");
const { encode, decode } = require("@msgpack/msgpack");

function connectionFile() {
  const dir = process.env.REALTALK_RUNTIME_DIR
    || (process.env.XDG_RUNTIME_DIR ? path.join(process.env.XDG_RUNTIME_DIR, "realtalk") : `/tmp/realtalk-${os.userInfo().uid}`);
  return path.join(dir, "engine.json");
}

/** Socket options for the engine's bus: CURVE client keys when the connection file has them (tcp). */
function socketOptions(conn) {
  if (!conn.curve_server_key) return {};
  return { curveServerKey: conn.curve_server_key, curvePublicKey: conn.curve_public_key, curveSecretKey: conn.curve_secret_key };
}

class Bus {
  /** Connect to the running engine's bus (endpoints and, over tcp, CURVE keys from its connection file). */
  constructor({ name = `node:${process.pid}`, prefixes = [""], file = connectionFile() } = {}) {
    const conn = JSON.parse(fs.readFileSync(file, "utf8"));
    this.conn = conn;
    this.name = name;
    this.seq = 0;
    this.pub = new zmq.Publisher(socketOptions(conn));
    this.pub.connect(conn.publish);
    this.sub = new zmq.Subscriber(socketOptions(conn));
    this.sub.connect(conn.subscribe);
    for (const p of prefixes) this.sub.subscribe(p);
    this.malformed = 0;
  }

  /** Publish `payload` on `topic`. */
  async publish(topic, payload = {}) {
    this.seq += 1;
    const body = { v: 1, ts: Date.now() / 1000, mono_ns: Number(process.hrtime.bigint()), pub: this.name, seq: this.seq, ...payload };
    await this.pub.send([topic, encode(body)]);
  }

  /** Async iterator of {topic, body}; malformed messages are counted and skipped.
   *  A third frame is the engine's signature of a control message: accepted, not checked here. */
  async *messages() {
    for await (const frames of this.sub) {
      if (frames.length !== 2 && frames.length !== 3) { this.malformed += 1; continue; }
      let body;
      try { body = decode(frames[1]); } catch { this.malformed += 1; continue; }
      if (body === null || typeof body !== "object" || Array.isArray(body)) { this.malformed += 1; continue; }
      yield { topic: frames[0].toString("utf8"), body };
    }
  }

  /** Send a command and resolve with its cmd.ack (re-sent until acknowledged; the engine dedups by id). */
  async command(topic, payload, { timeoutMs = 10000 } = {}) {
    const id = payload.id || crypto.randomUUID();
    const acks = new zmq.Subscriber(socketOptions(this.conn));
    acks.connect(this.conn.subscribe);
    acks.subscribe("cmd.ack");
    const deadline = Date.now() + timeoutMs;
    const waitAck = (async () => {
      for await (const [, raw] of acks) {
        const body = decode(raw);
        if (body.id === id) return body;
      }
    })();
    let ack = null;
    waitAck.then((a) => { ack = a; });
    while (ack === null && Date.now() < deadline) {
      await this.publish(topic, { ...payload, id });
      await new Promise((r) => setTimeout(r, 300));
    }
    acks.close();
    if (ack === null) throw new Error(`no cmd.ack for ${topic} within ${timeoutMs} ms`);
    return ack;
  }

  /** Add a message to the conversation (role user or system); the model answers if respond. */
  say(text, { role = "user", respond = role === "user" } = {}) {
    return this.command("cmd.say", { text, role, respond });
  }

  /** Serve a tool the model can call: `fn(args)` (may be async) returns a string or a JSON value.
   *  The engine ties the tool to this client (`owner` = this bus's name) and unregisters it when
   *  the client goes away: the broker sees its `_presence.<owner>` subscription end. */
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
    const ack = await this.command("cmd.tool.register", { name, description, parameters, timeout_s: timeoutS, owner: this.name });
    if (!ack.ok) throw new Error(`tool ${name} refused: ${ack.error}`);
    return ack;
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
    this.pub.close(); this.sub.close();
    if (this.toolSub) this.toolSub.close();
  }
}

module.exports = { Bus, connectionFile, socketOptions };
