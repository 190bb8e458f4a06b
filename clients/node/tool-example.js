// A tool answered from Node.js: registers `ask_client` and answers every call.
//   node clients/node/tool-example.js
"use strict";
const { Bus } = require("./realtalk");

async function main() {
  const bus = new Bus({ prefixes: ["tool.call", "_presence." + `node:${process.pid}`] });
  await bus.command("cmd.tool.register", {
    name: "ask_client",
    description: "Ask the client program for a fact the model does not know",
    parameters: { type: "object", properties: { question: { type: "string" } }, required: ["question"] },
    owner: `node:${process.pid}`,
  });
  console.log("ask_client registered");
  for await (const { topic, body } of bus.messages()) {
    if (topic !== "tool.call" || body.name !== "ask_client") continue;
    const { question } = JSON.parse(body.arguments || "{}");
    console.log(`model asks: ${question}`);
    await bus.publish("cmd.tool.result", { call_id: body.call_id, output: "The collection point is the Northern Train Station office." });
  }
}
main().catch((e) => { console.error(e.message); process.exit(1); });
