"""CLIP's byte-level BPE tokenizer (the one open_clip and FC-CLIP use), without torch.

Text is cleaned (HTML entities, ftfy's fixes when ftfy is installed, whitespace collapsed,
lower-cased), split into words by CLIP's pattern, each word's UTF-8 bytes mapped to printable
characters and merged by BPE rank. A tokenised text is ``<start> tokens... <end>`` padded with 0
to the context length (77); a longer text is cut and its last kept token set to ``<end>``.

The merges come from ``bpe_simple_vocab_16e6.txt.gz``: pass its path, put it in the models
directory, or install ``open_clip_torch`` (``pip install --no-deps open_clip_torch`` is enough:
only its data file is read).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from knnclip.engine.errors import InvalidInputError, ModelFileError

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary was built from (the file holds more)
# Words are letter runs, single digits, runs of other non-space characters, and English
# contractions; \p{L} and \p{N} need the `regex` module.
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character: printable Latin-1 bytes map to themselves, the other
    68 to code points from 256 upwards, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def find_bpe_file(search: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """The BPE merges file: in one of ``search`` (files or directories), else in the installed
    ``open_clip_torch`` distribution."""
    candidates = []
    for entry in search:
        p = Path(entry)
        candidates.append(p / BPE_FILENAME if p.is_dir() else p)
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it (and torch)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / BPE_FILENAME for loc in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c) for c in candidates) or "nowhere"
    raise ModelFileError(
        f"CLIP's BPE vocabulary {BPE_FILENAME} was not found (looked in: {looked}); copy it into the "
        "models directory or install it with: pip install --no-deps open_clip_torch"
    )


class FramedTokenizer:
    """What CLIP's tokenizers share: ids framed by ``<start>`` and ``<end>`` and zero-padded to
    the context; a subclass gives ``encode`` and the two ids."""

    sot: int
    eot: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
        """int64 ``[N, context_length]``: ``<start> ids <end>`` zero-padded; too long a text is cut
        (its last kept token becomes ``<end>``) with a warning naming it."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInputError(f"texts to tokenise are strings, got {type(text).__name__} {text!r}")
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > context_length:
                warnings.warn(
                    f"{text!r} is {len(ids)} tokens, longer than CLIP's context of {context_length}: "
                    "cut to fit (its end is lost)",
                    stacklevel=2,
                )
                ids = ids[:context_length]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return out


class ClipTokenizer(FramedTokenizer):
    """``tokenizer(["a photo of a cat."]) -> int64 [1, 77]``; ``tokenizer.encode(text)`` -> BPE ids."""

    def __init__(self, bpe_path: str | os.PathLike[str] | None = None) -> None:
        try:
            import regex
        except ImportError as exc:  # a base dependency; only a broken install lacks it
            raise ModelFileError(f"the CLIP tokenizer needs the `regex` module ({exc}): pip install regex") from None
        path = Path(bpe_path) if bpe_path is not None else find_bpe_file()
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ModelFileError(f"{path}: not a readable gzip BPE merges file ({exc})") from None
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        if len(merges) < _NUM_MERGES or any(len(m) != 2 for m in merges):
            raise ModelFileError(f"{path}: expected {_NUM_MERGES} BPE merges of two symbols each; the file is damaged")
        self.byte_encoder = _byte_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.sot = self.encoder["<|startoftext|>"]
        self.eot = self.encoder["<|endoftext|>"]
        self.vocab_size = len(vocab)
        self._pattern = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, list[str]] = {}
        self.path = path

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one word (the last marked end-of-word) by rank."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts[:-1], parts[1:], strict=True))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` after cleaning, without the start and end tokens."""
        ids: list[int] = []
        for word in self._pattern.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(symbols))
        return ids


def clean_text(text: str) -> str:
    """open_clip's default cleaning: ftfy (if installed), HTML entities decoded twice, whitespace
    collapsed, lower case."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; plain text is unchanged without it
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ByteTokenizer(FramedTokenizer):
    """A tokenizer without a vocabulary file, for models trained (or seeded) with it: the ids of
    a text are its cleaned UTF-8 bytes, framed and padded as CLIP's. The demo's seeded models use
    it, so the demo needs no download; real CLIP models need :class:`ClipTokenizer`."""

    def __init__(self, vocab_size: int = 49408) -> None:
        if vocab_size < 258:
            raise InvalidInputError(f"a byte tokenizer needs a vocabulary of at least 258 ids, got {vocab_size}")
        self.sot = vocab_size - 2
        self.eot = vocab_size - 1
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(clean_text(text).encode("utf-8"))


def make_tokenizer(spec: dict, search: Sequence[str | os.PathLike[str]] = ()) -> ClipTokenizer | ByteTokenizer:
    """The tokenizer a text artefact's manifest names (``{"kind": "clip-bpe" | "bytes", ...}``)."""
    kind = spec.get("kind", "clip-bpe")
    if kind == "bytes":
        return ByteTokenizer(int(spec.get("vocab_size", 49408)))
    if kind == "clip-bpe":
        return ClipTokenizer(find_bpe_file(search))
    raise ModelFileError(f"unknown tokenizer kind {kind!r} in the text model's manifest; re-export it")
