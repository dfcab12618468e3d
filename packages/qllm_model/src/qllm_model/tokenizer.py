"""UTF-8 byte tokenizer: ids 0-255 are the bytes themselves, 256 is the end-of-text marker.

A byte vocabulary has no out-of-vocabulary strings and no merges to learn, and it makes bits per byte the
natural unit: every id the model predicts (except EOS) is exactly one byte of text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

BYTE_VOCAB = 256
EOS_ID = 256


class ByteTokenizer:
    """Bytes in, bytes out. ``decode`` never fails: invalid UTF-8 becomes U+FFFD (errors="replace")."""

    vocab_size: int = BYTE_VOCAB + 1
    eos_token_id: int = EOS_ID
    pad_token_id: int = EOS_ID  # padding is always masked out, so it can share the EOS id
    bos_token_id: int | None = None

    def encode(self, text: str | bytes, add_eos: bool = False) -> list[int]:
        data = text if isinstance(text, bytes | bytearray) else text.encode("utf-8")
        ids = list(data)
        return ids + [EOS_ID] if add_eos else ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> bytes:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        out = bytearray()
        for value in values:
            if 0 <= value < BYTE_VOCAB:
                out.append(value)
            elif value == EOS_ID and not skip_special_tokens:
                out.extend(b"<|eos|>")
            elif value != EOS_ID:
                raise ValueError(f"token id {value} is outside the byte vocabulary [0, {self.vocab_size})")
        return bytes(out)

    def batch_encode(self, texts: Sequence[str | bytes], device: torch.device | str = "cpu",
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` [B, T_max], ready for ``qllm_samplers.generate``."""
        rows = [self.encode(t) for t in texts]
        if any(len(r) == 0 for r in rows):
            raise ValueError("batch_encode: every text must be non-empty (a prompt of zero bytes has no logits)")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        return ids.to(device), mask.to(device)

    def __len__(self) -> int:
        return self.vocab_size
