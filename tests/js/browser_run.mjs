// An export's page (index.html) in headless Chromium, driven through its `qelalora.run` API:
//   node browser_run.mjs JS_DIR URL TEXTS_JSON [SCREENSHOT.png]
// prints the page's results; the page's own console goes to stderr.
import { createRequire } from 'node:module';

const [jsDir, url, textsJson, screenshot] = process.argv.slice(2);
const require = createRequire(`${jsDir}/package.json`);
const puppeteer = require('puppeteer-core');

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 820, height: 540 });
  page.on('console', (m) => console.error(`page: ${m.text()}`));
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  page.on('response', (r) => r.status() >= 400 && console.error(`page: HTTP ${r.status()} ${r.url()}`));
  await page.goto(url);
  await page.waitForFunction(() => !document.getElementById('status').textContent.startsWith('loading'), { timeout: 120000 });
  const status = await page.$eval('#status', (el) => el.textContent);
  if (!status.startsWith('ready')) throw new Error(`the page says: ${status}`);
  const texts = JSON.parse(textsJson);
  await page.$eval('#input', (el, value) => { el.value = value; }, texts.join('\n'));
  const results = await page.evaluate((t) => window.qelalora.run(t), texts);
  if (screenshot) await page.screenshot({ path: screenshot });
  console.log(JSON.stringify(results));
} finally {
  await browser.close();
}
