// One non-stream and one stream chat completion with the official OpenAI Node SDK.
// Usage: node check.mjs BASE_URL API_KEY MODEL   (prints one JSON line with what it saw)
import OpenAI from "openai";

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const messages = [{ role: "user", content: "Hello from Node" }];

const whole = await client.chat.completions.create({ model, messages, max_tokens: 5, ignore_eos: true });
const stream = await client.chat.completions.create({
  model,
  messages,
  max_tokens: 5,
  ignore_eos: true,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let finish = null;
let usage = null;
let firstRole = null;
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  const choice = chunk.choices[0];
  if (!choice) continue;
  if (firstRole === null) firstRole = choice.delta.role ?? "";
  text += choice.delta.content ?? "";
  if (choice.finish_reason) finish = choice.finish_reason;
}
console.log(
  JSON.stringify({
    id: whole.id,
    content: whole.choices[0].message.content,
    finish: whole.choices[0].finish_reason,
    usage: whole.usage,
    stream_role: firstRole,
    stream_finish: finish,
    stream_usage: usage,
    stream_text_length: text.length,
  }),
);
