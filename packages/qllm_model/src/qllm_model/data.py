"""Byte corpora as a ``LightningDataModule``.

Sources (first match wins): ``path`` (a local text file, or a directory read recursively in sorted order),
``hf_dataset`` (any HF dataset by name/config/text column, optionally streamed), or ``corpus``:

- ``tinyshakespeare``: ``<data_dir>/tinyshakespeare/input.txt``, first 90% of the bytes train, last 10% val
  (nanoGPT's split). There is no held-out test split in that protocol: ``test`` reuses val unless
  ``test_fraction`` > 0 carves a separate test tail (then val is the slice before it).
- ``wikitext2``: ``Salesforce/wikitext`` / ``wikitext-2-raw-v1`` through ``datasets`` when the hub is
  reachable; otherwise ``<data_dir>/wikitext-2/{valid,test}.txt``. Those local files are the *tokenized*
  WikiText-2 (with ``<unk>``), not the raw variant, and there is no train split offline, so offline
  WikiText-2 supports ``validate``/``test`` of a model trained elsewhere and ``fit`` raises.

Sequences are non-overlapping windows of ``seq_len + 1`` bytes (input = first seq_len, target = last
seq_len). Evaluation windows cover the split exactly once (the tail window is padded with ignored targets),
so bits per byte is over every byte of the split except its first.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from .tokenizer import EOS_ID, ByteTokenizer

IGNORE_INDEX = -100
_REPO_ROOT = Path(__file__).resolve().parents[4]
CORPORA = ("tinyshakespeare", "wikitext2")


def default_data_dir() -> Path:
    """``$QLLM_SHARED_DATA``, else ``../shared/data`` next to the repository, else relative to the cwd."""
    if os.environ.get("QLLM_SHARED_DATA"):
        return Path(os.environ["QLLM_SHARED_DATA"])
    beside_repo = _REPO_ROOT.parent / "shared" / "data"
    return beside_repo if beside_repo.is_dir() else Path("../shared/data")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF offline mode is set or huggingface.co cannot be reached (fails fast instead of retrying)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def bytes_to_tokens(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int16))


def texts_to_tokens(texts, separator_eos: bool) -> torch.Tensor:
    """Concatenate documents as bytes, with an EOS id after each one when ``separator_eos``."""
    parts: list[np.ndarray] = []
    eos = np.array([EOS_ID], dtype=np.int16)
    for text in texts:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        parts.append(np.frombuffer(data, dtype=np.uint8).astype(np.int16))
        if separator_eos:
            parts.append(eos)
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int16)


def read_corpus(path: str | Path) -> bytes:
    """Raw bytes of a file, or of every file under a directory (sorted paths, hidden files skipped)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data.path: corpus {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise ValueError(f"--data.path: directory {str(path)!r} holds no files")
        data = b"".join(p.read_bytes() for p in files)
    else:
        data = path.read_bytes()
    if not data:
        raise ValueError(f"--data.path: corpus {str(path)!r} is empty (0 bytes)")
    return data


class ByteWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens at stride ``seq_len`` over a 1-D token tensor."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, pad_tail: bool):
        if tokens.numel() < 2:
            raise ValueError(f"a split needs at least 2 bytes to predict one, got {tokens.numel()}")
        self.tokens, self.seq_len, self.pad_tail = tokens, seq_len, pad_tail
        predictable = tokens.numel() - 1
        self.length = -(-predictable // seq_len) if pad_tail else predictable // seq_len
        if self.length == 0:
            raise ValueError(f"seq_len={seq_len} is longer than the training split ({tokens.numel()} bytes); "
                             "lower --data.seq_len or use a larger corpus")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        window = self.tokens[start:start + self.seq_len + 1].long()
        x, y = window[:-1], window[1:]
        if x.numel() < self.seq_len:  # the padded tail of an evaluation split
            missing = self.seq_len - x.numel()
            x = torch.cat([x, torch.full((missing,), ByteTokenizer.pad_token_id, dtype=torch.long)])
            y = torch.cat([y, torch.full((missing,), IGNORE_INDEX, dtype=torch.long)])
        return x, y


class StreamingByteWindows(IterableDataset):
    """Windows over a (streamed) HF dataset, sharded over DDP ranks and dataloader workers by document."""

    def __init__(self, dataset, text_column: str, seq_len: int, skip_docs: int = 0):
        self.dataset, self.text_column, self.seq_len, self.skip_docs = dataset, text_column, seq_len, skip_docs

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        worker = get_worker_info()
        shard = rank * (worker.num_workers if worker else 1) + (worker.id if worker else 0)
        n_shards = world * (worker.num_workers if worker else 1)
        buffer: list[int] = []
        for i, record in enumerate(self.dataset):
            if i < self.skip_docs or (i - self.skip_docs) % n_shards != shard:
                continue
            buffer.extend(record[self.text_column].encode("utf-8"))
            buffer.append(EOS_ID)
            while len(buffer) >= self.seq_len + 1:
                window = torch.tensor(buffer[:self.seq_len + 1], dtype=torch.long)
                del buffer[:self.seq_len]
                yield window[:-1], window[1:]


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r takes indices r, r + world, ...: every evaluation window is scored exactly once.

    Lightning's default DistributedSampler pads ranks with repeated samples, which would make bits per byte
    inexact; being a DistributedSampler subclass, this one is left in place by the Trainer.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class QLLMDataModule(L.LightningDataModule):
    def __init__(self, corpus: str | None = None, path: str | None = None, data_dir: str | None = None,
                 hf_dataset: str | None = None, hf_config: str | None = None,
                 hf_data_files: str | list[str] | dict[str, str] | None = None, text_column: str = "text",
                 streaming: bool = False, seq_len: int = 256, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.0, max_eval_bytes: int | None = None,
                 predict_prompts: list[str] | None = None):
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"--data.seq_len must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"--data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"--data.val_fraction must be in (0, 1), got {val_fraction}")
        if not 0.0 <= test_fraction < 1.0 - val_fraction:
            raise ValueError(f"--data.test_fraction must be in [0, 1 - val_fraction), got {test_fraction}")
        if corpus is not None and corpus not in CORPORA:
            raise ValueError(f"--data.corpus must be one of {CORPORA} (or use --data.path / --data.hf_dataset), "
                             f"got {corpus!r}")
        if max_eval_bytes is not None and max_eval_bytes < 2:
            raise ValueError(f"--data.max_eval_bytes must be >= 2 or None, got {max_eval_bytes}")
        self.save_hyperparameters()
        self.corpus, self.path, self.hf_dataset = corpus, path, hf_dataset
        self.data_dir = Path(data_dir) if data_dir else default_data_dir()
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.predict_prompts = predict_prompts or ["ROMEO:"]
        self.splits: dict[str, torch.Tensor | None] = {}
        self.train_stream: StreamingByteWindows | None = None

    # --- loading -----------------------------------------------------------------------------------------
    def _split_by_bytes(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        n = tokens.numel()
        n_test = int(n * self.hparams.test_fraction)
        n_val = int(n * self.hparams.val_fraction)
        train_end = n - n_val - n_test
        val = tokens[train_end:n - n_test]
        return {"train": tokens[:train_end], "val": val, "test": tokens[n - n_test:] if n_test else val}

    def _load_tinyshakespeare(self) -> dict[str, torch.Tensor | None]:
        file = self.data_dir / "tinyshakespeare" / "input.txt"
        if not file.is_file():
            raise FileNotFoundError(
                f"Tiny Shakespeare not found at {file}: pass --data.data_dir DIR (the folder holding "
                "tinyshakespeare/input.txt), set QLLM_SHARED_DATA, or pass --data.path FILE")
        return self._split_by_bytes(bytes_to_tokens(read_corpus(file)))

    def _load_wikitext2(self) -> dict[str, torch.Tensor | None]:
        if hub_reachable():
            import datasets

            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")
            # Raw WikiText lines carry their own newlines: join without separators.
            return {name: texts_to_tokens(ds[split]["text"], separator_eos=False)
                    for name, split in (("train", "train"), ("val", "validation"), ("test", "test"))}
        folder = self.data_dir / "wikitext-2"
        if not (folder / "valid.txt").is_file():
            raise FileNotFoundError(
                f"offline and no local WikiText-2 at {folder}/valid.txt: pass --data.data_dir DIR (holding "
                "wikitext-2/{valid,test}.txt), go online, or choose another corpus with --data.path FILE")
        return {"train": None, "val": bytes_to_tokens(read_corpus(folder / "valid.txt")),
                "test": bytes_to_tokens(read_corpus(folder / "test.txt"))}

    def _load_hf(self) -> dict[str, torch.Tensor | None]:
        import datasets

        hp = self.hparams
        load = dict(path=hp.hf_dataset, name=hp.hf_config, data_files=hp.hf_data_files)
        column = hp.text_column
        eval_cap = hp.max_eval_bytes or 1_000_000
        if not hp.streaming:
            ds = datasets.load_dataset(**load)
            if "train" not in ds:
                raise ValueError(f"--data.hf_dataset {hp.hf_dataset!r} has no 'train' split (has {list(ds)})")
            if column not in ds["train"].column_names:
                raise ValueError(f"--data.text_column {column!r} not in {ds['train'].column_names}")
            train = texts_to_tokens(ds["train"][column], separator_eos=True)
            val_name = next((s for s in ("validation", "valid", "val") if s in ds), None)
            if val_name is None:
                splits = self._split_by_bytes(train)
            else:
                val = texts_to_tokens(ds[val_name][column], separator_eos=True)
                splits = {"train": train, "val": val, "test": val}
            if "test" in ds:
                splits["test"] = texts_to_tokens(ds["test"][column], separator_eos=True)
            return splits

        def head(split_stream, cap: int) -> tuple[torch.Tensor, int]:
            texts, size, docs = [], 0, 0
            for record in split_stream:
                texts.append(record[column])
                size += len(record[column].encode("utf-8")) + 1
                docs += 1
                if size >= cap:
                    break
            return texts_to_tokens(texts, separator_eos=True)[:cap], docs

        def stream(split: str):
            try:
                return datasets.load_dataset(**load, split=split, streaming=True)
            except (ValueError, KeyError):
                return None

        train_stream = stream("train")
        if train_stream is None:
            raise ValueError(f"--data.hf_dataset {hp.hf_dataset!r} has no 'train' split to stream")
        val_stream = stream("validation")
        skip = 0
        if val_stream is None:  # hold out the first documents of train, and skip them when training
            val, skip = head(train_stream, eval_cap)
        else:
            val, _ = head(val_stream, eval_cap)
        test_stream = stream("test")
        test = head(test_stream, eval_cap)[0] if test_stream is not None else val
        self.train_stream = StreamingByteWindows(train_stream, column, self.seq_len, skip_docs=skip)
        return {"train": None, "val": val, "test": test}

    def prepare_splits(self) -> dict[str, torch.Tensor | None]:
        if self.splits:
            return self.splits
        if self.path is not None:
            splits = self._split_by_bytes(bytes_to_tokens(read_corpus(self.path)))
        elif self.hf_dataset is not None:
            splits = self._load_hf()
        elif self.corpus == "tinyshakespeare":
            splits = self._load_tinyshakespeare()
        elif self.corpus == "wikitext2":
            splits = self._load_wikitext2()
        else:
            raise ValueError("no corpus given: pass --data.path FILE_OR_DIR, --data.corpus "
                             f"{'|'.join(CORPORA)}, or --data.hf_dataset NAME")
        cap = self.hparams.max_eval_bytes
        for name in ("val", "test"):
            if splits[name] is not None and cap is not None:
                splits[name] = splits[name][:cap]
            if splits[name] is not None and splits[name].numel() < 2:
                raise ValueError(f"the {name} split has {splits[name].numel()} bytes; need >= 2 "
                                 "(a larger corpus or a larger --data.val_fraction)")
        self.splits = splits
        return splits

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":  # prompts only: no corpus needed
            return
        splits = self.prepare_splits()
        if stage in ("fit", None) and splits["train"] is None and self.train_stream is None:
            raise ValueError(
                "WikiText-2's train split is not available offline (only valid.txt/test.txt are local): "
                "use `qllm validate`/`qllm test` on it, train on another corpus (--data.path FILE or "
                "--data.corpus tinyshakespeare), or run online")

    # --- loaders -----------------------------------------------------------------------------------------
    def _eval_loader(self, split: str) -> DataLoader:
        dataset = ByteWindows(self.prepare_splits()[split], self.seq_len, pad_tail=True)
        sampler = UnpaddedDistributedSampler(dataset) if dist.is_available() and dist.is_initialized() else None
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self.train_stream is not None:
            return DataLoader(self.train_stream, batch_size=self.batch_size, num_workers=self.num_workers)
        dataset = ByteWindows(self.splits["train"], self.seq_len, pad_tail=False)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=len(dataset) >= self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        # Batches of raw prompt strings; the LightningModule tokenizes and left-pads them.
        return DataLoader(self.predict_prompts, batch_size=self.eval_batch_size, collate_fn=list)
