"""open_clip's CLIP tokenizer, the same ids, without its per-caption cost on plain text.

open_clip's ``SimpleTokenizer`` runs ``ftfy.fix_text`` and ``html.unescape`` twice on every
caption, then byte-encodes and looks up each word again even when its BPE is cached: about
0.19 ms a caption, a third of the demo's text encoding and more than the tiny CLIP tower itself
(issue 30, few-step end to end). On printable ASCII without ``&`` those cleaners change nothing
(ftfy repairs mojibake, control characters, terminal escapes, ligatures, widths and ``\\r``; the
unescaping needs an ``&``), so :class:`ClipTokenizer` skips them there and keeps each word's ids;
every other caption goes through open_clip's own ``encode``. Splitting (open_clip's pattern),
byte encoding and BPE are open_clip's own functions, so the ids are the same by construction,
and ``tests/test_encoders.py`` compares them with open_clip's for every case above.
"""

from __future__ import annotations

import re

import torch

_MAX_WORDS = 100_000  # words whose ids are kept (~10 MB)
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e\t\n]*")  # printable ASCII, tab and newline; no "&"


class ClipTokenizer:
    """``tokenizer(texts, context_length=None) -> (B, C) LongTensor``, as open_clip's."""

    def __init__(self, slow) -> None:
        self.slow = slow
        self.context_length = slow.context_length
        self.sot_token_id, self.eot_token_id = slow.sot_token_id, slow.eot_token_id
        self._words: dict[str, list[int]] = {}  # a word (as the pattern splits) -> its ids

    @staticmethod
    def fits(tokenizer) -> bool:
        """Whether ``tokenizer`` is open_clip's BPE tokenizer with its default cleaning (lower
        case) and truncation: the one whose steps this class reuses."""
        from open_clip import tokenizer as oc

        return (isinstance(tokenizer, oc.SimpleTokenizer) and getattr(tokenizer, "reduction_fn", None) is None
                and getattr(tokenizer, "clean_fn", None) is oc._clean_lower
                and all(hasattr(tokenizer, a) for a in ("pat", "bpe", "byte_encoder", "encoder", "sot_token_id")))

    def encode(self, text: str) -> list[int]:
        """One caption's ids (no start or end token), open_clip's ``encode``."""
        if not _PLAIN.fullmatch(text):
            return self.slow.encode(text)
        from open_clip.tokenizer import whitespace_clean

        ids: list[int] = []
        for word in self.slow.pat.findall(whitespace_clean(text.strip()).lower()):  # open_clip's pattern
            found = self._words.get(word)
            if found is None:
                if len(self._words) >= _MAX_WORDS:  # a caption corpus has millions of words: keep the memory bounded
                    self._words.clear()
                encoded = "".join(self.slow.byte_encoder[b] for b in word.encode("utf-8"))
                found = self._words[word] = [self.slow.encoder[piece] for piece in self.slow.bpe(encoded).split(" ")]
            ids += found
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Captions -> (B, C) ids: start token, the caption's, end token, zeros; a caption longer
        than C is cut to C with the end token last (open_clip's truncation)."""
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        rows = []
        for text in texts:
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            rows.append(ids + [0] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), length)  # (B, C)


def fast_tokenizer(tokenizer):
    """:class:`ClipTokenizer` over open_clip's default tokenizer; any other tokenizer as it is."""
    return ClipTokenizer(tokenizer) if ClipTokenizer.fits(tokenizer) else tokenizer
