"""``--bos auto|on|off``: the ids a run scores are the tokenizer's own ids of the text, plus or
minus the BOS id, whatever ``add_special_tokens=True`` does in the installed transformers."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from orchestrator.corpus import load_corpus
from orchestrator.errors import KvorchError
from orchestrator.sweep.spec import JobSpec
from workers.contract import tokenization
from workers.contract.tokenization import difference, resolve

# The embedded GGUF declares tokenizer.ggml.bos_token_id = 1 (<|im_start|>).
SMOLLM2_BOS = 1


def own_ids(tokenizer, text: str) -> list[int]:
    """The tokenizer's ids of the text alone, through its token strings (not the path kvorch uses)."""
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


def test_bos_modes_on_the_embedded_tokenizer(smollm2_tokenizer):
    text = load_corpus("pydoc")[0].text
    plain = own_ids(smollm2_tokenizer, text)
    assert smollm2_tokenizer.convert_tokens_to_ids(smollm2_tokenizer.bos_token) == SMOLLM2_BOS
    assert plain[0] != SMOLLM2_BOS and len(plain) > 300
    off = resolve(smollm2_tokenizer, "off")
    on = resolve(smollm2_tokenizer, "on")
    auto = resolve(smollm2_tokenizer, "auto")
    assert off.ids(text, 300) == plain[:300]
    assert on.ids(text, 300) == [SMOLLM2_BOS, *plain[:299]]
    assert auto.ids(text, 300) == on.ids(text, 300)  # the tokenizer declares a BOS token
    assert (off.bos_id, on.bos_id, auto.bos_id) == (None, SMOLLM2_BOS, SMOLLM2_BOS)
    assert on.ids(text, 1) == [SMOLLM2_BOS] and off.ids(text, 10_000) == plain


def test_a_tokenizer_without_bos(tiny_model_dir, tmp_path):
    """auto means off; on is a one-line error that names the fix."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(tmp_path)
    no_bos = AutoTokenizer.from_pretrained(tmp_path)
    assert no_bos.bos_token_id is None
    text = load_corpus("pydoc")[1].text
    assert resolve(no_bos, "auto").ids(text, 200) == own_ids(no_bos, text)[:200]
    with pytest.raises(ValueError, match=r"^--bos on, but this model's tokenizer .* has no BOS token; pass --bos auto"):
        resolve(no_bos, "on")


class ReleaseTokenizer:
    """A tokenizer as two transformers releases treat the same files: one prepends BOS under
    ``add_special_tokens=True``, the other does not."""

    bos_token_id = 7

    def __init__(self, prepends_bos: bool) -> None:
        self.prepends_bos = prepends_bos

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [ord(c) for c in text]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens and self.prepends_bos else ids}

    def __len__(self) -> int:
        return 256


@pytest.mark.parametrize("mode", tokenization.BOS_MODES)
def test_ids_do_not_depend_on_what_the_release_adds(mode):
    old, new = ReleaseTokenizer(prepends_bos=True), ReleaseTokenizer(prepends_bos=False)
    assert resolve(old, mode).ids("abc", 10) == resolve(new, mode).ids("abc", 10)
    assert resolve(old, mode).fingerprint([[1, 2]]) == resolve(new, mode).fingerprint([[1, 2]])


def test_a_directory_that_is_not_a_model_is_one_line_naming_it(tmp_path):
    """Issue 28: a model directory without tokenizer files gave transformers' 5-line message,
    which never names the path."""
    import json

    from click.testing import CliRunner

    from orchestrator.cli import main

    model = tmp_path / "weights-only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 97}))
    with pytest.raises(ValueError) as error:
        tokenization.load(str(model), "auto")
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--model {model}: transformers could not load a tokenizer")
    assert "a model directory needs its tokenizer files next to config.json" in message
    lake = tmp_path / "lake"
    result = CliRunner().invoke(main, ["submit", "--model", str(model), "--lake", str(lake), "--no-progress"])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and str(model) in result.output, result.output
    assert not lake.exists()


def test_unknown_bos_mode_is_refused():
    with pytest.raises(KvorchError, match="--bos 'yes' is unknown; use one of auto, on, off"):
        JobSpec(methods=("baseline",), bos="yes")
    with pytest.raises(ValueError, match="--bos 'yes' is unknown"):
        resolve(ReleaseTokenizer(False), "yes")


def test_fingerprints_tell_tokenizations_apart(smollm2_tokenizer):
    docs = [d.text for d in load_corpus("pydoc")[:2]]
    on, off = resolve(smollm2_tokenizer, "on"), resolve(smollm2_tokenizer, "off")
    a = on.fingerprint(on.ids(t, 64) for t in docs)
    b = off.fingerprint(off.ids(t, 64) for t in docs)
    assert a["bos_resolved"] and a["bos_token_id"] == SMOLLM2_BOS and not b["bos_resolved"]
    assert a["vocab_size"] == len(smollm2_tokenizer) and a["tokenizer"] == type(smollm2_tokenizer).__name__
    assert difference(a, dict(a)) is None
    assert difference(a, b) == (
        f"bos on (id 1) vs off; token ids sha256 {a['token_ids_sha256'][:12]} vs {b['token_ids_sha256'][:12]}"
    )
    shorter = on.fingerprint(on.ids(t, 63) for t in docs)
    assert difference(a, shorter) == (
        f"token ids sha256 {a['token_ids_sha256'][:12]} vs {shorter['token_ids_sha256'][:12]}"
    )


class CountingTokenizer:
    """A tokenizer that records how many characters it was given, in all."""

    def __init__(self, inner) -> None:
        self.inner, self.chars = inner, 0
        self.bos_token_id = inner.bos_token_id

    def __call__(self, text: str, **kwargs):
        self.chars += len(text)
        return self.inner(text, **kwargs)


def test_only_the_prefix_max_tokens_uses_is_tokenized_and_the_ids_are_the_whole_texts(smollm2_tokenizer):
    """Issue 38, 9: one 50 MB line was tokenized whole (7.7 GB, 90 s) to keep 256 tokens."""
    pydoc = [d.text for d in load_corpus("pydoc")[:4]]
    texts = [
        *pydoc,
        "".join(pydoc) * 3,
        "x" * 40_000,  # one word, no space anywhere
        "1234567890" * 4_000,  # digits, which tokenizers split in groups
        " " * 20_000 + "end",  # a run of spaces
        "word " * 10_000,
        "\u00e9\u4e2d\U0001f600" * 5_000,  # multi-byte characters
    ]
    for bos in ("on", "off"):
        for text in texts:
            whole = own_ids(smollm2_tokenizer, text)
            for max_tokens in (1, 2, 7, 64, 300):
                got = resolve(smollm2_tokenizer, bos).ids(text, max_tokens)
                expected = ([SMOLLM2_BOS] if bos == "on" else []) + whole
                assert got == expected[:max_tokens], (bos, text[:20], max_tokens)
    counting = CountingTokenizer(smollm2_tokenizer)
    long_line = "".join(pydoc) * 400  # megabytes on one line
    head = own_ids(smollm2_tokenizer, long_line[:20_000])[:255]
    assert resolve(counting, "on").ids(long_line, 256) == [SMOLLM2_BOS, *head]
    assert counting.chars < 100_000 < len(long_line) // 10
