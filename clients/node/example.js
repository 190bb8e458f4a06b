// Print the model's words as they come, and ask it something.
//   node clients/node/example.js "What is the capital of France?"
"use strict";
const { Bus } = require("./realtalk");

async function main() {
  const bus = new Bus({ prefixes: ["model.", "user.transcript.done", "cost.session"] });
  const question = process.argv[2] || "Hello from Node.js!";
  const ack = await bus.say(question);
  console.log(`said (${ack.item_id}): ${question}`);
  for await (const { topic, body } of bus.messages()) {
    if (topic.endsWith(".done")) console.log(`${topic}: ${body.text}`);
    if (topic === "cost.session") console.log(`cost so far: $${body.usd.toFixed(5)}`);
    if (topic === "model.text.done" || topic === "model.transcript.done") break;
  }
  bus.close();
}
main().catch((e) => { console.error(e.message); process.exit(1); });
