"""Byte corpora as a ``LightningDataModule``.

Sources (first match wins): ``path`` (a local text file, or a directory read recursively in sorted order),
``hf_dataset`` (any HF dataset by name/config/text column, optionally streamed), or ``corpus``:

- ``tinyshakespeare``: ``<data_dir>/tinyshakespeare/input.txt``, first 90% of the bytes train, last 10% val
  (nanoGPT's split). There is no held-out test split in that protocol: ``test`` reuses val unless
  ``test_fraction`` > 0 carves a separate test tail (then val is the slice before it).
- ``wikitext2``: ``<data_dir>/wikitext-2/{valid,test}.txt`` offline (the default). Those local files are the
  *tokenized* WikiText-2 (with ``<unk>``), not the raw variant, and there is no train split offline, so
  offline WikiText-2 supports ``validate``/``test`` of a model trained elsewhere and ``fit`` raises. With
  ``online=True``: ``Salesforce/wikitext`` / ``wikitext-2-raw-v1`` through ``datasets``.

Offline or online is a setting (``--data.online``), never a network probe. ``data_dir`` is explicit, or
``$QLLM_SHARED_DATA``; this library does not know where a repository keeps its data.

Training windows are ``seq_len + 1`` bytes (input = first seq_len, target = last seq_len), either the
non-overlapping fixed windows shuffled per epoch, or (``random_offsets=True``, nanoGPT style) windows starting
at uniformly random byte offsets; an epoch is the number of fixed windows either way. The order is a pure
function of (``seed``, batches consumed), so a resumed run continues with exactly the batches the uninterrupted
run would have had (the DataModule's ``state_dict`` saves the count in every checkpoint). Evaluation windows
cover the split exactly once (the tail window is padded with ignored targets), so bits per byte is over every
byte of the split except its first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, get_worker_info

from .tokenizer import EOS_ID, ByteTokenizer

IGNORE_INDEX = -100
CORPORA = ("tinyshakespeare", "wikitext2")
DATA_DIR_ENV = "QLLM_SHARED_DATA"


def data_dir_from_env() -> Path | None:
    """``$QLLM_SHARED_DATA`` as a path, or None when it is not set."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


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


class WindowsAt(Dataset):
    """The ``seq_len + 1``-byte window starting at a byte offset: ``dataset[offset] -> (x, y)``.

    ``len()`` is the number of non-overlapping windows, which is what one training epoch holds.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.num_windows = (tokens.numel() - 1) // seq_len
        if self.num_windows == 0:
            raise ValueError(f"seq_len={seq_len} is longer than the training split ({tokens.numel()} bytes); "
                             "lower --data.seq_len or use a larger corpus")
        self.max_offset = tokens.numel() - seq_len - 1  # the last start whose window fits

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[offset:offset + self.seq_len + 1].long()
        return window[:-1], window[1:]


class ResumableWindowSampler(DistributedSampler):
    """Byte offsets of the training windows, in an order that depends only on ``seed`` and the batch count.

    Epoch e is a permutation of the fixed windows (or, with ``random_offsets``, uniformly random offsets), drawn
    from a generator seeded with (seed, e); rank r of ``num_replicas`` takes items r, r + world, ... and only whole
    batches of ``batch_size`` (the last partial batch of an epoch is dropped, on every rank alike).
    ``start_batch`` is the number of this rank's batches already trained on (from a checkpoint): the first
    iteration continues epoch ``start_batch // batches_per_epoch`` from that batch, later iterations run the
    following epochs whole. The epoch is counted here rather than taken from ``set_epoch`` (which Lightning calls
    with its own epoch counter), so the order follows the batch count alone. Being a ``DistributedSampler``, it is
    left in place by Lightning under DDP.
    """

    def __init__(self, dataset: WindowsAt, batch_size: int, seed: int = 0, random_offsets: bool = False,
                 start_batch: int = 0, num_replicas: int | None = None, rank: int | None = None):
        if num_replicas is None or rank is None:
            distributed = dist.is_available() and dist.is_initialized()
            num_replicas = dist.get_world_size() if distributed else 1
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.windows, self.batch_size, self.random_offsets = dataset, batch_size, random_offsets
        per_rank = len(dataset) // num_replicas
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"--data.batch_size={batch_size} x {num_replicas} process(es) is more than the "
                             f"{len(dataset)} training windows of one epoch; lower --data.batch_size")
        self.resume(start_batch)

    def resume(self, start_batch: int) -> None:
        """Continue after ``start_batch`` of this rank's batches (the next iteration starts there)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.next_epoch, self.skip_batches = divmod(start_batch, self.batches_per_epoch)

    def order_key(self) -> dict:
        """What the order depends on besides the batch count; a resume with another key cannot be exact."""
        return {"seed": self.seed, "random_offsets": self.random_offsets, "train_windows": len(self.windows),
                "batch_size": self.batch_size, "world_size": self.num_replicas}

    def epoch_offsets(self, epoch: int) -> torch.Tensor:
        """All ranks' byte offsets of epoch ``epoch`` (before sharding)."""
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * epoch)
        n = len(self.windows)
        if self.random_offsets:
            return torch.randint(0, self.windows.max_offset + 1, (n,), generator=generator)
        return torch.randperm(n, generator=generator) * self.windows.seq_len

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.next_epoch, self.skip_batches
        self.next_epoch, self.skip_batches = epoch + 1, 0
        mine = self.epoch_offsets(epoch)[self.rank::self.num_replicas][:self.batches_per_epoch * self.batch_size]
        return iter(mine[skip * self.batch_size:].tolist())

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Ignored: the epoch follows the batch count (see the class docstring)."""


class ResumableLoader(DataLoader):
    """The training DataLoader, with the ``state_dict``/``load_state_dict`` pair Lightning saves in every checkpoint
    and restores before the first iteration of a resumed run.

    The state is the number of batches trained on, read from ``batches_done()`` (the trainer's own count of
    processed batches: the sampler's position would be ahead of it by the batches Lightning prefetches).
    """

    def __init__(self, dataset: WindowsAt, sampler: ResumableWindowSampler, batches_done: Callable[[], int],
                 **kwargs):
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict:
        return {"train_batches_done": int(self.batches_done()), **self.sampler.order_key()}

    def load_state_dict(self, state_dict: dict) -> None:
        done = int(state_dict["train_batches_done"])
        now = self.sampler.order_key()
        saved = {k: state_dict.get(k) for k in now}
        if saved != now:
            from lightning.pytorch.utilities import rank_zero_warn

            # Another batch size, process count or corpus: continue after the same number of windows.
            items = done * int(saved["batch_size"] or 1) * int(saved["world_size"] or 1)
            done = items // (now["batch_size"] * now["world_size"])
            rank_zero_warn(f"the data order cannot continue exactly (checkpoint: {saved}, now: {now}); "
                           f"resuming after {items} windows")
        self.sampler.resume(done)


@dataclass
class GenerationRequest:
    """One predict batch: prompts and how to decode them (``qllm predict``)."""

    prompts: list[str]
    sampler: str  # a qllm_samplers.specs spec, e.g. "temp:0.8" or "power:alpha=4:steps=2"
    max_new_tokens: int | None  # None: fill the model's context
    seeds: list[int] = field(default_factory=list)  # one per prompt


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
    """Byte corpora for ``qllm fit/validate/test`` and the prompts (and decoding) for ``qllm predict``.

    ``predict_sampler`` is a ``qllm_samplers.specs`` spec (any sampler: ``temp:0.8``, ``topk:40``,
    ``power:alpha=4:steps=2``, ``entropix``...), ``predict_max_new_tokens`` (None: fill the context) and
    ``predict_seed`` (prompt i uses seed + i): decoding is a property of the request, not of the model.
    """

    def __init__(self, corpus: str | None = None, path: str | None = None, data_dir: str | None = None,
                 online: bool = False, hf_dataset: str | None = None, hf_config: str | None = None,
                 hf_data_files: str | list[str] | dict[str, str] | None = None, text_column: str = "text",
                 streaming: bool = False, seq_len: int = 256, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.0, max_eval_bytes: int | None = None, seed: int = 0,
                 random_offsets: bool = False, predict_prompts: list[str] | None = None,
                 predict_sampler: str = "temp:0.8", predict_max_new_tokens: int | None = None,
                 predict_seed: int = 0):
        super().__init__()
        from qllm_samplers.specs import parse_sampler

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
        if not 0 <= seed < 2**31:
            raise ValueError(f"--data.seed must be in [0, 2**31), got {seed}")
        if predict_max_new_tokens is not None and predict_max_new_tokens < 1:
            raise ValueError(f"--data.predict_max_new_tokens must be >= 1 or None (fill the context), "
                             f"got {predict_max_new_tokens}")
        try:
            parse_sampler(predict_sampler)
        except ValueError as error:
            raise ValueError(f"--data.predict_sampler: {error}") from error
        self.save_hyperparameters()
        self.corpus, self.path, self.hf_dataset = corpus, path, hf_dataset
        self.data_dir = Path(data_dir) if data_dir else data_dir_from_env()
        self.online = online
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed, self.random_offsets = seed, random_offsets
        self.predict_prompts = predict_prompts or ["ROMEO:"]
        self.splits: dict[str, torch.Tensor | None] = {}
        self.train_stream: StreamingByteWindows | None = None

    def _need_data_dir(self, what: str) -> Path:
        if self.data_dir is None:
            raise ValueError(f"--data.corpus {self.corpus} reads {what} under a data folder: pass --data.data_dir "
                             f"DIR or set {DATA_DIR_ENV}")
        return self.data_dir

    # --- loading -----------------------------------------------------------------------------------------
    def _split_by_bytes(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        n = tokens.numel()
        n_test = int(n * self.hparams.test_fraction)
        n_val = int(n * self.hparams.val_fraction)
        train_end = n - n_val - n_test
        val = tokens[train_end:n - n_test]
        return {"train": tokens[:train_end], "val": val, "test": tokens[n - n_test:] if n_test else val}

    def _load_tinyshakespeare(self) -> dict[str, torch.Tensor | None]:
        file = self._need_data_dir("tinyshakespeare/input.txt") / "tinyshakespeare" / "input.txt"
        if not file.is_file():
            raise FileNotFoundError(
                f"Tiny Shakespeare not found at {file}: pass --data.data_dir DIR (the folder holding "
                f"tinyshakespeare/input.txt), set {DATA_DIR_ENV}, or pass --data.path FILE")
        return self._split_by_bytes(bytes_to_tokens(read_corpus(file)))

    def _load_wikitext2(self) -> dict[str, torch.Tensor | None]:
        if self.online:
            import datasets

            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1")
            # Raw WikiText lines carry their own newlines: join without separators.
            return {name: texts_to_tokens(ds[split]["text"], separator_eos=False)
                    for name, split in (("train", "train"), ("val", "validation"), ("test", "test"))}
        folder = self._need_data_dir("wikitext-2/{valid,test}.txt") / "wikitext-2"
        if not (folder / "valid.txt").is_file():
            raise FileNotFoundError(
                f"no local WikiText-2 at {folder}/valid.txt: pass --data.data_dir DIR (holding "
                "wikitext-2/{valid,test}.txt), --data.online true (download the raw variant), or another corpus "
                "with --data.path FILE")
        return {"train": None, "val": bytes_to_tokens(read_corpus(folder / "valid.txt")),
                "test": bytes_to_tokens(read_corpus(folder / "test.txt"))}

    def _load_hf(self) -> dict[str, torch.Tensor | None]:
        import datasets

        hp = self.hparams
        if not self.online and hp.hf_data_files is None:
            raise ValueError(f"--data.hf_dataset {hp.hf_dataset!r} comes from the hub and --data.online is false: "
                             "pass --data.online true, or --data.hf_data_files FILES to read local files with a "
                             "builder such as 'text' or 'json'")
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
        windows = WindowsAt(self.splits["train"], self.seq_len)
        sampler = ResumableWindowSampler(windows, self.batch_size, seed=self.seed, random_offsets=self.random_offsets)
        return ResumableLoader(windows, sampler, self._batches_trained, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)

    def _batches_trained(self) -> int:
        trainer = self.trainer
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed if trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        # One GenerationRequest per batch of prompts; prompt i (over all batches) uses seed + i.
        hp, size = self.hparams, self.eval_batch_size
        requests = [GenerationRequest(prompts=self.predict_prompts[i:i + size], sampler=hp.predict_sampler,
                                      max_new_tokens=hp.predict_max_new_tokens,
                                      seeds=[hp.predict_seed + j for j in range(i, i + size)
                                             if j < len(self.predict_prompts)])
                    for i in range(0, len(self.predict_prompts), size)]
        return DataLoader(requests, batch_size=None)
