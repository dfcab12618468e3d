"""Bits per byte and perplexity of any causal LM on any text, comparable across tokenizers.

Token-level perplexities of models with different tokenizers cannot be compared: a token is a different amount of
text for each. Bits per byte can: it is the model's total negative log-likelihood of the text, in bits, divided by
the text's length in UTF-8 bytes,

    bpb = sum_i -ln p(token_i | context) / ln 2 / n_bytes,

so an HF token-level model and the byte-level QLLM (where every token is one byte) score the same quantity.

Long texts are scored with a sliding window. ``window`` is the most tokens the model sees in one forward pass;
each window scores ``stride`` new tokens, with the ``window - stride`` tokens before them as context. Every token
is scored exactly once: ``stride == window`` gives non-overlapping windows (a token's context is whatever precedes
it in its window, on average ``window / 2`` tokens), a smaller stride gives every token at least
``window - stride`` tokens of context at proportionally higher cost. A ``prefix`` token (BOS, or a document
separator) is put in front of the text so that its first token is scored too; without one, the first token has no
prediction and its bytes are not counted.

The metrics keep sums (NLL in nats, tokens, bytes) as torchmetrics states reduced by ``sum``, so windows spread over
processes add up to the exact corpus value (an average of per-process averages would not).
"""

from __future__ import annotations

import inspect
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from qllm_samplers.lm import context_limit

# ------------------------------------------------------------------------------------------------- functional core


def nll_and_count(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL in nats (float64) over the scored targets, and their number (long).

    Each token's cross-entropy is computed in float32 and the sum is taken in float64: float32 values summed in
    float64 lose nothing at corpus sizes, so the total does not depend on how the tokens were split into batches or
    processes (a float32 sum would).
    """
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             ignore_index=ignore_index, reduction="none")
    return losses.double().sum(), (targets != ignore_index).sum()


def bits_per_byte_from_sums(nll_sum: torch.Tensor | float, num_bytes: torch.Tensor | int) -> torch.Tensor:
    """Total NLL (nats) / ln 2 / bytes."""
    return torch.as_tensor(nll_sum, dtype=torch.float64) / math.log(2) / num_bytes


# ------------------------------------------------------------------------------------------------- metrics


def _check_count(name: str, value: torch.Tensor | int) -> None:
    # Plain numbers only: reading a tensor here would sync the device once per batch.
    if not isinstance(value, torch.Tensor) and int(value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


class _NLLSums(Metric):
    """Summed negative log-likelihood (nats), scored tokens and their UTF-8 bytes, summed across processes.

    Updates are out of place: Lightning runs validation under ``torch.inference_mode()``, where ``reset()`` makes the
    states inference tensors, which refuse in-place updates once outside it.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("token_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("byte_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor | float, num_tokens: torch.Tensor | int,
               num_bytes: torch.Tensor | int | None = None) -> None:
        """Add the summed NLL (nats) of ``num_tokens`` scored tokens that cover ``num_bytes`` bytes of text
        (default: one byte per token, as for the byte-level QLLM)."""
        num_bytes = num_tokens if num_bytes is None else num_bytes
        _check_count("num_tokens", num_tokens)
        _check_count("num_bytes", num_bytes)
        device = self.nll_sum.device
        self.nll_sum = self.nll_sum + torch.as_tensor(nll_sum, dtype=torch.float64, device=device).detach()
        self.token_count = self.token_count + torch.as_tensor(num_tokens, dtype=torch.long, device=device)
        self.byte_count = self.byte_count + torch.as_tensor(num_bytes, dtype=torch.long, device=device)

    def _need(self, state: torch.Tensor, what: str) -> None:
        if int(state) == 0:
            raise ValueError(f"{type(self).__name__}.compute(): no {what} were scored (empty text or split?)")


class BitsPerByte(_NLLSums):
    """Total NLL / ln 2 / UTF-8 bytes."""

    def compute(self) -> torch.Tensor:
        self._need(self.byte_count, "bytes")
        return bits_per_byte_from_sums(self.nll_sum, self.byte_count)


class TokenPerplexity(_NLLSums):
    """exp(total NLL / scored tokens): the usual per-token perplexity (tokenizer-dependent)."""

    def compute(self) -> torch.Tensor:
        self._need(self.token_count, "tokens")
        return torch.exp(self.nll_sum / self.token_count)


class BytePerplexity(_NLLSums):
    """exp(total NLL / bytes) = 2 ** bits per byte: perplexity per byte, comparable across tokenizers."""

    def compute(self) -> torch.Tensor:
        self._need(self.byte_count, "bytes")
        return torch.exp(self.nll_sum / self.byte_count)


# ------------------------------------------------------------------------------------------------- tokens


def _is_byte_tokenizer(tokenizer) -> bool:
    # The QLLM ByteTokenizer (qllm_model.tokenizer) is not callable; HF tokenizers are.
    return not callable(tokenizer) and hasattr(tokenizer, "encode") and getattr(tokenizer, "vocab_size", 0) == 257


def tokenize_with_bytes(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (no special tokens) and the number of UTF-8 bytes each token accounts for.

    The byte counts always sum to ``len(text.encode())``. HF fast tokenizers get them from the offset mapping
    (a character split over two byte-level tokens is charged to the first); other tokenizers from decoding each
    token, with any rounding difference put on the last token.
    """
    total_bytes = len(text.encode("utf-8"))
    if _is_byte_tokenizer(tokenizer):
        ids = tokenizer.encode(text)
        return ids, [1] * len(ids)
    if callable(tokenizer) and getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        byte_at_char = [0] * (len(text) + 1)  # byte offset of each character boundary
        for i, char in enumerate(text):
            byte_at_char[i + 1] = byte_at_char[i] + len(char.encode("utf-8"))
        counts, covered = [], 0
        for _, char_end in offsets:
            # Offsets may skip leading spaces or repeat a character split across tokens: count what each token's
            # end adds beyond the furthest end so far, so every byte is charged exactly once.
            end = byte_at_char[char_end]
            counts.append(max(0, end - covered))
            covered = max(covered, end)
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)
        counts = [len(tokenizer.decode([i]).encode("utf-8")) for i in ids]
    if ids:
        counts[-1] += total_bytes - sum(counts)
        if counts[-1] < 0:
            raise ValueError("tokenize_with_bytes: per-token byte counts exceed the text's length; the tokenizer's "
                             "decode does not invert its encode")
    return list(ids), counts


def default_prefix_token_id(tokenizer) -> int | None:
    """BOS if the tokenizer has one, else EOS (a document separator), else None."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


# ------------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Window:
    """One forward pass: input positions [start, end) of the (prefixed) sequence; the predictions made at
    positions [score_from, end) are scored (the prediction at position p is for token p + 1)."""

    start: int
    end: int
    score_from: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def sliding_windows(num_predictions: int, window: int, stride: int) -> list[Window]:
    """The windows that score predictions 0 .. num_predictions - 1 exactly once.

    Window k ends at ``min((k + 1) * stride, num_predictions)``, starts ``window`` positions earlier (or at 0) and
    scores the predictions not scored by window k - 1.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an integer in [1, window={window}], got {stride!r}")
    windows, scored = [], 0
    while scored < num_predictions:
        end = min(scored + stride, num_predictions)
        windows.append(Window(start=max(0, end - window), end=end, score_from=scored))
        scored = end
    return windows


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def token_nlls(model: torch.nn.Module, sequence: Sequence[int] | torch.Tensor, *, window: int, stride: int,
               batch_size: int = 1, windows: Sequence[Window] | None = None,
               on_batch: Callable[[list[Window], torch.Tensor], None] | None = None) -> torch.Tensor:
    """Negative log-likelihood (nats, float64) of tokens 1..N-1 of ``sequence``, each given its window's context.

    Entry i is ``-ln p(sequence[i + 1] | sequence[start : i + 1])`` for the window that scores prediction i.
    Windows of equal shape are batched (``batch_size`` at a time), so no padding ever enters a forward pass.
    ``windows`` restricts the work to a subset (e.g. this process's share); unscored entries are NaN.
    ``on_batch(windows, nll)`` is called after each forward pass (progress bars, checkpoints).
    """
    ids = torch.as_tensor(sequence, dtype=torch.long).flatten()
    num_predictions = ids.numel() - 1
    if num_predictions < 1:
        raise ValueError(f"sequence must have at least 2 tokens to score one, got {ids.numel()}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    limit = context_limit(model)
    if limit is not None and window > limit:
        raise ValueError(f"window must be <= the model's context limit of {limit} tokens, got {window}")
    if windows is None:
        windows = sliding_windows(num_predictions, window, stride)
    device = next(model.parameters()).device
    keep_logits = _accepts_logits_to_keep(model)
    nll = torch.full((num_predictions,), float("nan"), dtype=torch.float64)
    groups: dict[tuple[int, int], list[Window]] = defaultdict(list)
    for w in windows:
        groups[(w.length, w.num_scored)].append(w)
    for (_, num_scored), members in groups.items():
        for first in range(0, len(members), batch_size):
            chunk = members[first:first + batch_size]
            inputs = torch.stack([ids[w.start:w.end] for w in chunk]).to(device)
            targets = torch.stack([ids[w.score_from + 1:w.end + 1] for w in chunk]).to(device)
            extra = {"logits_to_keep": num_scored} if keep_logits else {}
            logits = model(input_ids=inputs, use_cache=False, **extra).logits[:, -num_scored:]
            losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="none").reshape(len(chunk), num_scored).double().cpu()
            for row, w in enumerate(chunk):
                nll[w.score_from:w.end] = losses[row]
            if on_batch is not None:
                on_batch(chunk, losses)
    return nll


@dataclass
class BitsPerByteResult:
    bits_per_byte: float
    byte_perplexity: float
    token_perplexity: float
    nll_nats: float
    scored_tokens: int
    scored_bytes: int
    text_bytes: int
    window: int
    stride: int
    prefix_token_id: int | None
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


_AUTO = "auto"


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokenizer, text: str, *, window: int | None = None,
                  stride: int | None = None, prefix_token_id: int | None | str = _AUTO, batch_size: int = 1,
                  progress: bool = False, resume: dict | None = None,
                  on_checkpoint: Callable[[dict], None] | None = None) -> BitsPerByteResult:
    """Bits per byte (and perplexities) of ``model`` on ``text`` with a sliding window.

    ``window`` defaults to the model's context limit (1024 if it declares none), ``stride`` to ``window``.
    ``prefix_token_id``: the token put before the text ("auto": BOS, else EOS; None: no prefix, the first token
    is then not scored and its bytes not counted). ``tokenizer`` is an HF tokenizer or the QLLM ``ByteTokenizer``.

    Killed runs can continue: ``on_checkpoint(state)`` receives the running sums after every forward pass, and
    ``resume=state`` (same text and settings) skips the windows that state already covers.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    if window is None:
        window = context_limit(model) or 1024
    stride = window if stride is None else stride
    if prefix_token_id == _AUTO:
        prefix_token_id = default_prefix_token_id(tokenizer)
    ids, byte_counts = tokenize_with_bytes(tokenizer, text)
    if prefix_token_id is not None:
        sequence, target_bytes = [prefix_token_id] + ids, byte_counts
    else:
        sequence, target_bytes = ids, byte_counts[1:]
    if len(sequence) < 2:
        raise ValueError("text is a single token and there is no prefix token: nothing to score")
    # Windows of one shape are run together; fixing that order here makes "the first k windows" a resumable state.
    windows = sorted(sliding_windows(len(sequence) - 1, window, stride), key=lambda w: (-w.length, -w.num_scored))
    metrics = [BitsPerByte(), BytePerplexity(), TokenPerplexity()]
    done = 0
    if resume:
        done = int(resume["windows_done"])
        if not 0 <= done <= len(windows):
            raise ValueError(f"resume: windows_done must be in [0, {len(windows)}], got {done}")
        for metric in metrics:
            metric.update(resume["nll_nats"], resume["scored_tokens"], resume["scored_bytes"])
    bytes_before = [0]
    for count in target_bytes:
        bytes_before.append(bytes_before[-1] + count)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(sequence) - 1, unit="tok", desc=f"bits per byte (window {window}, stride {stride})",
                   initial=int(metrics[0].token_count))

    def add(chunk: list[Window], losses: torch.Tensor) -> None:
        nonlocal done
        for row, w in enumerate(chunk):
            n_bytes = bytes_before[w.end] - bytes_before[w.score_from]
            for metric in metrics:
                metric.update(losses[row].sum(), w.num_scored, n_bytes)
        done += len(chunk)
        if bar is not None:
            bar.update(sum(w.num_scored for w in chunk))
            bar.set_postfix(bpb=f"{float(metrics[0].compute()):.4f}")
        if on_checkpoint is not None:
            on_checkpoint({"windows_done": done, "windows_total": len(windows),
                           "nll_nats": float(metrics[0].nll_sum), "scored_tokens": int(metrics[0].token_count),
                           "scored_bytes": int(metrics[0].byte_count)})

    start = time.perf_counter()
    if done < len(windows):
        token_nlls(model, sequence, window=window, stride=stride, batch_size=batch_size, windows=windows[done:],
                   on_batch=add)
    if bar is not None:
        bar.close()
    bpb, byte_ppl, token_ppl = (float(m.compute()) for m in metrics)
    return BitsPerByteResult(
        bits_per_byte=bpb, byte_perplexity=byte_ppl, token_perplexity=token_ppl,
        nll_nats=float(metrics[0].nll_sum), scored_tokens=int(metrics[0].token_count),
        scored_bytes=int(metrics[0].byte_count), text_bytes=len(text.encode("utf-8")), window=window,
        stride=stride, prefix_token_id=prefix_token_id, seconds=time.perf_counter() - start,
    )


def utf8_prefix(text: str, max_bytes: int | None) -> str:
    """The longest prefix of ``text`` of at most ``max_bytes`` UTF-8 bytes that ends on a character boundary."""
    if max_bytes is None:
        return text
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be an integer >= 1 (or None for the whole text), got {max_bytes!r}")
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
