"""tokenizing.py on its own: GPT-2's tokenizer as tiktoken is OpenAI's own; both encoders give the
tokenizer's ids, led by end-of-text, with a quoted special token kept as text; a trained BPE is one that
tiktoken reproduces; what cannot be done is refused in one line. (That the two encoders write the same
shards is tested with prepare_data.py, in test_data.py.)"""

import copy

import pytest
from tiktoken.load import load_tiktoken_bpe
from tokenizers import pre_tokenizers

from conftest import shared_file
from tokenizing import EOT, document_encoder, load_tokenizer, tiktoken_encoding, train_bpe

TEXTS = ["A page that quotes <|endoftext|> in its text, twice: <|endoftext|>",
         "naïve café — 日本語のテキスト, русский текст 🤖🧪\n\n\n   \t  trailing   ",
         "1234567890 3.14159 '''quoted''' they'll we've you're it's don't I'm I'd I'M", ""]  # fmt: skip


def test_gpt2_as_tiktoken_has_openais_own_ranks(gpt2_tokenizer):
    openai = load_tiktoken_bpe(str(shared_file("gpt2-tokenizer/gpt2.tiktoken")))  # whisper's copy of GPT-2's ranks
    encoding = tiktoken_encoding(gpt2_tokenizer)
    assert {encoding.decode_single_token_bytes(rank): rank for rank in range(encoding.n_vocab)} == openai


@pytest.mark.parametrize("bpe", ["gpt2", "trained"])
def test_both_encoders_give_the_tokenizers_ids_led_by_eot(bpe, gpt2_tokenizer):
    tokenizer = gpt2_tokenizer if bpe == "gpt2" else train_bpe(TEXTS * 20, vocab_size=300)
    eot = tokenizer.eos_token_id
    ids = tokenizer(TEXTS, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    expected = [[eot, *document] for document in ids]
    assert tiktoken_encoding(tokenizer) is not None
    for encoder in ("tiktoken", "tokenizers"):
        documents = document_encoder(tokenizer, encoder)(TEXTS)
        assert [document.tolist() for document in documents] == expected, encoder
    assert expected[0].count(eot) == 1  # the quoted <|endoftext|> stayed text


def test_a_trained_bpe_has_the_asked_size_and_eot_as_its_document_separator():
    tokenizer = train_bpe(TEXTS * 20, vocab_size=300)
    assert len(tokenizer) <= 300 and tokenizer.eos_token == tokenizer.bos_token == EOT
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == EOT


def test_what_cannot_be_done_is_refused_in_one_line(gpt2_tokenizer, tmp_path):
    prefix_space = copy.deepcopy(gpt2_tokenizer)  # "hello" and " hello" become the same tokens: not GPT-2's rule
    prefix_space.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert tiktoken_encoding(prefix_space) is None
    with pytest.raises(ValueError, match="tiktoken cannot reproduce tokenizer .*; use --encoder tokenizers"):
        document_encoder(prefix_space, "tiktoken")
    by_the_tokenizer = document_encoder(prefix_space)(["hello"])[0].tolist()
    assert by_the_tokenizer[1:] == prefix_space("hello", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="cannot load tokenizer .*nowhere.*--vocab_size N to train one"):
        load_tokenizer(str(tmp_path / "nowhere"))
