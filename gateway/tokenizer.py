"""Tokenizers: the real Yuan sentencepiece model, or bytes for the random-weight demo checkpoints.

`YuanTokenizer` reproduces how the official scripts load the HF tokenizer: no BOS/EOS added,
`<eod>` as end of text, and `<sep>`, `<pad>`, `<mask>`, ... added as special tokens, so their text
maps to one id (plain sentencepiece would split `<eod>` into pieces). Text is split on special
tokens and each remaining span goes through sentencepiece. Newlines are byte piece `<0x0A>`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

from model.config import YuanConfig

# Added as special tokens by the official inference scripts (order sets the ids of new pieces).
YUAN_ADDED_SPECIALS = [
    "<sep>",
    "<pad>",
    "<mask>",
    "<predict>",
    "<FIM_SUFFIX>",
    "<FIM_PREFIX>",
    "<FIM_MIDDLE>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
]


class Tokenizer(Protocol):
    eod_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special: bool = False) -> str: ...


class _SpecialSplitter:
    """Splits text on special-token strings, longest first."""

    def __init__(self, specials: dict[str, int]) -> None:
        self.specials = specials
        self.by_id = {i: s for s, i in specials.items()}
        alternatives = sorted(specials, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def split(self, text: str) -> list[str | int]:
        parts: list[str | int] = []
        for chunk in self.pattern.split(text):
            if chunk in self.specials:
                parts.append(self.specials[chunk])
            elif chunk:
                parts.append(chunk)
        return parts


class YuanTokenizer:
    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        specials: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eod>": self._piece("<eod>")}
        next_id = self.sp.get_piece_size()
        for tok in YUAN_ADDED_SPECIALS:
            known = self._piece(tok)
            if known is None:
                known, next_id = next_id, next_id + 1
            specials[tok] = known
        self.eod_id = specials["<eod>"]
        self.vocab_size = next_id
        self.splitter = _SpecialSplitter(specials)

    def _piece(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self.splitter.split(text):
            ids.extend([part] if isinstance(part, int) else self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self.splitter.by_id:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self.splitter.by_id[i])
            elif 0 <= i < self.sp.get_piece_size():
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; the config's `<eod>`/`<sep>` ids are specials; other ids decode
    to nothing (random-weight demo models may emit them)."""

    def __init__(self, cfg: YuanConfig) -> None:
        self.eod_id = cfg.eod_token_id
        specials = {"<eod>": cfg.eod_token_id, "<sep>": cfg.sep_token_id}
        if min(specials.values()) < 256:
            raise ValueError(
                "byte tokenizer needs special ids >= 256; this checkpoint needs its "
                "tokenizer.model beside config.json"
            )
        self.splitter = _SpecialSplitter(specials)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self.splitter.split(text):
            ids.extend([part] if isinstance(part, int) else part.encode("utf-8"))
        return ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        out = bytearray()
        for i in ids:
            if 0 <= i < 256:
                out.extend((i,))
            elif i in self.splitter.by_id and not skip_special:
                out.extend(self.splitter.by_id[i].encode())
        return out.decode("utf-8", errors="replace")


def load_tokenizer(model_dir: str | Path, cfg: YuanConfig) -> Tokenizer:
    """The Yuan tokenizer when the checkpoint ships `tokenizer.model`, else bytes."""
    model_file = Path(model_dir) / "tokenizer.model"
    return YuanTokenizer(model_file) if model_file.exists() else ByteTokenizer(cfg)
