from tiny_models import make_tokenizer

from nimblelm.engine.detokenizer import IncrementalDetokenizer

TEXT = "Hello wörld, naïve café 😀 done. 東京 is big."


def test_streamed_text_equals_full_decode_and_never_splits_a_character():
    tokenizer = make_tokenizer(384)
    prompt = tokenizer.encode("Say:")
    output = tokenizer.encode(TEXT)
    assert len(output) > len(TEXT.split())  # multi-byte characters really span several tokens
    detok = IncrementalDetokenizer(tokenizer, len(prompt), skip_special_tokens=True)
    ids = list(prompt)
    deltas = []
    for token in output:
        ids.append(token)
        deltas.append(detok.step(ids))
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


def test_an_unfinished_character_is_flushed_only_at_the_end():
    tokenizer = make_tokenizer(384)
    emoji = tokenizer.encode("😀")
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tokenizer, 0, skip_special_tokens=True)
    partial = emoji[:-1]
    assert detok.step(partial) == ""
    assert "\ufffd" in detok.step(partial, final=True)
