"""The two things evaluation asks of a model, from a checkpoint in this process or from an OpenAI-compatible
server: the log-likelihood of a continuation given a context, and a short generated answer.

A server is scored through /v1/completions with `echo=true, logprobs=0, max_tokens=0` (the prompt's own token
logprobs, what lm-evaluation-harness's `local-completions` uses); the continuation's tokens are those whose
`text_offset` lies at or after the end of the context.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

import torch

from minimind.errors import MiniMindError


class EvalError(MiniMindError):
    """A bad evaluation input (data file, model, server); the message names it and the fix."""


class EvalModel(Protocol):
    name: str

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        """Sum of log p(continuation tokens | context) for each (context, continuation)."""

    def token_logprobs(self, text: str, window: int, stride: int) -> list[float]:
        """Log-probability of each predicted token of `text` (all but the first), in sliding windows."""

    def complete(self, prompt: str, max_tokens: int, chat: bool) -> str:
        """A greedy answer: a plain continuation, or (chat) the assistant's reply to `prompt` as a user turn."""

    def chat_with_tools(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int
    ) -> tuple[str, list[tuple[str, str]]]:
        """A greedy reply to a conversation with `tools` listed: (its text, its calls as (name, arguments JSON))."""

    def answer_with_images(self, question: str, images: list[bytes], max_tokens: int) -> str:
        """A vision-language model's greedy reply to a user turn whose `<image>` markers stand for `images`."""


class LocalModel:
    """A checkpoint loaded with models.loader, scored with full forward passes (no KV cache needed)."""

    def __init__(
        self,
        source: str,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        tokenizer: str | None = None,
        quantization: str = "none",
    ):
        from models.loader import load_model
        from models.quantization import quantize

        self.name = str(source) if quantization == "none" else f"{source} ({quantization})"
        self.device = device
        self.model, self.tokenizer = load_model(source, device=device, dtype=dtype, tokenizer=tokenizer)
        quantize(self.model, quantization)  # the engine's layers (models/quantization.py); "none" changes nothing
        self.max_len = self.model.config.max_position_embeddings
        self._llm: Any = None
        self._preprocess: Any = None

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """log p(row[i+1] | row[:i+1]) for each row (float32), one right-padded batch."""
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for n, row in enumerate(rows):
            batch[n, : len(row)] = torch.tensor(row)
        logits = self.model(batch.to(self.device)).logits.float().log_softmax(-1).cpu()
        out = []
        for n, row in enumerate(rows):
            targets = torch.tensor(row[1:])
            out.append(logits[n, : len(row) - 1].gather(-1, targets[:, None])[:, 0])
        return out

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        rows, spans = [], []
        for context, continuation in requests:
            ctx, cont = self._encode(context), self._encode(continuation)
            if not cont:
                raise EvalError(f"continuation {continuation!r} encodes to no tokens")
            row = (ctx + cont)[-self.max_len :]
            rows.append(row)
            spans.append(len(cont))
        results = []
        for start in range(0, len(rows), 16):
            chunk = self._logprobs(rows[start : start + 16])
            results += [float(lp[-n:].sum()) for lp, n in zip(chunk, spans[start : start + 16])]
        return results

    def token_logprobs(self, text: str, window: int, stride: int) -> list[float]:
        ids = self._encode(text)
        window = min(window, self.max_len)
        if not 1 <= stride <= window:
            raise EvalError(f"--stride {stride} must be between 1 and the window ({window})")
        scores: list[float] = []
        done, start = 1, 0  # tokens before `done` are scored (the first has no context to be predicted from)
        while done < len(ids):
            end = min(start + window, len(ids))
            (lp,) = self._logprobs([ids[start:end]])  # lp[j] scores token start + j + 1
            scores += lp[max(0, done - start - 1) :].tolist()  # a window's first token has no context
            done, start = end, start + stride
        return scores

    def complete(self, prompt: str, max_tokens: int, chat: bool) -> str:
        from engine.llm import LLM
        from engine.sampling_params import SamplingParams

        if self._llm is None:
            self._llm = LLM(self.model, device=self.device, tokenizer=self.tokenizer)
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        if chat:
            out = self._llm.chat([{"role": "user", "content": prompt}], params)
        else:
            out = self._llm.generate(prompt, params)
        return out[0].outputs[0].text

    def chat_with_tools(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int
    ) -> tuple[str, list[tuple[str, str]]]:
        from engine.llm import LLM
        from engine.sampling_params import SamplingParams
        from models.tool_calls import parse_tool_calls

        if self._llm is None:
            self._llm = LLM(self.model, device=self.device, tokenizer=self.tokenizer)
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        text = self._llm.chat(messages, params, chat_template_kwargs={"tools": tools or None})[0].outputs[0].text
        content, calls = parse_tool_calls(text)  # as the server reads them
        return content or "", [(c.name, c.arguments) for c in calls]

    @torch.no_grad()
    def answer_with_images(self, question: str, images: list[bytes], max_tokens: int) -> str:
        """Through the model's own generate() (the engine's offline API takes no images)."""
        from models.vision.config import IMAGE_MARKER
        from models.vision.image import ImagePreprocessor, open_image

        config = self.model.config
        if getattr(config, "vision_config", None) is None:
            raise EvalError(f"{self.name}: not a vision-language model (it has no vision encoder)")
        if self._preprocess is None:
            folder = Path(self.name).expanduser()
            self._preprocess = ImagePreprocessor.for_encoder(config.vision_config, folder if folder.is_dir() else None)
        text = question.replace(IMAGE_MARKER, config.image_token * config.image_token_len)
        prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        ids = torch.tensor([self._encode(prompt)], device=self.device)
        pixels = torch.stack([self._preprocess(open_image(image)) for image in images]) if images else None
        out = self.model.generate(
            ids,
            pixel_values=None if pixels is None else pixels.to(self.device),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


class ApiModel:
    """An OpenAI-compatible server (ours, vLLM, llama.cpp's server) through the `openai` SDK."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None):
        import openai

        base_url = base_url.rstrip("/")
        if not base_url.endswith("/v1"):
            base_url += "/v1"
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2)
        try:
            self.name = model or self.client.models.list().data[0].id
        except (openai.OpenAIError, IndexError) as err:
            raise EvalError(f"{base_url}: cannot list the served models ({err}); pass --api-model NAME") from err

    def _echo(self, prompt: str) -> Any:
        import openai

        try:
            reply = self.client.completions.create(
                model=self.name, prompt=prompt, echo=True, logprobs=0, max_tokens=0, temperature=0
            )
        except openai.OpenAIError as err:
            raise EvalError(f"scoring request failed: {err}") from err
        logprobs = reply.choices[0].logprobs
        if logprobs is None or not logprobs.token_logprobs:
            raise EvalError("the server returned no prompt logprobs for echo=true, logprobs=0")
        return logprobs

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        results = []
        for context, continuation in requests:
            logprobs = self._echo(context + continuation)
            picked = [
                lp
                for lp, offset in zip(logprobs.token_logprobs, logprobs.text_offset)
                if offset >= len(context) and lp is not None
            ]
            if not picked:
                raise EvalError(f"no token of the continuation {continuation!r} was scored")
            results.append(float(sum(picked)))
        return results

    def token_logprobs(self, text: str, window: int, stride: int) -> list[float]:
        """The whole text in one request (the server's context must hold it; window/stride do not apply)."""
        return [lp for lp in self._echo(text).token_logprobs if lp is not None and not math.isnan(lp)]

    def complete(self, prompt: str, max_tokens: int, chat: bool) -> str:
        import openai

        try:
            if chat:
                reply = self.client.chat.completions.create(
                    model=self.name,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=0,
                )
                return reply.choices[0].message.content or ""
            reply = self.client.completions.create(model=self.name, prompt=prompt, max_tokens=max_tokens, temperature=0)
            return reply.choices[0].text
        except openai.OpenAIError as err:
            raise EvalError(f"generation request failed: {err}") from err

    def chat_with_tools(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], max_tokens: int
    ) -> tuple[str, list[tuple[str, str]]]:
        import openai

        extra = {"tools": tools} if tools else {}
        try:
            reply = self.client.chat.completions.create(
                model=self.name, messages=messages, max_tokens=max_tokens, temperature=0, **extra
            )
        except openai.OpenAIError as err:
            raise EvalError(f"generation request failed: {err}") from err
        message = reply.choices[0].message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        return message.content or "", calls

    def answer_with_images(self, question: str, images: list[bytes], max_tokens: int) -> str:
        """The images go as data-URL `image_url` parts where the question's `<image>` markers are."""
        import base64
        import io

        import openai
        from PIL import Image

        from models.vision.config import IMAGE_MARKER

        parts: list[dict[str, Any]] = []
        for n, text in enumerate(question.split(IMAGE_MARKER)):
            if n:
                image = images[n - 1]
                try:
                    mime = Image.MIME.get(Image.open(io.BytesIO(image)).format or "", "image/png")
                except OSError:
                    mime = "application/octet-stream"  # the server names what is wrong with it
                url = f"data:{mime};base64,{base64.b64encode(image).decode()}"
                parts.append({"type": "image_url", "image_url": {"url": url}})
            if text.strip("\n"):
                parts.append({"type": "text", "text": text.strip("\n")})
        try:
            reply = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": parts}], max_tokens=max_tokens, temperature=0
            )
        except openai.OpenAIError as err:
            raise EvalError(f"generation request failed: {err}") from err
        return reply.choices[0].message.content or ""


def open_model(
    model: str | None, api_base: str | None, *, api_model: str | None = None, device: str = "cpu", **local: Any
) -> EvalModel:
    """--model (in process) or --api-base (a server; key from OPENAI_API_KEY): exactly one of them."""
    if bool(model) == bool(api_base):
        raise EvalError("give exactly one of --model CHECKPOINT (run here) or --api-base URL (a server)")
    if api_base:
        import os

        if local.get("quantization", "none") != "none":
            raise EvalError("--quantization applies to --model (run here); start the server with it instead")

        return ApiModel(api_base, model=api_model, api_key=os.environ.get("OPENAI_API_KEY"))
    if not Path(model).expanduser().exists():
        raise EvalError(f"{model}: no such checkpoint")
    return LocalModel(model, device=device, **local)
