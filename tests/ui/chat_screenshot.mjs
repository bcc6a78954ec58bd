// Opens the chat page in Debian's headless Chromium, sends a message like a person would (types, presses
// Enter), waits for the streamed answer and its stats line, and saves a screenshot.
//
//   node tests/ui/chat_screenshot.mjs [page URL] [output PNG] [message]
//
// Uses playwright-core with the system browser (/usr/bin/chromium, or $CHROMIUM): no browser download.
import { chromium } from "playwright-core";

const url = process.argv[2] || "http://127.0.0.1:8501";
const output = process.argv[3] || "docs/img/chat.png";
const message = process.argv[4] || "What is the capital of France? Answer in one sentence.";
const answerTimeoutMs = Number(process.env.ANSWER_TIMEOUT_MS || 240000);
// TEMPERATURE=0 moves the page's temperature slider to 0 (greedy decoding) first, for a reproducible answer.
const greedy = process.env.TEMPERATURE === "0";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1 });
  await page.goto(url, { waitUntil: "domcontentloaded" });
  const input = page.getByTestId("stChatInputTextArea");
  await input.waitFor({ timeout: 60000 });
  // The model picker is filled from /v1/models: wait until the page shows which model it talks to.
  await page.getByText(/^Model: /).waitFor({ timeout: 60000 });
  if (greedy) {
    const temperature = page.getByTestId("stSlider").filter({ hasText: "Temperature" });
    await temperature.getByRole("slider").focus();
    await temperature.getByRole("slider").press("Home");
    const shown = temperature.getByTestId("stSliderThumbValue");
    for (let i = 0; (await shown.innerText()).trim() !== "0.00"; i++) {
      if (i > 100) throw new Error(`the temperature slider shows ${await shown.innerText()}, not 0.00`);
      await page.waitForTimeout(100);
    }
    // Let Streamlit's rerun for the new value finish before typing.
    await page.waitForTimeout(1000);
  }
  await input.fill(message);
  await input.press("Enter");
  // The stats line (tokens, tok/s) is drawn under the answer once the stream has ended.
  await page.getByText(/completion tokens/).first().waitFor({ timeout: answerTimeoutMs });
  const errors = await page.getByTestId("stAlertContentError").allInnerTexts();
  if (errors.length) throw new Error(`the page shows an error: ${errors.join(" | ")}`);
  const bubbles = await page.getByTestId("stChatMessage").allInnerTexts();
  console.log(JSON.stringify({ url, message, bubbles }, null, 2));
  await page.screenshot({ path: output, fullPage: true });
  console.log(`screenshot saved to ${output}`);
} finally {
  await browser.close();
}
