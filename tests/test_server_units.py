"""Server parts that need no running engine: settings, request mapping, tool-call parsing, SSE error framing."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.backends.vllm import vllm_sampling_kwargs
from engine.errors import EngineError, InvalidRequestError
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutputsParams
from server import settings as settings_mod
from server.errors import APIError
from server.params import resolve_max_tokens, sampling_params
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.streaming import sse_response
from server.tool_calls import ToolCallStreamParser, parse_tool_calls


def parse(argv: list[str], env: dict[str, str]) -> settings_mod.Settings:
    parser = argparse.ArgumentParser()
    settings_mod.add_arguments(parser)
    return settings_mod.from_args(parser.parse_args(argv), env)


def test_settings_flag_beats_env_beats_default():
    s = parse(["--port", "9001"], {"MINIMIND_PORT": "9002", "MINIMIND_MAX_NUM_SEQS": "8"})
    assert s.port == 9001 and s.max_num_seqs == 8 and s.host == "0.0.0.0" and s.backend == "native"


def test_settings_lists_repeatable_flags_and_comma_separated_env():
    assert parse(["--api-key", "a", "--api-key", "b"], {}).api_key == ["a", "b"]
    env = {"MINIMIND_API_KEY": "x, y", "MINIMIND_CORS_ORIGINS": "http://localhost:3000"}
    s = parse([], env)
    assert s.api_key == ["x", "y"] and s.cors_origins == ["http://localhost:3000"]


def test_settings_every_option_has_an_env_variable():
    env = {
        "MINIMIND_MODEL": "m",
        "MINIMIND_BACKEND": "vllm",
        "MINIMIND_HOST": "127.0.0.1",
        "MINIMIND_SERVED_MODEL_NAME": "n",
        "MINIMIND_MAX_MODEL_LEN": "128",
        "MINIMIND_MAX_QUEUE": "3",
        "MINIMIND_DRAFT_MODEL": "d",
        "MINIMIND_NUM_SPECULATIVE_TOKENS": "2",
        "MINIMIND_LORA": "l",
        "MINIMIND_DTYPE": "bfloat16",
        "MINIMIND_DEVICE": "cpu",
        "MINIMIND_DRAIN_TIMEOUT": "1.5",
    }
    s = parse([], env)
    assert (s.model, s.backend, s.host, s.served_model_name, s.max_model_len, s.max_queue) == (
        "m",
        "vllm",
        "127.0.0.1",
        "n",
        128,
        3,
    )
    assert (s.draft_model, s.num_speculative_tokens, s.lora, s.dtype, s.device, s.drain_timeout) == (
        "d",
        2,
        "l",
        "bfloat16",
        "cpu",
        1.5,
    )


def test_settings_yes_no_option_as_flag_and_variable():
    assert parse([], {}).compile is False
    assert parse(["--compile"], {}).compile is True
    assert parse([], {"MINIMIND_COMPILE": "true"}).compile is True
    assert parse([], {"MINIMIND_COMPILE": "0"}).compile is False
    assert parse(["--no-compile"], {"MINIMIND_COMPILE": "1"}).compile is False  # the flag wins
    with pytest.raises(settings_mod.SettingsError, match="MINIMIND_COMPILE='maybe' is not a yes/no value"):
        parse([], {"MINIMIND_COMPILE": "maybe"})


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"MINIMIND_PORT": "eighty"}, "MINIMIND_PORT='eighty'"),
        ({"MINIMIND_BACKEND": "tgi"}, "native, vllm"),
        ({"MINIMIND_PORT": "70000"}, "--port must be between 1 and 65535"),
    ],
)
def test_settings_bad_values_say_what_and_how(env, needle):
    with pytest.raises(settings_mod.SettingsError, match=None) as err:
        parse([], env)
    assert needle in str(err.value)


def test_request_maps_onto_sampling_params_with_vllm_names():
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 7,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "presence_penalty": 0.3,
            "frequency_penalty": 0.2,
            "n": 2,
            "stop": "END",
            "seed": 42,
            "ignore_eos": True,
            "min_tokens": 2,
            "stop_token_ids": [5],
            "an_unknown_field": {"is": "ignored"},
        }
    )
    params = sampling_params(body, max_tokens=10, vocab_size=100, logprobs=3)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.5, 0.9, 7, 0.05)
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.1, 0.3, 0.2)
    assert (params.n, params.stop, params.seed, params.ignore_eos, params.min_tokens) == (2, ["END"], 42, True, 2)
    assert (params.stop_token_ids, params.max_tokens, params.logprobs) == ([5], 10, 3)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"n": 0}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": 2**70}, "seed"),
        ({"stop_token_ids": [100]}, "stop_token_ids"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ],
)
def test_bad_sampling_fields_are_400_naming_the_field(fields, param):
    body = CompletionRequest.model_validate({"prompt": "x", **fields})
    with pytest.raises(APIError) as err:
        sampling_params(body, max_tokens=4, vocab_size=100)
    assert err.value.status == 400 and err.value.param == param


def test_context_overflow_names_both_numbers():
    with pytest.raises(APIError) as err:
        resolve_max_tokens(100, 200, 256, "max_tokens")
    assert err.value.status == 400 and "100" in err.value.message and "200" in err.value.message
    assert resolve_max_tokens(100, None, 256, "max_tokens") == 156


def test_vllm_mapping_is_one_to_one_and_top_k_off_is_minus_one():
    params = SamplingParams(
        n=3, temperature=0.7, top_k=0, stop=["x"], seed=1, logprobs=2, prompt_logprobs=1, max_tokens=9
    )
    kwargs = vllm_sampling_kwargs(params)
    assert kwargs["top_k"] == -1 and kwargs["n"] == 3 and kwargs["temperature"] == 0.7
    assert kwargs["stop"] == ["x"] and kwargs["stop_token_ids"] is None and kwargs["seed"] == 1
    assert (kwargs["logprobs"], kwargs["prompt_logprobs"], kwargs["max_tokens"]) == (2, 1, 9)
    # every engine field reaches vLLM under the same name (logprobs_mode is engine-wide there: raw only)
    assert set(SamplingParams.__dataclass_fields__) - {"logprobs_mode"} == set(kwargs)
    with pytest.raises(InvalidRequestError, match="logprobs_mode"):
        vllm_sampling_kwargs(SamplingParams(logprobs_mode="processed"))
    assert vllm_sampling_kwargs(SamplingParams(top_k=5))["top_k"] == 5
    # a grammar goes to vLLM with vLLM's StructuredOutputsParams field names
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    constrained = vllm_sampling_kwargs(SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)))
    assert constrained["structured_outputs"] == {
        "json": schema,
        "regex": None,
        "choice": None,
        "grammar": None,
        "json_object": False,
    }
    assert kwargs["structured_outputs"] is None


def test_tool_calls_parse_whole_and_streamed():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_")
    assert parse_tool_calls("<tool_call>not json</tool_call>")[1] == []

    parser = ToolCallStreamParser()
    pieces = [
        "Let me",
        " check.\n<tool",
        '_call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Paris"}}\n</tool_call>',
    ]
    shown = "".join(parser.feed(p) for p in pieces)
    rest, streamed = parser.finish()
    assert "<tool" not in shown and shown + rest == "Let me check.\n"
    assert streamed[0].function.name == "get_weather"


def test_engine_failure_mid_stream_sends_error_event_then_done():
    async def events():
        yield {"n": 1}
        raise EngineError("the engine broke: out of memory")

    app = FastAPI()
    app.get("/s")(lambda: sse_response(events()))
    with TestClient(app) as client:
        lines = [line for line in client.get("/s").text.splitlines() if line.startswith("data: ")]
    assert lines[0] == 'data: {"n":1}'
    error = json.loads(lines[1][len("data: ") :])["error"]
    assert error["message"] == "the engine broke: out of memory" and error["code"] == "engine_error"
    assert lines[2] == "data: [DONE]"


def test_vllm_backend_embeddings_match_the_native_pooling(tmp_path):
    """The vLLM backend embeds through transformers on the converted llama directory: same vectors as native."""
    import torch
    from transformers import AutoModel

    from engine.backends.vllm import hf_embeddings
    from models.convert import convert
    from tests.conftest import UPSTREAM_FIXTURES, tiny_model

    model = tiny_model(seed=3)
    model.save_pretrained(tmp_path / "minimind")
    convert(tmp_path / "minimind", tmp_path / "llama", "llama", tokenizer=UPSTREAM_FIXTURES / "minimind3-dense")
    llama = AutoModel.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    prompts = [[5, 9, 200, 31], [7]]
    got = hf_embeddings(llama, prompts, "cpu")
    with torch.inference_mode():
        for prompt, vector in zip(prompts, got):
            hidden = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0]
            want = torch.nn.functional.normalize(hidden.mean(0), dim=-1)
            assert torch.allclose(torch.tensor(vector), want, atol=1e-5)


def test_byte_sizes_take_units_and_name_the_problem():
    assert [settings_mod.byte_size(t) for t in ("2GiB", "512MiB", "4MB", "1.5G", "100", "8 KiB")] == [
        2 << 30,
        512 << 20,
        4_000_000,
        3 << 29,
        100,
        8 << 10,
    ]
    s = parse(["--kv-cache-memory", "1GiB"], {"MINIMIND_MAX_REQUEST_BYTES": "1MiB"})
    assert (s.kv_cache_memory, s.max_request_bytes) == (1 << 30, 1 << 20)
    assert parse([], {}).max_request_bytes == 4 << 20 and parse([], {}).kv_cache_memory is None
    assert parse([], {"MINIMIND_TRUST_REQUEST_CHAT_TEMPLATE": "1"}).trust_request_chat_template is True
    assert parse([], {}).trust_request_chat_template is False
    with pytest.raises(settings_mod.SettingsError, match="MINIMIND_KV_CACHE_MEMORY='2 parsecs' is not a valid size"):
        parse([], {"MINIMIND_KV_CACHE_MEMORY": "2 parsecs"})


def test_start_up_warns_when_the_kv_cache_holds_fewer_sequences_than_max_num_seqs(caplog):
    """The tiny model's slot of 256 tokens takes 128 KiB: 512 KiB holds 4 of the 16 sequences asked for."""
    from server.cli import build_backend
    from server.http_server import log_capacity
    from tests.test_server_support import tiny_model_dir

    settings = settings_mod.Settings(
        model=str(tiny_model_dir()), device="cpu", max_model_len=256, max_num_seqs=16, kv_cache_memory=512 << 10
    )
    backend = build_backend(settings)
    assert backend.core.cache.num_slots == 4
    with caplog.at_level("INFO", logger="minimind.server"):
        log_capacity(backend.info, settings.max_num_seqs)
    assert "KV cache: 4 sequences of up to 256 tokens (128KiB each, budget 512KiB)" in caplog.text
    warning = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "holds only 4 sequences" in warning[0].getMessage()
    assert "--kv-cache-memory (to at least 2MiB)" in warning[0].getMessage()


def test_fast_encode_gives_the_tokenizers_own_ids():
    """prompts.encode takes the Rust tokenizer's encode_batch_fast (it releases the GIL): same ids as a call."""
    from transformers import AutoTokenizer

    from server.prompts import encode
    from tests.conftest import UPSTREAM_FIXTURES

    tokenizer = AutoTokenizer.from_pretrained(UPSTREAM_FIXTURES / "minimind3-dense")
    texts = [
        "hello world",
        "<|im_start|>user\nhi<|im_end|>\n",
        "日本語 テキスト 🙂",
        "  two  spaces\t\n\n",
        "",
        "a" * 3000,
    ]
    for text in texts:
        for special in (True, False):
            want = tokenizer(text, add_special_tokens=special)["input_ids"]
            assert encode(tokenizer, text, add_special_tokens=special) == want, (text, special)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="one socket per API process on Linux only")
def test_bind_ports_gives_each_api_process_a_socket_and_refuses_a_port_another_server_holds():
    import socket

    from server.listen import bind_ports
    from server.settings import SettingsError
    from tests.test_server_support import free_port

    group = bind_ports("127.0.0.1", free_port(), 3)
    try:
        port = group[0].getsockname()[1]
        assert len(group) == 3 and {s.getsockname()[1] for s in group} == {port}
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in group)
        for s in group:
            s.listen()
        # a second server on the same port, even with SO_REUSEPORT itself, is told the port is taken
        with pytest.raises(SettingsError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind_ports("127.0.0.1", port, 3)
        with pytest.raises(SettingsError, match="already in use"):
            bind_ports("127.0.0.1", port, 1)
    finally:
        for s in group:
            s.close()
    (again,) = bind_ports("127.0.0.1", port, 1)  # the port is free again once the group has closed
    again.close()
