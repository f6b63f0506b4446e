// transformers.js in Node on an export folder, as a user would run it:
//   node node_run.mjs JS_DIR FOLDER DTYPE TEXTS_JSON [MAX_NEW_TOKENS]
// prints, per text, the classifier's scores (label names) or the greedy token ids.
import { createRequire } from 'node:module';

const [jsDir, folder, dtype, textsJson, maxNew = '32'] = process.argv.slice(2);
const require = createRequire(`${jsDir}/package.json`);
const { env, pipeline, AutoTokenizer, AutoModelForCausalLM, AutoConfig } = require('@huggingface/transformers');
env.allowRemoteModels = false;

const texts = JSON.parse(textsJson);
const config = await AutoConfig.from_pretrained(folder);
const out = [];
if (config.architectures[0].endsWith('ForSequenceClassification')) {
  const classify = await pipeline('text-classification', folder, { dtype });
  for (const text of texts) out.push({ text, scores: await classify(text, { top_k: null }) });
} else {
  const tokenizer = await AutoTokenizer.from_pretrained(folder);
  const model = await AutoModelForCausalLM.from_pretrained(folder, { dtype });
  for (const prompt of texts) {
    const inputs = tokenizer(prompt);
    const ids = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
    out.push({ prompt, ids: ids.tolist()[0].slice(inputs.input_ids.dims[1]).map(Number) });
  }
}
console.log(JSON.stringify(out));
