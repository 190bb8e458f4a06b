// The Node client against a real engine on the local server: a tool served with registerTool
// answers the model, and goes when its client does (presence). Run with `npm test`.
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

function startEngine(dir) {
  fs.writeFileSync(path.join(dir, "sc.yaml"), SCENARIO);
  const env = { ...process.env, REALTALK_RUNTIME_DIR: path.join(dir, "run"), XDG_DATA_HOME: path.join(dir, "data") };
  delete env.OPENAI_API_KEY;
  fs.mkdirSync(env.REALTALK_RUNTIME_DIR, { mode: 0o700 });
  const proc = spawn(PYTHON, ["-m", "engine.api.cli", "start", "--backend", "local", "--text-only", "--scenario",
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
    const said = await watcher.say("Where is the collection point?");   // its outcome: the item the engine added
    assert.strictEqual(said.ok, true);
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
