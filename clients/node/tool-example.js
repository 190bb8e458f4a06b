// A tool answered from Node.js: registers `ask_client` and answers every call until stopped.
//   node clients/node/tool-example.js
"use strict";
const { Bus } = require("./realtalk");

async function main() {
  const bus = new Bus({ prefixes: [] });
  await bus.registerTool("ask_client", ({ question }) => {
    console.log(`model asks: ${question}`);
    return "The collection point is the Northern Train Station office.";
  }, {
    description: "Ask the client program for a fact the model does not know",
    parameters: { type: "object", properties: { question: { type: "string" } }, required: ["question"] },
  });
  console.log("ask_client registered");
  await bus.toolLoop;  // answer calls until the process is stopped
}
main().catch((e) => { console.error(e.message); process.exit(1); });
