// The README's curl examples for the HTTP gateway, one by one, with Node's plain fetch
// (no packages). Run by tests/gateway/test_task_api.py against a real gateway:
//   VQ_GATEWAY=http://127.0.0.1:8000 VQ_API_KEY=... VQ_MODEL_NAME=... IMAGE=a.png node readme_examples.mjs
// Prints one JSON line describing what it saw; exits non-zero on any unexpected answer.
import { readFileSync } from "node:fs";
import { basename } from "node:path";

const gateway = process.env.VQ_GATEWAY;
const key = process.env.VQ_API_KEY;
const model = process.env.VQ_MODEL_NAME;
const image = readFileSync(process.env.IMAGE);
const auth = { Authorization: `Bearer ${key}` };

async function call(path, init = {}) {
  const response = await fetch(gateway + path, { ...init, headers: { ...auth, ...init.headers } });
  if (!response.ok) {
    throw new Error(`${init.method ?? "GET"} ${path}: ${response.status} ${await response.text()}`);
  }
  return response;
}

// Server-sent events from a fetch body: yields {event, data, id}.
async function* events(response) {
  const decoder = new TextDecoder();
  let buffer = "";
  for await (const chunk of response.body) {
    buffer += decoder.decode(chunk, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", data: [], id: null };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = line.slice(0, colon);
        const value = line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") event.data.push(value);
        else if (field === "event") event.event = value;
        else if (field === "id") event.id = value;
      }
      if (event.data.length) yield { ...event, data: event.data.join("\n") };
    }
  }
}

const report = {};

// curl -s $GATEWAY/v1/models
const models = await (await call("/v1/models")).json();
report.models = models.data.map((m) => m.id);

// curl -s $GATEWAY/v1/chat/completions ... an image_url part with a data: URI
const dataUri = `data:image/png;base64,${image.toString("base64")}`;
const completion = await (
  await call("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      model,
      max_tokens: 8,
      messages: [
        {
          role: "user",
          content: [
            { type: "text", text: "What does this document say?" },
            { type: "image_url", image_url: { url: dataUri } },
          ],
        },
      ],
    }),
  })
).json();
report.completion = {
  object: completion.object,
  content: completion.choices[0].message.content,
  usage: completion.usage,
};

// curl -sN $GATEWAY/v1/chat/completions ... "stream": true
const streamed = await call("/v1/chat/completions", {
  method: "POST",
  headers: { "Content-Type": "application/json" },
  body: JSON.stringify({
    model,
    max_tokens: 12,
    stream: true,
    messages: [{ role: "user", content: "Write a haiku about queues." }],
  }),
});
const streamTask = streamed.headers.get("x-task-id");
let text = "";
let done = false;
for await (const event of events(streamed)) {
  if (event.data === "[DONE]") {
    done = true;
    break;
  }
  const chunk = JSON.parse(event.data);
  text += chunk.choices[0]?.delta?.content ?? "";
}
if (!done) throw new Error("the stream did not end with [DONE]");
report.streamed = text;
report.streamed_task_text = (await (await call(`/v1/tasks/${streamTask}`)).json()).text;

// curl -s $GATEWAY/v1/tasks -F task=ocr -F images=@page.png
const form = new FormData();
form.append("task", "ocr");
form.append("images", new Blob([image], { type: "image/png" }), basename(process.env.IMAGE));
const accepted = await call("/v1/tasks", { method: "POST", body: form });
if (accepted.status !== 202) throw new Error(`submit answered ${accepted.status}`);
const { id } = await accepted.json();

// curl -sN $GATEWAY/v1/tasks/$ID/events
report.events = [];
for await (const event of events(await call(`/v1/tasks/${id}/events`))) {
  report.events.push(event.event);
  if (event.event === "end") break;
}

// curl -s $GATEWAY/v1/tasks/$ID
report.task = await (await call(`/v1/tasks/${id}`)).json();

// curl -s -X DELETE $GATEWAY/v1/tasks/$ID (the task has ended; the cancel is accepted)
report.cancel = (await call(`/v1/tasks/${id}`, { method: "DELETE" })).status;

// Without the key
report.unauthorized = (await fetch(`${gateway}/v1/models`)).status;

console.log(JSON.stringify(report));
