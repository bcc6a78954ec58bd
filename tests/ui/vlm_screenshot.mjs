// Opens the MiniMind-V Gradio page in Debian's headless Chromium, uploads a picture, asks about it like a person
// would (types, presses Enter), waits for the streamed answer and saves a screenshot.
//
//   node tests/ui/vlm_screenshot.mjs [page URL] [picture] [output PNG] [question]
//
// Uses playwright-core with the system browser (/usr/bin/chromium, or $CHROMIUM): no browser download.
import { chromium } from "playwright-core";

const url = process.argv[2] || "http://127.0.0.1:7860";
const picture = process.argv[3];
const output = process.argv[4] || "docs/img/vlm.png";
const question = process.argv[5] || "What colour is the shape?";
const answerTimeoutMs = Number(process.env.ANSWER_TIMEOUT_MS || 240000);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1 });
  await page.goto(url, { waitUntil: "domcontentloaded" });
  const input = page.locator("textarea").first();
  await input.waitFor({ timeout: 60000 });
  await page.locator("input[type=file]").first().setInputFiles(picture);
  // the upload shows as a thumbnail in the input box before the message can carry it
  await page.locator("img").first().waitFor({ timeout: 30000 });
  await input.fill(question);
  await input.press("Enter");
  const bot = page.locator(".message.bot, [data-testid=bot]").last();
  await bot.waitFor({ timeout: answerTimeoutMs });
  // streaming is over when the submit button is back (the stop button shows while it streams)
  await page.waitForFunction(
    () => !document.querySelector("button.stop-button, button[aria-label='Stop']") ||
      getComputedStyle(document.querySelector("button.stop-button, button[aria-label='Stop']")).display === "none",
    null,
    { timeout: answerTimeoutMs },
  );
  await page.waitForTimeout(1000);
  const answer = (await bot.innerText()).trim();
  if (!answer || answer.includes("⚠️")) throw new Error(`no answer on the page: ${answer}`);
  console.log(JSON.stringify({ url, question, answer }, null, 2));
  await page.screenshot({ path: output, fullPage: true });
  console.log(`screenshot saved to ${output}`);
} finally {
  await browser.close();
}
