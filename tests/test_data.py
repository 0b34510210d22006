"""moe_core.data: text sources -> documents -> token batches. CPU, seeded, no download, no network."""

from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from moe_core.data import (
    BUILTIN_SOURCES,
    SHARED_SOURCES,
    TextSource,
    TextSourceError,
    available_sources,
    eval_windows,
    load_documents,
    parse_text_source,
    sample_sequences,
    shared_data_dir,
    text_preview,
    training_windows,
)

RECORDS = [
    {"id": 1, "title": "First", "text": "Alpha beta gamma."},
    {"id": 2, "title": "Second", "text": "Delta epsilon."},
]


def tiny_tokenizer():
    """A byte-level tokenizer built in memory: one token per UTF-8 byte, ids 4.. (4 specials first)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tiny_dense(tok):
    """A tiny random Llama with the byte tokenizer, wrapped like a DenseModel (.model, .tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return SimpleNamespace(model=LlamaForCausalLM(config).eval(), tokenizer=tok)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def write_table(df, path):
    writers = {
        ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
        ".json": lambda: df.to_json(path, orient="records"),
        ".csv": lambda: df.to_csv(path, index=False),
        ".parquet": lambda: df.to_parquet(path),
    }
    writers[path.suffix]()
    return path


# ---------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("builtin:pydoc", TextSource("builtin", "pydoc")),
        ("builtin:stdlib", TextSource("builtin", "stdlib")),
        ("shared:wikitext2", TextSource("shared", "wikitext2")),
        ("shared:calib-news#text", TextSource("shared", "calib-news", text_field="text")),
        ("file:/tmp/x.jsonl#body", TextSource("file", "/tmp/x.jsonl", text_field="body")),
        ("hub:wikitext", TextSource("hub", "wikitext")),
        (
            "hub:Salesforce/wikitext:wikitext-2-raw-v1@test#text",
            TextSource(
                "hub", "Salesforce/wikitext", text_field="text", config="wikitext-2-raw-v1", split="test"
            ),
        ),
        ("hub:allenai/c4@validation", TextSource("hub", "allenai/c4", split="validation")),
    ],
)
def test_parse_and_spec_round_trip(spec, expected):
    assert parse_text_source(spec) == expected
    assert parse_text_source(expected.spec) == expected


def test_bare_existing_path_is_a_file_source(tmp_path):
    path = write(tmp_path / "notes.txt", "hello")
    assert parse_text_source(str(path)) == TextSource("file", str(path))
    assert parse_text_source(f"{path}#text") == TextSource("file", str(path), text_field="text")


@pytest.mark.parametrize(
    "spec, words",
    [
        ("builtin:nope", ["builtin:pydoc"]),
        ("shared:lambada", ["shared:wikitext2"]),
        ("no/such/file.txt", ["builtin:", "file:"]),
        ("", ["builtin:"]),
        ("builtin:pydoc#text", ["no fields"]),
    ],
)
def test_bad_specs_say_what_to_use(spec, words):
    with pytest.raises(TextSourceError) as err:
        parse_text_source(spec)
    assert all(w in str(err.value) for w in words)


def test_config_and_split_only_for_hub():
    with pytest.raises(TextSourceError, match="hub sources only"):
        TextSource("file", "x.txt", split="test")
    with pytest.raises(TextSourceError, match="kind"):
        TextSource("web", "x")


# ---------------------------------------------------------------------------------------------
# Files


def test_txt_is_one_verbatim_document(tmp_path):
    text = "Para one.\n\n\n\nPara two.\n"
    assert load_documents(write(tmp_path / "a.txt", text).as_posix()) == [text]


def test_jsonl_default_and_selected_field(tmp_path):
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert load_documents(f"file:{path}") == ["Alpha beta gamma.", "Delta epsilon."]
    assert load_documents(f"file:{path}#title") == ["First", "Second"]


def test_jsonl_gz(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in RECORDS))
    assert load_documents(f"file:{path}") == ["Alpha beta gamma.", "Delta epsilon."]


def test_single_string_field_is_the_default(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps({"id": 1, "body": "Only text."}))
    assert load_documents(f"file:{path}") == ["Only text."]


def test_ambiguous_fields_ask_for_one(tmp_path):
    path = write(tmp_path / "a.jsonl", json.dumps({"prompt": "p", "answer": "a"}))
    with pytest.raises(TextSourceError) as err:
        load_documents(f"file:{path}")
    assert "prompt" in str(err.value) and "answer" in str(err.value) and "#" in str(err.value)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_missing_field_names_the_available_ones(tmp_path, suffix):
    path = write_table(pd.DataFrame(RECORDS), tmp_path / f"a.{suffix}")
    with pytest.raises(TextSourceError) as err:
        load_documents(f"file:{path}#body")
    message = str(err.value)
    assert f"file:{path}#body" in message and "'body'" in message
    assert all(name in message for name in ("id", "title", "text"))


@pytest.mark.parametrize(
    "payload",
    [RECORDS, {"meta": {"n": 2}, "data": RECORDS}, {"text": [r["text"] for r in RECORDS], "id": [1, 2]}],
    ids=["list", "under-key", "columns"],
)
def test_json_layouts(tmp_path, payload):
    path = write(tmp_path / "a.json", json.dumps(payload))
    assert load_documents(f"file:{path}") == ["Alpha beta gamma.", "Delta epsilon."]


def test_json_single_record_and_list_of_strings(tmp_path):
    assert load_documents(write(tmp_path / "a.json", json.dumps({"text": "One doc."})).as_posix()) == [
        "One doc."
    ]
    assert load_documents(write(tmp_path / "b.json", json.dumps(["x", " ", "y"])).as_posix()) == ["x", "y"]


def test_csv_and_parquet_with_field_selection(tmp_path):
    for name in ("a.csv", "a.parquet"):
        path = write_table(pd.DataFrame(RECORDS), tmp_path / name)
        assert load_documents(f"file:{path}") == ["Alpha beta gamma.", "Delta epsilon."]
        assert load_documents(f"file:{path}#title") == ["First", "Second"]


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("empty.txt", b"", ["empty"]),
        ("blank.txt", b"  \n\n \t\n", ["no text"]),
        ("blank.jsonl", b'{"text": ""}\n{"text": "  "}\n', ["no text"]),
        ("nul.txt", b"abc\x00\x01\x02def", ["not UTF-8"]),
        ("latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"), ["not UTF-8"]),
        ("bad.jsonl", b'{"text": "ok"}\n{not json\n', ["line 2", "JSON"]),
        ("bad.parquet", b"PAR1 garbage", ["parquet"]),
        ("image.png", b"\x89PNG", ["unsupported", ".txt"]),
    ],
)
def test_unusable_files_raise_naming_the_source(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TextSourceError) as err:
        load_documents(f"file:{path}")
    assert f"file:{path}" in str(err.value)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(TextSourceError, match="not found"):
        load_documents(f"file:{tmp_path / 'gone.txt'}")


def test_max_chars_caps_deterministically(tmp_path):
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(50)))
    docs = load_documents(f"file:{path}", max_chars=1000)
    assert sum(map(len, docs)) == 1000 and docs == load_documents(f"file:{path}", max_chars=1000)
    assert docs[0] == "doc 0 " * 20


# ---------------------------------------------------------------------------------------------
# Builtins, shared folder, hub


@pytest.mark.parametrize("name", ["pydoc", "stdlib"])
def test_builtin_text_is_nonempty_and_deterministic(name):
    docs = load_documents(f"builtin:{name}", max_chars=300_000)
    assert len(docs) > 3 and sum(map(len, docs)) == 300_000
    assert docs == load_documents(f"builtin:{name}", max_chars=300_000)
    marker = {"pydoc": "statement", "stdlib": "\nimport "}[name]  # prose vs code
    assert marker in "".join(docs)


def test_available_sources_lists_builtins(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_STUDIO_DATA", str(tmp_path))
    assert available_sources() == [(f"builtin:{n}", d) for n, d in BUILTIN_SOURCES.items()]


def test_shared_source_without_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_STUDIO_DATA", str(tmp_path))  # exists but empty
    assert shared_data_dir() == tmp_path
    with pytest.raises(TextSourceError, match="missing from the shared data folder.*builtin:pydoc"):
        load_documents("shared:wikitext2")
    monkeypatch.setenv("MOE_STUDIO_DATA", str(tmp_path / "nowhere"))
    assert shared_data_dir() is None
    with pytest.raises(TextSourceError, match="needs the shared data folder.*builtin:pydoc"):
        load_documents("shared:c4")


needs_shared = pytest.mark.skipif(
    shared_data_dir() is None or not (shared_data_dir() / SHARED_SOURCES["wikitext2"][0]).is_file(),
    reason="no shared data folder on this machine",
)


@needs_shared
def test_shared_wikitext2_is_the_joined_test_string(tok):
    (doc,) = load_documents("shared:wikitext2")
    assert len(doc) == 1_294_336 and doc.startswith("\n\n = Robert Boulter = \n")
    windows = eval_windows([doc], tok, seq_len=512, max_windows=4)
    assert windows.shape == (4, 512)
    assert tok.decode(windows[0]) == doc.encode("utf-8")[:512].decode("utf-8", errors="replace")


@needs_shared
def test_every_listed_shared_source_loads():
    shared = [spec for spec, _ in available_sources() if spec.startswith("shared:")]
    assert len(shared) == len(SHARED_SOURCES)
    for spec in shared:
        docs = load_documents(spec, max_chars=50_000)
        assert docs and sum(map(len, docs)) == 50_000, spec


def test_hub_offline_is_explained(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TextSourceError) as err:
        load_documents("hub:wikitext:wikitext-2-raw-v1@test")
    message = str(err.value)
    assert "hub:wikitext:wikitext-2-raw-v1@test" in message and "offline" in message and "builtin:" in message


def test_hub_dataset_fields(monkeypatch):
    import datasets

    calls = []

    def fake(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"label": [0, 1], "body": ["One.", "Two."], "title": ["a", "b"]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load_documents("hub:org/set:cfg@test#body") == ["One.", "Two."]
    assert calls == [("org/set", "cfg", "test")]
    with pytest.raises(TextSourceError, match="label, body, title"):
        load_documents("hub:org/set#text")


def test_builtin_model_needs_a_model():
    with pytest.raises(TextSourceError, match="no model was given"):
        load_documents("builtin:model")


def test_builtin_model_samples_are_seeded(tiny_dense):
    state = torch.get_rng_state()
    kwargs = dict(model=tiny_dense, n_model_samples=3, model_sample_tokens=12)
    docs = load_documents("builtin:model", seed=0, **kwargs)
    assert len(docs) == 3 and all(docs)
    assert docs == load_documents("builtin:model", seed=0, **kwargs)
    assert docs != load_documents("builtin:model", seed=1, **kwargs)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched


# ---------------------------------------------------------------------------------------------
# Tokens


def test_sample_sequences_are_seeded_windows_of_the_joined_text(tok):
    docs = [f"Document number {i}: " + "lorem ipsum " * 10 for i in range(20)]
    full = torch.tensor(tok("\n\n".join(docs), add_special_tokens=False).input_ids)
    batch = sample_sequences(docs, tok, n=6, seq_len=32, seed=0)
    assert batch.shape == (6, 32) and batch.dtype == torch.long
    assert torch.equal(batch, sample_sequences(docs, tok, n=6, seq_len=32, seed=0))
    assert not torch.equal(batch, sample_sequences(docs, tok, n=6, seq_len=32, seed=1))
    windows = full.unfold(0, 32, 1)  # (T - 31, 32): every window of the token stream
    assert all((windows == row).all(dim=1).any() for row in batch)


def test_training_windows_cover_the_text_once_per_pass_in_a_seeded_order(tok):
    docs = [f"Document number {i}: " + " ".join(f"item {i * 37 + j}" for j in range(12)) for i in range(20)]
    full = torch.tensor(tok("\n\n".join(docs), add_special_tokens=False).input_ids)
    tiles = full[: len(full) // 32 * 32].view(-1, 32)  # (W, 32): the text's non-overlapping windows
    assert len(set(map(tuple, tiles.tolist()))) == len(tiles) > 8  # all different, so each can be found
    batch = training_windows(docs, tok, n=len(tiles), seq_len=32, seed=0)
    assert batch.dtype == torch.long and batch.shape == tiles.shape
    where = [int((tiles == row).all(dim=1).nonzero()[0]) for row in batch]
    assert sorted(where) == list(range(len(tiles)))  # each window exactly once in one pass
    assert where != sorted(where)  # shuffled, not the text's order
    assert torch.equal(batch, training_windows(docs, tok, n=len(tiles), seq_len=32, seed=0))
    assert not torch.equal(batch, training_windows(docs, tok, n=len(tiles), seq_len=32, seed=1))
    longer = training_windows(docs, tok, n=len(tiles) + 3, seq_len=32, seed=0)
    assert torch.equal(longer[: len(tiles)], batch)  # past one pass: the first pass, then a new order
    assert all((tiles == row).all(dim=1).any() for row in longer[len(tiles) :])
    with pytest.raises(TextSourceError, match="training_windows needs n >= 1"):
        training_windows(docs, tok, n=0, seq_len=32)
    with pytest.raises(TextSourceError, match="fewer than one window"):
        training_windows(["0123456789"], tok, n=2, seq_len=32)


def test_too_short_text_says_how_many_tokens(tok):
    with pytest.raises(TextSourceError, match=r"'shared:c4' has 10 tokens.*seq_len=32"):
        sample_sequences(["0123456789"], tok, n=2, seq_len=32, source="shared:c4")
    with pytest.raises(TextSourceError, match="10 tokens"):
        eval_windows(["0123456789"], tok, seq_len=32)
    with pytest.raises(TextSourceError, match="empty"):
        sample_sequences(["", "  "], tok, n=2, seq_len=4)
    with pytest.raises(TextSourceError, match="n >= 1"):
        sample_sequences(["abc"], tok, n=0, seq_len=2)
    with pytest.raises(TextSourceError, match="seq_len >= 2"):
        sample_sequences(["abc"], tok, n=1, seq_len=1)


def test_eval_windows_are_consecutive_and_drop_the_tail(tok):
    docs = ["a" * 500, "b" * 498]  # joined: 1000 bytes = 1000 tokens
    full = torch.tensor(tok("\n\n".join(docs), add_special_tokens=False).input_ids)
    windows = eval_windows(docs, tok, seq_len=64)
    assert windows.shape == (1000 // 64, 64)
    assert torch.equal(windows.flatten(), full[: 15 * 64])
    assert torch.equal(eval_windows(docs, tok, seq_len=64, max_windows=3), windows[:3])


def test_eval_windows_prefix_tokenizing_matches_the_full_text(tok):
    docs = ["word " * 5000]
    assert torch.equal(
        eval_windows(docs, tok, seq_len=100, max_windows=7), eval_windows(docs, tok, seq_len=100)[:7]
    )


def test_text_preview(tok):
    small = text_preview(["héllo", "world"], tok, n_chars=8)
    assert small == {
        "n_docs": 2,
        "n_chars": 12,
        "n_tokens": 13,
        "tokens_estimated": False,
        "preview": "héllo\n\nw",
    }
    big = text_preview(["abcd" * 100_000], tok)
    assert big["tokens_estimated"] and big["n_tokens"] == 400_000 and len(big["preview"]) == 600
