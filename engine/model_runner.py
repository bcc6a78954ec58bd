"""Runs the model over the KV cache: batched prefill, and the decode/verify step (optionally as CUDA graphs).

Two forward shapes exist:
- `prefill`: new prompts (or the next chunk of one, or the part after a cached prefix), right-padded to one
  length, written from each row's start position into its slot (eager: prompt lengths vary too much to capture).
- `step`: every running sequence feeds T tokens (T=1 for decode, k+1 for speculative verification) from its own
  start position and reads its cache history. With CUDA graphs the batch rows *are* slots 0..bs-1 (the scheduler
  packs sequences into the lowest slots), so the graph reads a fixed view of the cache; one graph is captured per
  (batch bucket, T, history-length bucket) the first time it is needed and replayed afterwards. That removes the
  per-kernel launch cost that bounds small models (hundreds of launches per token), which is the main lever here.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Generator

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from transformers.cache_utils import DynamicCache

from engine.host_copy import to_device
from engine.kv_cache import KVCache
from engine.paged_cache import PagedKVCache
from models.model import PLANLESS_SDPA_BACKENDS, MiniMindForCausalLM

# Every forward pass the runner launches or captures leaves cuDNN's attention out (PLANLESS_SDPA_BACKENDS). On an
# H100/H200 SDPA picks cuDNN, which builds an execution plan for each new shape: with `minimind serve` on an H200
# (minimind2-small, one stream), every prompt length the server had not seen yet made its prefill step take 50-80 ms
# instead of 6-10, the whole of the p99 time to first token. Prompt lengths vary per request, so no warm-up covers
# them; the flash and memory-efficient kernels need no plan. Replayed CUDA graphs keep the kernels chosen at
# capture, so only eager passes and captures enter this context (12 us each on the 2-core CPU here).


class CpuWeightLayouts:
    """Two copies of each widening linear layer's weight (out >= 2 * in: gate/up projections, the LM head) for the
    CPU: stored transposed for steps of 1-2 rows, as usual for more. Same values; on the 2-core AMD EPYC here the CPU
    BLAS reads x @ W^T 1.6-1.9x faster from the transposed copy at 1 row and about 1.5x slower at 4 or more.
    Only for models the engine loaded itself: switching swaps the weights' storage in place."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = []
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features >= 2 * module.in_features:
                usual = module.weight.data.contiguous()
                self.layers.append((module, usual, usual.t().contiguous().t()))
        self.narrow: bool | None = None

    def use(self, rows: int) -> None:
        narrow = rows <= 2
        if narrow is not self.narrow:
            for module, usual, transposed in self.layers:
                module.weight.data = transposed if narrow else usual
            self.narrow = narrow


def _buckets(limit: int, smallest: int = 1) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, limit + 1, 16))
    return sorted({s for s in sizes if smallest <= s < limit} | {limit})


def _pick(buckets: list[int], value: int) -> int:
    return buckets[bisect.bisect_left(buckets, value)]


def weight_identity_guards(entries: list) -> list[bool]:
    """torch.compile's guard filter for the CPU: of the guards on the model's modules keep only the identity of each
    weight tensor. On the CPU every step runs dynamo's guards (no graph replay skips them), and the ~6,000 guards on
    module types, hook dicts and attributes of a 30-layer model took 0.66 of 9.1 ms per token (SmolLM2-135M, int4,
    2 cores). The weights are frozen into the compiled code as constants, so their identity is exactly what the
    code depends on: another engine's model (another `_graph_forward` caller in the same process) fails it and
    gets its own compile. Dropping those too shared one graph between two engines (int4 ran int8's weights)."""
    return [e.guard_type == "ID_MATCH" or not e.orig_guard.source.is_unspecialized_nn_module() for e in entries]


class ModelRunner:
    """`compile_model`: run the captured step through torch.compile (inductor fuses the norms, rotary, SwiGLU and residual
    adds, about a third of the kernels per layer). It is compiled once with the batch and history length symbolic,
    so every later graph capture reuses the same code; on a GPU batch buckets then start at 2 (a size-1 dimension
    would be specialised and compiled again; on the CPU batch 1 is worth its own compile, see `__init__`)."""

    def __init__(
        self,
        model: MiniMindForCausalLM,
        cache: KVCache | PagedKVCache,
        cuda_graphs: bool = True,
        max_step_tokens: int = 8,
        compile_model: bool = False,
        cpu_layouts: CpuWeightLayouts | None = None,
    ):
        self.model, self.cache, self.cpu_layouts = model, cache, cpu_layouts
        self.device = next(model.parameters()).device
        # MoE routing branches on the host (which experts got tokens), so it cannot be captured.
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and not model.config.use_moe
        self.compiled = None
        if compile_model and cache.num_slots >= 2 and (self.use_graphs or self.device.type == "cpu"):
            cpu_guards = self.device.type == "cpu" and cpu_layouts is None  # layouts swap weight storage in place
            options = {"guard_filter_fn": weight_identity_guards} if cpu_guards else None
            self.compiled = torch.compile(self._graph_forward, fullgraph=True, dynamic=False, options=options)
        # A compiled step's batch buckets start at 2 on a GPU: a size-1 batch would be specialised and compiled again,
        # and replaying the batch-2 graph for one row costs about what batch 1 would. On the CPU a step costs in
        # proportion to its rows, so batch 1 gets its own compiled variant: int4 SmolLM2-135M on 2 cores decoded
        # about 122 tok/s with it against 100 without (one more compile at warm-up).
        on_gpu_compiled = self.compiled is not None and self.device.type != "cpu"
        self.batch_buckets = _buckets(cache.num_slots, 2 if on_gpu_compiled else 1)
        self.len_buckets = [64 * 2**i for i in range(32) if 64 * 2**i < cache.max_len] + [cache.max_len]
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        if self.use_graphs or self.compiled is not None:
            self.tokens_buf = torch.zeros(cache.num_slots, max_step_tokens, dtype=torch.long, device=self.device)
            self.start_buf = torch.zeros(cache.num_slots, dtype=torch.long, device=self.device)
            self.key_pos = torch.arange(cache.max_len, device=self.device)

    # ---- forward passes -------------------------------------------------------------------------------------------

    def _forward(
        self, tokens: torch.Tensor, start: torch.Tensor, slots: torch.Tensor | None, kv_len: int, masked: bool = True
    ):
        positions = start[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
        view = self.cache.view(slots, start, kv_len, masked=masked)
        hidden = self.model.model(input_ids=tokens, position_ids=positions, kv_cache=view).last_hidden_state
        return self.model.lm_head(hidden).float()

    def _graph_forward(self, tokens: torch.Tensor, start: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """The captured step: rows are slots 0..B-1, reading `len(key_pos)` cached positions (a tensor, not an int,
        so that torch.compile sees the history length as a symbolic size)."""
        return self._forward(tokens, start, None, key_pos.shape[0])

    def _step_fn(self, batch: int, num_new: int, kv_len: int):
        """(function, arguments) of one bucketed step over the persistent input buffers; the compiled function gets
        its sizes marked dynamic so that no bucket compiles again."""
        args = (self.tokens_buf[:batch, :num_new], self.start_buf[:batch], self.key_pos[:kv_len])
        if self.compiled is None:
            return self._graph_forward, args
        for tensor in args:  # "maybe": a full-cache bucket may still get its own (guarded) variant
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self._run_compiled, args

    def _run_compiled(self, *args: torch.Tensor) -> torch.Tensor:
        # Freezing makes the weights constants, so inductor concatenates the q/k/v projections into one matmul and
        # gate/up into another (3 fewer kernels per layer). It is read when a call compiles, hence set per call.
        with torch._inductor.config.patch(
            freezing=True, cpp_wrapper=self.device.type == "cpu", **{"cpp.enable_concat_linear": True}
        ):
            return self.compiled(*args)

    @torch.inference_mode()
    def prefill(
        self,
        prompts: list[list[int]],
        slots: list[int],
        full_logits: list[bool],
        images: list[torch.Tensor | None] | None = None,
        starts: list[int] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Write the prompts' tokens into their slots from `starts` (default 0; later for the next chunk of a long
        prompt or after a cached prefix, the positions before it being in the cache). Returns the last position's
        logits [B, V] and, for rows that asked (prompt logprobs), the logits of every position given [T, V]. Rows
        with `images` (a VLM's pixel_values) get their placeholder embeddings replaced by the image features."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        starts = starts or [0] * len(prompts)
        if self.cpu_layouts is not None:
            self.cpu_layouts.use(len(prompts) * width)
        tokens = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=self.device)
        start = torch.tensor(starts, device=self.device)
        positions = start[:, None] + torch.arange(width, device=self.device)
        padded = min(lengths) != width
        view = self.cache.view(
            torch.tensor(slots, device=self.device),
            start,
            max(s + n for s, n in zip(starts, lengths)),
            fresh=not any(starts),  # no history: attend over the new keys alone
            lengths=torch.tensor(lengths, device=self.device) if padded else None,
        )
        embeds = self._embeds_with_images(tokens, images) if images and any(x is not None for x in images) else None
        with sdpa_kernel(PLANLESS_SDPA_BACKENDS):
            hidden = self.model.model(
                input_ids=None if embeds is not None else tokens,
                inputs_embeds=embeds,
                position_ids=positions,
                kv_cache=view,
            ).last_hidden_state
        last = hidden[torch.arange(len(prompts), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        full = [
            self.model.lm_head(hidden[i, : lengths[i]]).float() if want else None for i, want in enumerate(full_logits)
        ]
        return self.model.lm_head(last).float(), full

    def _embeds_with_images(self, tokens: torch.Tensor, images: list[torch.Tensor | None]) -> torch.Tensor:
        """Token embeddings of the batch, each image-bearing row spliced (text rows as they are)."""
        embeds = self.model.model.embed_tokens(tokens)
        for row, pixels in enumerate(images):
            if pixels is not None:
                features = self.model.encode_images(pixels.to(self.device))
                embeds[row] = self.model.splice_images(tokens[row : row + 1], features)[0]
        return embeds

    @torch.inference_mode()
    def step(self, slots: list[int], tokens: torch.Tensor | list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed each row's T tokens ([B, T], host list or a tensor on any device, so a draft's own samples can be
        fed back without a host sync) from its start position; returns logits [B, T, V] in the rows' order."""
        tokens = torch.as_tensor(tokens)
        num_new = tokens.shape[1]
        needed = max(starts) + num_new
        bucketed = self.use_graphs or self.compiled is not None
        if not bucketed or num_new > self.tokens_buf.shape[1]:
            if self.cpu_layouts is not None:
                self.cpu_layouts.use(len(slots) * num_new)
            tokens = tokens.to(self.device, non_blocking=True)
            start = torch.tensor(starts, device=self.device)
            # Rows that are slots 0..B-1 read a slice of the cache; others gather. One new token at one shared
            # position (batch-1 decode) sees every cached key, so it needs no mask.
            index = None if slots == list(range(len(slots))) else torch.tensor(slots, device=self.device)
            masked = num_new > 1 or min(starts) != max(starts)
            with sdpa_kernel(PLANLESS_SDPA_BACKENDS):
                return self._forward(tokens, start, index, needed, masked)
        batch = _pick(self.batch_buckets, max(slots) + 1)
        kv_len = _pick(self.len_buckets, needed)
        # Rows of the bucket outside this batch (free slots, a prompt between two prefill chunks) still run: they
        # write their junk key at the cache's last positions, which no prompt reaches (prompts end before
        # max_model_len) and which a sequence overwrites before it reads them; position 0 would clobber a prompt.
        host_start = [self.cache.max_len - num_new] * batch
        for slot, start in zip(slots, starts):
            host_start[slot] = start
        self.start_buf[:batch].copy_(to_device(host_start, self.device))
        if slots == list(range(batch)):
            self.tokens_buf[:batch, :num_new].copy_(tokens, non_blocking=True)
            index = None
        else:
            index = to_device(slots, self.device)
            self.tokens_buf[index, :num_new] = tokens.to(self.device, non_blocking=True)
        key = (batch, num_new, kv_len)
        if not self.use_graphs:  # compiled, on the CPU: no graphs to capture
            fn, args = self._step_fn(*key)
            logits = fn(*args)
        else:
            if key not in self.graphs:
                with sdpa_kernel(PLANLESS_SDPA_BACKENDS):  # the attention kernels every replay runs are chosen here
                    self.graphs[key] = self._capture_or_fall_back(key)
            graph, logits = self.graphs[key]
            graph.replay()
        return logits if index is None else logits[index]

    def _capture_or_fall_back(self, key: tuple[int, int, int]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture a step; if torch.compile fails here (no working Triton, say), go on with eager graphs."""
        if self.compiled is None:
            return self._capture(*key)
        try:
            return self._capture(*key)
        except Exception as err:  # noqa: BLE001 - any compiler failure: the eager step is always valid
            warnings.warn(f"torch.compile of the decode step failed, running it uncompiled: {err}", stacklevel=2)
            self.compiled = None
            return self._capture(*key)

    def _capture(self, batch: int, num_new: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture one step shape. The buffers already hold this step's real inputs, so warm-up writes are valid."""
        fn, args = self._step_fn(batch, num_new, kv_len)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = fn(*args)
        self.pool = graph.pool()
        return graph, logits

    def embed_chunks(self, prompt: list[int], chunk_tokens: int) -> Generator[None, None, list[float]]:
        """Mean of the last hidden states over the prompt's tokens, L2-normalised, computed `chunk_tokens` at a time
        (a DynamicCache keeps the keys between chunks, outside the engine's KV cache). It yields after each forward
        pass so the engine loop can run a decode step between them; the vector is the generator's return value."""
        cache = DynamicCache(config=self.model.config)
        total = None
        for start in range(0, len(prompt), chunk_tokens):
            piece = prompt[start : start + chunk_tokens]
            with torch.inference_mode():
                if self.cpu_layouts is not None:
                    self.cpu_layouts.use(len(piece))
                ids = torch.tensor([piece], device=self.device)
                hidden = self.model.model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
                part = hidden[0].float().sum(0)
                total = part if total is None else total + part
            yield
        with torch.inference_mode():
            return F.normalize(total / len(prompt), dim=-1).tolist()
