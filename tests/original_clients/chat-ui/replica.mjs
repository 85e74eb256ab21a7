// A replica of one conversation turn loop of the CodeAct chat-ui fork's server route
// (conversation-server.ts beside this file, Apache-2.0, LICENSE beside it), for running against our servers
// where the whole app (SvelteKit, MongoDB) cannot be built.
//
// What decides whether code runs is not rewritten: the two pieces of the route that detect the <execute>
// block and call JUPYTER_API_URL + "/execute" are cut out of conversation-server.ts at run time, by their
// first and last lines, and run verbatim. Around them, as the route and its endpoint do: the model's reply
// streamed from an OpenAI-compatible /chat/completions with the model's parameters from env.template
// (openAIChatToTextGenerationStream's accumulation: delta contents, generated_text on finish "stop"), and
// the "Execution Output:\n" message fed back, until no block is found or N_EXECUTION_LIMIT is reached.
//
// Usage: OPENAI_BASE_URL=... JUPYTER_API_URL=... N_EXECUTION_LIMIT=3 node replica.mjs "user message"
// Prints {"messages": [...], "statuses": [...]} as JSON.

import { readFileSync } from "node:fs";

const route = readFileSync(new URL("./conversation-server.ts", import.meta.url), "utf8").split("\n");

function piece(first, last) {
  const start = route.findIndex((line) => line.includes(first));
  const end = route.findIndex((line, index) => index > start && line.includes(last));
  if (start < 0 || end < 0) throw new Error(`conversation-server.ts has no piece from ${first} to ${last}`);
  return route.slice(start, end).join("\n");
}

// Lines 328-334: complete a trailing "</execute", then match the block.
const detect = piece("// if lastMessage.content ends with '</execute'", "if (match) {");
// Lines 369-425: POST the block to JUPYTER_API_URL + "/execute", then shape the output for the model.
const execute = piece("const substringBetweenExecuteTags = match[1].trim();", "// create a new message with the execution output");

const AsyncFunction = (async () => {}).constructor;
const runDetect = new Function("lastMessage", `${detect}\nreturn match;`);
const runExecute = new AsyncFunction("match", "convId", "update", "JUPYTER_API_URL", `${execute}\nreturn executionOutput;`);

// The model's preprompt and parameters from env.template (beside this file), as chat-ui sends them to an
// "openai" endpoint (chat completions, its default).
const template = readFileSync(new URL("./env.template", import.meta.url), "utf8");
const PREPROMPT = JSON.parse(template.match(/"preprompt": (".*"),\n/)[1]);
const given = JSON.parse(template.match(/"parameters": (\{[\s\S]*?\})/)[1]);
const parameters = { temperature: given.temperature, top_p: given.top_p, max_tokens: given.max_new_tokens, stop: given.stop };

async function* completionStream(messages) {
  const response = await fetch(process.env.OPENAI_BASE_URL + "/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer sk-" },
    body: JSON.stringify({ model: process.env.MODEL ?? "CodeActAgent-Mistral-7b-v0.1", stream: true,
      messages: [{ role: "system", content: PREPROMPT }, ...messages.map((m) => ({ role: m.from, content: m.content }))],
      ...parameters }),
  });
  if (!response.ok) throw new Error(`model server answered ${response.status}: ${await response.text()}`);
  const decoder = new TextDecoder();
  let buffered = "";
  for await (const bytes of response.body) {
    buffered += decoder.decode(bytes, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("");
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
  }
}

// openAIChatToTextGenerationStream, as in the fork.
async function* textGenerationStream(messages) {
  let generatedText = "";
  for await (const completion of completionStream(messages)) {
    const { choices } = completion;
    const content = choices[0]?.delta?.content ?? "";
    const last = choices[0]?.finish_reason === "stop";
    if (content) generatedText = generatedText + content;
    yield { token: { text: content ?? "", special: false }, generated_text: last ? generatedText : null };
  }
}

const convId = "chat-ui-" + Date.now();
const statuses = [];
const update = (u) => statuses.push(u);
let messages = [{ from: "user", content: process.argv[2] }];
let execCount = 0;
while (messages[messages.length - 1].from === "user" && execCount < parseInt(process.env.N_EXECUTION_LIMIT ?? "3")) {
  for await (const output of textGenerationStream(messages)) {
    if (!output.generated_text) {
      const lastMessage = messages[messages.length - 1];
      if (lastMessage?.from !== "assistant") messages = [...messages, { from: "assistant", content: output.token.text.trimStart() }];
      else lastMessage.content += output.token.text;
    } else {
      messages = [...messages.slice(0, -1), { ...messages[messages.length - 1], content: output.generated_text }];
    }
  }
  const lastMessage = messages[messages.length - 1];
  const match = runDetect(lastMessage);
  if (!match) break;
  const executionOutput = await runExecute(match, convId, update, process.env.JUPYTER_API_URL);
  messages = [...messages, { from: "user", content: "Execution Output:\n" + executionOutput + "\n" }];
  execCount += 1;
}
console.log(JSON.stringify({ messages, statuses }));
