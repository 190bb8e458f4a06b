// The Node client against a real engine on the local server: a tool served with registerTool
// answers the model, and goes when its client does (presence); on GPT-Live the same tool answers a
// delegation, and context, instructions and commentary are placed. Run with `npm test`.
"use strict";
const test = require("node:test");
const assert = require("node:assert");
const fs = require("fs");
const os = require("os");
const path = require("path");
const { spawn } = require("child_process");
const { Bus } = require("../realtalk");

const REPO = path.resolve(__dirname, "..", "..", "..");
const PYTHON = process.env.PYTHON || path.join(REPO, ".venv", "bin", "python");
const SCENARIO = `turns:
  - match: {regex: "collection point"}
    call: {name: ask_client, arguments: {question: "Where is the collection point?"}}
    then: "{output}"
`;

// GPT-Live: the caller's question (turn 1) is delegated; the answer is said with the booking the
// context gave ({context}) and the tool's output
const LIVE_SCENARIO = `turns:
  - match: {turn: 1}
    hear: "where is the collection point"
    delegate: {ack: "Let me check."}
    then: "For booking {context}, the car is at {output}."
`;

function startEngine(dir, { scenario = SCENARIO, args = ["--text-only"] } = {}) {
  fs.writeFileSync(path.join(dir, "sc.yaml"), scenario);
  const env = { ...process.env, REALTALK_RUNTIME_DIR: path.join(dir, "run"), XDG_DATA_HOME: path.join(dir, "data") };
  delete env.OPENAI_API_KEY;
  fs.mkdirSync(env.REALTALK_RUNTIME_DIR, { mode: 0o700 });
  const proc = spawn(PYTHON, ["-m", "engine.api.cli", "start", "--backend", "local", ...args, "--scenario",
                              path.join(dir, "sc.yaml")], { cwd: dir, env, stdio: ["ignore", "pipe", "pipe"] });
  const ready = new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`engine not ready:\n${out}`)), 30000);
    proc.stdout.on("data", (d) => { out += d; if (out.includes("ready in")) { clearTimeout(timer); resolve(); } });
    proc.on("exit", (code) => reject(new Error(`engine exited ${code}:\n${out}`)));
  });
  return { proc, ready, file: path.join(env.REALTALK_RUNTIME_DIR, "engine.json") };
}

async function next(bus, pred, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  const it = bus.messages()[Symbol.asyncIterator]();
  while (Date.now() < deadline) {
    let timer;
    const r = await Promise.race([it.next(), new Promise((res) => { timer = setTimeout(() => res(null), deadline - Date.now()); })]);
    clearTimeout(timer);
    if (r === null || r.done) break;
    if (pred(r.value)) return r.value;
  }
  throw new Error("timed out waiting for a bus message");
}

test("registerTool answers the model and goes with its client", { timeout: 90000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "realtalk-node-"));
  const engine = startEngine(dir);
  try {
    await engine.ready;
    const watcher = new Bus({ file: engine.file, prefixes: ["model.text.done", "engine.tools"] });
    const tools = new Bus({ file: engine.file, name: `node-tools:${process.pid}`, prefixes: [] });
    const asked = [];
    await tools.registerTool("ask_client", ({ question }) => { asked.push(question); return "Northern Train Station"; },
                             { parameters: { type: "object", properties: { question: { type: "string" } } } });
    // the first command waits until its replies can reach it (a probe came back through the broker):
    // an outcome published before the reply subscriber joined was lost for good
    const sent = [];
    watcher.pub = new Proxy(watcher.pub, { get(pub, key) {
      if (key === "send") return (frames) => { sent.push([frames[0].toString(), watcher.replyJoined]); return pub.send(frames); };
      const value = pub[key];
      return typeof value === "function" ? value.bind(pub) : value;
    } });
    const said = await watcher.say("Where is the collection point?");   // its outcome: the item the engine added
    assert.strictEqual(said.ok, true);
    assert.match(sent[0][0], /^_join\./, JSON.stringify(sent));
    assert.deepStrictEqual(sent.filter(([t]) => t === "cmd.say").map(([, joined]) => joined).slice(0, 1), [true]);
    assert.ok(said.item_id.startsWith("item_"), JSON.stringify(said));
    const ack = await watcher.command("cmd.mic", { open: true });         // acked at once by the engine's intake
    assert.strictEqual(ack.state, "queued");
    const refused = await watcher.command("cmd.nonsense", {});
    assert.strictEqual(refused.ok, false);
    assert.match(refused.error, /unknown command/);
    const done = await next(watcher, (m) => m.topic === "model.text.done", 30000);
    assert.strictEqual(done.body.text, "Northern Train Station");
    assert.deepStrictEqual(asked, ["Where is the collection point?"]);
    tools.close();  // its presence subscription ends: the engine unregisters its tool
    await next(watcher, (m) => m.topic === "engine.tools" && !m.body.tools.includes("ask_client"), 15000);
    watcher.close();
  } finally {
    engine.proc.kill("SIGINT");
    await new Promise((r) => engine.proc.on("exit", r));
  }
});

/** A spoken question as the engine's mic: `pad` seconds of silence, the local server's own voice, 2 s of silence. */
function questionWav(file, text, pad) {
  const code = "import sys, wave, numpy as np\nfrom engine.server.voice import synthesize\n"
    + "z = lambda s: np.zeros(int(24000 * s), dtype=np.int16)\n"
    + "pcm = np.concatenate([z(float(sys.argv[3])), synthesize(sys.argv[2], 'marin', 1.0), z(2)])\n"
    + "w = wave.open(sys.argv[1], 'wb'); w.setnchannels(1); w.setsampwidth(2); w.setframerate(24000)\n"
    + "w.writeframes(pcm.astype('<i2').tobytes()); w.close()\n";
  const out = require("child_process").spawnSync(PYTHON, ["-c", code, file, text, String(pad)], { cwd: REPO, encoding: "utf8" });
  if (out.status !== 0) throw new Error(`could not make ${file}: ${out.stderr}`);
}

test("on GPT-Live: registerTool answers a delegation; context, instructions and commentary are placed",
     { timeout: 120000 }, async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "realtalk-node-live-"));
  const wav = path.join(dir, "question.wav");
  questionWav(wav, "Where is the collection point?", 5);   // time for the tool to register first
  const engine = startEngine(dir, { scenario: LIVE_SCENARIO,
                                    args: ["--model", "gpt-live-1", "--mic", wav, "--speaker", "null", "--speed", "2"] });
  const buses = [];
  try {
    await engine.ready;
    const watcher = new Bus({ file: engine.file, prefixes: ["model.transcript.done", "tool.call"] });
    const tools = new Bus({ file: engine.file, name: `node-live-tools:${process.pid}`, prefixes: [] });
    buses.push(watcher, tools);
    const asked = [];
    await tools.registerTool("collection_point", (args) => { asked.push(args); return "Northern Train Station, desk 4"; }, {
      description: "Where a booking's car is collected",
      parameters: { type: "object", properties: { booking: { type: "string" } }, required: ["booking"] },
    });
    const instructions = await watcher.instructions("Answer in one short sentence.");
    assert.strictEqual(instructions.ok, true, JSON.stringify(instructions));
    assert.ok(Number.isInteger(instructions.start_ms), JSON.stringify(instructions));
    const context = await watcher.say("Avis ZX9", { role: "system" });   // silent context, placed on the timeline
    assert.strictEqual(context.ok, true, JSON.stringify(context));
    assert.ok(Number.isInteger(context.start_ms) && context.end_ms > context.start_ms, JSON.stringify(context));
    const user = await watcher.say("What time is it?");                  // no user text on GPT-Live
    assert.strictEqual(user.ok, false);
    assert.match(user.error, /GPT-Live takes no user text/);
    const call = await next(watcher, (m) => m.topic === "tool.call", 40000);
    assert.strictEqual(call.body.delegation, true);
    assert.strictEqual(call.body.name, "collection_point");
    const answer = await next(watcher, (m) => m.topic === "model.transcript.done"
                              && m.body.text.includes("Northern Train Station"), 40000);
    assert.match(answer.body.text, /Avis ZX9/);
    assert.strictEqual(asked.length, 1);
    assert.match(asked[0].request, /collection point/);
    assert.strictEqual(asked[0].booking, asked[0].request);             // a required string parameter gets the request
    const said = await watcher.commentary("Thank you for waiting.");    // the model says it in its own words
    assert.strictEqual(said.ok, true, JSON.stringify(said));
    await next(watcher, (m) => m.topic === "model.transcript.done" && m.body.text.includes("Thank you for waiting"), 30000);
  } finally {
    for (const bus of buses) bus.close();   // open sockets would keep the test process alive
    engine.proc.kill("SIGINT");
    await new Promise((r) => engine.proc.on("exit", r));
  }
});
