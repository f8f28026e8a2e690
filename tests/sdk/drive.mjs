// Drives the real Flowise SDK (npm flowise-sdk) against FLOWISE_BASE_URL with
// FLOWISE_API_KEY, exactly as an existing Flowise client would. Prints one JSON
// line with what it got.
import sdk from 'flowise-sdk';

const FlowiseClient = sdk.default ?? sdk.FlowiseClient ?? sdk;
const client = new FlowiseClient({ baseUrl: process.env.FLOWISE_BASE_URL, apiKey: process.env.FLOWISE_API_KEY });
const chatflowId = process.env.CHATFLOW_ID;

const plain = await client.createPrediction({ chatflowId, question: 'hello sdk' });
const events = [];
const stream = await client.createPrediction({ chatflowId, question: 'stream sdk', streaming: true });
for await (const ev of stream) {
  events.push(ev.event);
}
console.log(JSON.stringify({ text: plain.text, events }));
