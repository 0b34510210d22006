"""Text sources -> documents -> token batches (calibration samples and evaluation windows).

Text source specs (one string, the same in the UI, the CLI and Python):

- ``builtin:pydoc``: Python's own documentation text (``pydoc_data.topics``); no download.
- ``builtin:stdlib``: the standard library's ``.py`` source code; no download.
- ``builtin:model``: text sampled from the loaded model itself (seeded): the data-free option.
- ``shared:<name>[#field]``: a corpus of the shared data folder (:func:`shared_data_dir`), see ``SHARED_SOURCES``.
- ``file:<path>[#field]`` or just an existing path: txt/md, jsonl, json, csv/tsv, parquet (text formats may be .gz).
- ``hub:<dataset>[:<config>][@<split>][#<field>]``: ``datasets.load_dataset`` (needs network).

Every failure (missing, empty, binary, too short, no such field, hub offline) raises :class:`TextSourceError`,
whose message names the source, what was wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import torch

if TYPE_CHECKING:
    from moe_core.model_io import DenseModel

SourceKind = Literal["builtin", "shared", "file", "hub"]

BUILTIN_SOURCES: dict[str, str] = {
    "pydoc": "Python documentation text (pydoc_data topics, ~0.5 MB of English prose)",
    "stdlib": "Python standard library source code (.py files, tests excluded)",
    "model": "Text sampled from the loaded model itself (seeded; data-free, slow on CPU)",
}

# name -> (path inside the shared data folder, description). Every file here has a "text" field or is plain text.
SHARED_SOURCES: dict[str, tuple[str, str]] = {
    "wikitext2": (
        "wikitext2_raw/wiki.test.hf_joined.txt",
        "WikiText-2 raw test, joined (the perplexity set)",
    ),
    "c4": ("c4_sample/c4_text.jsonl", "C4 English web-text sample (1480 truncated docs)"),
    "calib-arxiv": ("calib/arxiv/arxiv_abstracts.jsonl", "arXiv abstracts (3579)"),
    "calib-books": ("calib/books/tinyshakespeare_docs.jsonl", "Shakespeare, ~2 kB chunks (tinyshakespeare)"),
    "calib-code": ("calib/code/code_docs.jsonl", "Python code (HumanEval + MBPP)"),
    "calib-math": ("calib/math/gsm8k_train_docs.jsonl", "Grade-school maths word problems (GSM8K train)"),
    "calib-news": ("calib/news/ag_news_test_docs.jsonl", "News titles + descriptions (AG News test)"),
    "calib-wikipedia": ("calib/wikipedia/wikipedia_articles.jsonl", "Wikipedia articles (172 extracts)"),
}

SPEC_FORMS = (
    "builtin:pydoc | builtin:stdlib | builtin:model | shared:<name> | file:<path>[#field] | "
    "hub:<dataset>[:<config>][@<split>][#<field>]"
)
FILE_FORMATS = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl"}
FILE_FORMATS |= {".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
OFFLINE_HINT = (
    "use a local file (file:<path>) or a builtin source (builtin:pydoc, builtin:stdlib, builtin:model)"
)
# Neutral openings for builtin:model; sample i starts from prompt i % len (LLM-QAT-style data-free generation).
MODEL_PROMPTS = ("The", "In", "A", "It", "When", "This", "We", "One")
PREVIEW_TOKENIZE_CHARS = 200_000  # text_preview tokenizes at most this much and extrapolates
MAX_FILE_MB = 512  # default size limit of a text file (and of an upload in the app); MOE_STUDIO_MAX_FILE_MB


class TextSourceError(ValueError):
    """A text source is unusable; the message names the source, what was wrong and what to do."""


@dataclass(frozen=True)
class TextSource:
    """Where calibration/evaluation text comes from; ``spec`` is its one-string form."""

    kind: SourceKind
    name: str  # builtin/shared name, file path, or hub dataset id
    text_field: str | None = (
        None  # which field holds the text (records formats); None: "text" or the only one
    )
    config: str | None = None  # hub only
    split: str = "train"  # hub only

    def __post_init__(self):
        if self.kind not in get_args(SourceKind):
            raise TextSourceError(f"Unknown text source kind '{self.kind}'. Use one of: {SPEC_FORMS}.")
        if not isinstance(self.name, str) or not self.name.strip():
            raise TextSourceError(f"A {self.kind} text source needs a name. Use one of: {SPEC_FORMS}.")
        known = {"builtin": BUILTIN_SOURCES, "shared": SHARED_SOURCES}.get(self.kind)
        if known is not None and self.name not in known:
            raise TextSourceError(
                f"Unknown {self.kind} text source '{self.name}'. Known: {', '.join(f'{self.kind}:{n}' for n in known)}."
            )
        if self.kind == "builtin" and self.text_field is not None:
            raise TextSourceError(f"builtin:{self.name} has no fields; drop '#{self.text_field}'.")
        if self.text_field is not None and not self.text_field.strip():
            raise TextSourceError(f"Text source '{self.name}': the text field name is empty; drop the '#'.")
        if self.kind != "hub" and (self.config is not None or self.split != "train"):
            raise TextSourceError(
                f"config and split apply to hub sources only, not to {self.kind}:{self.name}."
            )
        if not self.split:
            raise TextSourceError(f"hub:{self.name}: the split is empty; write e.g. @train or @test.")

    @property
    def spec(self) -> str:
        """The string form; ``parse_text_source(s.spec) == s``."""
        out = f"{self.kind}:{self.name}"
        if self.config is not None:
            out += f":{self.config}"
        if self.split != "train":
            out += f"@{self.split}"
        return out + (f"#{self.text_field}" if self.text_field else "")


def parse_text_source(spec: str) -> TextSource:
    """Parse a source spec (see the module docstring); a bare existing path is a file source."""
    if not isinstance(spec, str) or not spec.strip():
        raise TextSourceError(f"Empty text source. Use one of: {SPEC_FORMS}.")
    spec = default_text() if spec.strip() == "auto" else spec.strip()
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("builtin", "shared", "file"):
        name, field = _split_field(rest, is_path=kind == "file")
        return TextSource(kind, name, text_field=field)
    if sep and kind == "hub":
        return _parse_hub(rest)
    name, field = _split_field(spec, is_path=True)
    if Path(name).expanduser().is_file():
        return TextSource("file", name, text_field=field)
    raise TextSourceError(
        f"Unknown text source '{spec}' (not an existing file either). Use one of: {SPEC_FORMS}."
    )


def _split_field(rest: str, is_path: bool) -> tuple[str, str | None]:
    """Split ``name#field``; for paths, a '#' that belongs to an existing file name is kept."""
    if "#" not in rest or (is_path and Path(rest).expanduser().exists()):
        return rest, None
    name, _, field = rest.rpartition("#")
    return name, field


def _parse_hub(rest: str) -> TextSource:
    rest, field = _split_field(rest, is_path=False)
    rest, _, split = rest.rpartition("@") if "@" in rest else (rest, "", "train")
    name, colon, config = rest.partition(":")
    return TextSource("hub", name, text_field=field, config=config if colon else None, split=split)


def default_text() -> str:
    """The text ``auto`` stands for: Wikipedia prose from the shared data when present, else Python's docs
    (never the scored WikiText-2 test text)."""
    return "shared:calib-wikipedia" if shared_data_dir() is not None else "builtin:pydoc"


def shared_data_dir() -> Path | None:
    """The shared data folder: ``$MOE_STUDIO_DATA``, else ``<repo>/../shared/data``; None when absent."""
    env = os.environ.get("MOE_STUDIO_DATA")
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return default if default.is_dir() else None


def available_sources() -> list[tuple[str, str]]:
    """(spec, description) of the builtins and of the shared corpora present on this machine."""
    out = [(f"builtin:{name}", desc) for name, desc in BUILTIN_SOURCES.items()]
    root = shared_data_dir()
    if root is not None:
        out += [(f"shared:{n}", desc) for n, (rel, desc) in SHARED_SOURCES.items() if (root / rel).is_file()]
    return out


# ---------------------------------------------------------------------------------------------
# Documents


def load_documents(
    source: TextSource | str,
    *,
    model: DenseModel | None = None,
    seed: int = 0,
    max_chars: int = 4_000_000,
    n_model_samples: int = 8,
    model_sample_tokens: int = 128,
) -> list[str]:
    """Read a source into a list of non-blank documents, at most ``max_chars`` characters in all.

    The cap keeps the first ``max_chars`` characters in source order (the last document is cut), so it is
    deterministic. ``model``, ``seed``, ``n_model_samples`` and ``model_sample_tokens`` are used by
    ``builtin:model`` only.
    """
    source = parse_text_source(source) if isinstance(source, str) else source
    if max_chars < 1:
        raise TextSourceError(f"Text source '{source.spec}': max_chars must be at least 1, got {max_chars}.")
    match (source.kind, source.name):
        case ("builtin", "pydoc"):
            docs = _cap(_pydoc_texts(), max_chars)
        case ("builtin", "stdlib"):
            docs = _cap(_stdlib_texts(), max_chars)
        case ("builtin", "model"):
            docs = _cap(_model_texts(model, seed, n_model_samples, model_sample_tokens), max_chars)
        case ("shared", _):
            docs = _read_file(_shared_path(source), source, max_chars)
        case ("file", _):
            docs = _read_file(Path(source.name).expanduser(), source, max_chars)
        case _:
            docs = _load_hub(source, max_chars)
    if not docs:
        raise TextSourceError(f"Text source '{source.spec}' contains no text. Pick a source with text in it.")
    return docs


def _cap(texts: Iterable[str], max_chars: int) -> list[str]:
    """Keep non-blank texts in order until ``max_chars`` characters; reads no further than needed."""
    docs, total = [], 0
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            continue
        docs.append(text[: max_chars - total])
        total += len(docs[-1])
        if total >= max_chars:
            break
    return docs


def _pydoc_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    return (topics[key] for key in sorted(topics))


def _stdlib_texts() -> Iterator[str]:
    """Standard-library sources (tests and site-packages excluded); the text depends on the Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        files += [Path(folder, n).relative_to(root).as_posix() for n in names if n.endswith(".py")]
    # A fixed pseudo-random order (by path hash), so that a capped read still spans the whole library.
    for rel in sorted(files, key=lambda r: hashlib.sha1(r.encode()).hexdigest()):
        try:
            yield (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def _model_texts(model, seed: int, n_samples: int, n_tokens: int) -> list[str]:
    """Sample ``n_samples`` continuations of ``n_tokens`` tokens from the model, seeded, in one batch."""
    if model is None or not hasattr(model, "model") or not hasattr(model, "tokenizer"):
        raise TextSourceError(
            "Text source 'builtin:model' samples text from the loaded model, but no model was given: pass "
            "model=<DenseModel> (moe_core.model_io.load_model), or pick builtin:pydoc or builtin:stdlib."
        )
    if n_samples < 1 or n_tokens < 1:
        raise TextSourceError(
            f"Text source 'builtin:model': n_model_samples and model_sample_tokens must be >= 1, "
            f"got {n_samples} and {n_tokens}."
        )
    tok, lm = model.tokenizer, model.model
    input_ids, attention_mask, n_pad = _left_padded_prompts(tok, n_samples)  # (N, P) each
    device = next(lm.parameters()).device
    # fork_rng: seeding here must not move the caller's global RNG streams.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        out = lm.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=0.95,
            max_new_tokens=n_tokens,
            min_new_tokens=n_tokens,  # a fixed amount of text per sample: EOS is blocked until then
            pad_token_id=_pad_id(tok),
        )  # (N, P + n_tokens)
    return [
        tok.decode(row[pad:].tolist(), skip_special_tokens=True) for row, pad in zip(out, n_pad, strict=True)
    ]


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return getattr(tokenizer, attr)
    return 0


def _left_padded_prompts(tokenizer, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Prompts i % len(MODEL_PROMPTS), tokenized the tokenizer's default way (BOS where it adds one)."""
    rows = [tokenizer(MODEL_PROMPTS[i % len(MODEL_PROMPTS)]).input_ids for i in range(n)]
    width = max(len(r) for r in rows)
    n_pad = [width - len(r) for r in rows]
    input_ids = torch.tensor([[_pad_id(tokenizer)] * p + r for r, p in zip(rows, n_pad, strict=True)])
    attention_mask = torch.tensor([[0] * p + [1] * len(r) for r, p in zip(rows, n_pad, strict=True)])
    return input_ids, attention_mask, n_pad


def _shared_path(source: TextSource) -> Path:
    root = shared_data_dir()
    if root is None:
        env = os.environ.get("MOE_STUDIO_DATA")
        where = (
            f"MOE_STUDIO_DATA={env} is not a folder"
            if env
            else "no shared/data folder next to the repository"
        )
        raise TextSourceError(
            f"Text source '{source.spec}' needs the shared data folder, but this machine has none ({where}). "
            "Set MOE_STUDIO_DATA to it, or pick a builtin source (builtin:pydoc, builtin:stdlib)."
        )
    path = root / SHARED_SOURCES[source.name][0]
    if not path.is_file():
        raise TextSourceError(
            f"Text source '{source.spec}': {path} is missing from the shared data folder {root}. "
            "Pick another source from available_sources(), or a builtin (builtin:pydoc, builtin:stdlib)."
        )
    return path


def _load_hub(source: TextSource, max_chars: int) -> list[str]:
    """A hub dataset via ``datasets.load_dataset``; any failure (offline, no such dataset) is explained."""
    try:
        import datasets

        ds = datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"[:300]
        raise TextSourceError(
            f"Text source '{source.spec}' could not be loaded from the Hugging Face hub ({detail}). The hub is "
            f"unreachable on an offline machine: {OFFLINE_HINT}."
        ) from exc
    strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    field = _choose_field(source, list(ds.column_names), strings)
    return _cap((row[field] for row in ds.select_columns([field])), max_chars)


# ---------------------------------------------------------------------------------------------
# Files


def max_file_bytes() -> int:
    """The largest text file (or upload) accepted: ``MOE_STUDIO_MAX_FILE_MB`` megabytes, default 512."""
    value = os.environ.get("MOE_STUDIO_MAX_FILE_MB", str(MAX_FILE_MB))
    try:
        megabytes = float(value)
    except ValueError:
        raise TextSourceError(
            f"MOE_STUDIO_MAX_FILE_MB must be a number of megabytes, got '{value}'."
        ) from None
    return int(megabytes * 2**20)


def check_file_size(path: Path, label: str) -> None:
    """Refuse a file over :func:`max_file_bytes`, saying how big it is and what the limit is."""
    size, limit = path.stat().st_size, max_file_bytes()
    if size > limit:
        raise TextSourceError(
            f"{label}: {path.name} is {size / 2**20:,.1f} MB, over the {limit / 2**20:,.1f} MB limit. Use a "
            "smaller sample of the text (a few MB is plenty for calibration), or raise MOE_STUDIO_MAX_FILE_MB."
        )


def _file_format(path: Path, source: TextSource) -> str:
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    suffix = suffixes[0] if suffixes[-1:] == [".gz"] and len(suffixes) == 2 else (suffixes or [""])[-1]
    fmt = FILE_FORMATS.get(suffix)
    if fmt is None or (fmt == "parquet" and path.name.lower().endswith(".gz")):
        raise TextSourceError(
            f"Text source '{source.spec}': unsupported file type '{''.join(path.suffixes) or 'none'}'. Supported: "
            f"{', '.join(sorted(FILE_FORMATS))} (text formats may be gzipped, e.g. data.jsonl.gz)."
        )
    return fmt


def _read_file(path: Path, source: TextSource, max_chars: int) -> list[str]:
    """Read a local file of any supported format into capped documents."""
    fmt = _file_format(path, source)
    if not path.is_file():
        raise TextSourceError(f"Text source '{source.spec}': file not found: {path}. Check the path.")
    if path.stat().st_size == 0:
        raise TextSourceError(f"Text source '{source.spec}': the file {path} is empty. Use a file with text.")
    check_file_size(path, f"Text source '{source.spec}'")
    if fmt != "parquet" and b"\x00" in _head_bytes(path):
        raise TextSourceError(_binary_message(source, path))
    try:
        docs = _FILE_READERS[fmt](path, source, max_chars)
    except TextSourceError:
        raise
    except UnicodeDecodeError as exc:
        raise TextSourceError(_binary_message(source, path)) from exc
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"[:300]
        raise TextSourceError(
            f"Text source '{source.spec}': could not read {path} as {fmt} ({detail}). Check that the file is "
            f"valid {fmt}, or save the text as .txt or .jsonl."
        ) from exc
    if not docs:
        raise TextSourceError(f"Text source '{source.spec}': {path} contains no text. Use a file with text.")
    return docs


def _binary_message(source: TextSource, path: Path) -> str:
    return (
        f"Text source '{source.spec}': {path} is not UTF-8 text (a binary file?). Save the text as UTF-8 "
        ".txt/.jsonl/.csv, or use .parquet."
    )


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _head_bytes(path: Path, n: int = 8192) -> bytes:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read(n)


def _read_txt(path: Path, source: TextSource, max_chars: int) -> list[str]:
    """The whole file is one document, kept verbatim (WikiText-2's joined string must stay exact)."""
    if source.text_field is not None:
        raise TextSourceError(
            f"Text source '{source.spec}': a plain text file has no fields; drop '#{source.text_field}'."
        )
    with _open_text(path) as f:
        return _cap([f.read(max_chars)], max_chars)


def _read_jsonl(path: Path, source: TextSource, max_chars: int) -> list[str]:
    with _open_text(path) as f:
        records = (_json_line(line, i, source) for i, line in enumerate(f, 1) if line.strip())
        return _docs_from_records(records, source, max_chars)


def _json_line(line: str, lineno: int, source: TextSource):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise TextSourceError(
            f"Text source '{source.spec}': line {lineno} is not valid JSON ({exc.msg}). Each line of a .jsonl "
            "file must be one JSON object."
        ) from exc


def _read_json(path: Path, source: TextSource, max_chars: int) -> list[str]:
    """A list of records (or strings), or an object holding them (see :func:`_json_records`)."""
    with _open_text(path) as f:
        data = json.load(f)
    records = _json_records(data, source) if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise TextSourceError(
            f"Text source '{source.spec}': the JSON file holds a {type(data).__name__}, not records. "
            "Use a list of objects with a text field, or a .txt file."
        )
    return _docs_from_records(iter(records), source, max_chars)


def _json_records(data: dict, source: TextSource) -> list:
    """Records in an object: columns of equal length, one list of records under a key, or one record."""
    lists = {k: v for k, v in data.items() if isinstance(v, list) and v}
    record_lists = [k for k, v in lists.items() if isinstance(v[0], dict)]
    if len(lists) == len(data) and not record_lists and len({len(v) for v in lists.values()}) == 1:
        return [dict(zip(data, row, strict=True)) for row in zip(*data.values(), strict=True)]
    if len(record_lists) == 1:
        return data[record_lists[0]]
    if len(record_lists) > 1:
        raise TextSourceError(
            f"Text source '{source.spec}': the JSON object holds several lists of records "
            f"({', '.join(record_lists)}); keep one of them, or convert the file to .jsonl."
        )
    return [data]


def _docs_from_records(records: Iterator, source: TextSource, max_chars: int) -> list[str]:
    """Records are dicts (pick the text field from the first one) or plain strings (each one a document)."""
    first = next(records, None)
    if first is None:
        return []
    records = chain([first], records)
    if isinstance(first, str):
        if source.text_field is not None:
            raise TextSourceError(
                f"Text source '{source.spec}': records are plain strings; drop '#{source.text_field}'."
            )
        return _cap(records, max_chars)
    if not isinstance(first, dict):
        raise TextSourceError(
            f"Text source '{source.spec}': records must be JSON objects or strings, got {type(first).__name__}."
        )
    field = _choose_field(source, list(first), [k for k, v in first.items() if isinstance(v, str)])
    return _cap((r.get(field) for r in records if isinstance(r, dict)), max_chars)


def _read_table(path: Path, source: TextSource, max_chars: int) -> list[str]:
    import pandas as pd

    if path.suffix.lower() == ".parquet":
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, sep="\t" if ".tsv" in path.name.lower() else ",")
    columns = [str(c) for c in df.columns]
    df.columns = columns
    strings = [c for c in columns if pd.api.types.is_string_dtype(df[c])]
    field = _choose_field(source, columns, strings)
    return _cap(df[field].tolist(), max_chars)


def _choose_field(source: TextSource, columns: list[str], string_columns: list[str]) -> str:
    """The text field: the one asked for, else "text", else the only string field; otherwise explain."""
    if source.text_field is not None:
        if source.text_field in columns:
            return source.text_field
        raise TextSourceError(
            f"Text source '{source.spec}' has no field '{source.text_field}'. Available fields: "
            f"{', '.join(columns) or 'none'}. Pick one with '#<field>', e.g. "
            f"'{dataclasses.replace(source, text_field=(string_columns or columns or ['text'])[0]).spec}'."
        )
    if "text" in columns:
        return "text"
    if len(string_columns) == 1:
        return string_columns[0]
    found = f"{len(string_columns)} string fields" if string_columns else "no string field"
    example = dataclasses.replace(source, text_field=(string_columns or columns or ["text"])[0]).spec
    raise TextSourceError(
        f"Text source '{source.spec}' has no 'text' field and {found}; available fields: "
        f"{', '.join(columns) or 'none'}. Pick the text field with '#<field>', e.g. '{example}'."
    )


_FILE_READERS = {
    "txt": _read_txt,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_table,
    "tsv": _read_table,
    "parquet": _read_table,
}


# ---------------------------------------------------------------------------------------------
# Tokens


def _token_ids(text: str, tokenizer) -> torch.Tensor:
    """(T,) token ids, no special tokens; ``verbose=False`` silences the 'longer than max length' warning."""
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)


def _label(source: TextSource | str | None) -> str:
    return (
        f"Text source '{source.spec if isinstance(source, TextSource) else source}'" if source else "The text"
    )


def _joined(docs: list[str], source) -> str:
    if isinstance(docs, str):
        docs = [docs]
    text = "\n\n".join(d for d in docs if d)
    if not text.strip():
        raise TextSourceError(
            f"{_label(source)} is empty: there are no documents to tokenize. Pick a source with text."
        )
    return text


def sample_sequences(
    docs: list[str],
    tokenizer,
    n: int,
    seq_len: int,
    seed: int = 0,
    *,
    max_chars: int = 2_000_000,
    source: TextSource | str | None = None,
) -> torch.LongTensor:
    """(n, seq_len) token windows at seeded random offsets of ``"\\n\\n".join(docs)`` (GPTQ/CMoE calibration).

    Only the first ``max_chars`` characters are tokenized (about 1.5 s per 2 MB), so a call stays fast on a
    huge corpus. Windows may overlap. Same docs, tokenizer and seed give the same tensor. ``source`` only
    names the text in error messages.
    """
    if n < 1 or seq_len < 2:
        raise TextSourceError(
            f"sample_sequences needs n >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}."
        )
    ids = _token_ids(_joined(docs, source)[:max_chars], tokenizer)  # (T,)
    if len(ids) < seq_len:
        raise TextSourceError(
            f"{_label(source)} has {len(ids)} tokens, but one sequence of seq_len={seq_len} needs {seq_len}. "
            "Use more text, or lower seq_len."
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=g)  # (n,)
    return ids[starts[:, None] + torch.arange(seq_len)]  # (n, seq_len)


def training_windows(
    docs: list[str],
    tokenizer,
    n: int,
    seq_len: int,
    seed: int = 0,
    *,
    max_chars: int = 16_000_000,
    source: TextSource | str | None = None,
) -> torch.LongTensor:
    """(n, seq_len) non-overlapping windows of ``"\\n\\n".join(docs)`` in a seeded random order: training data.

    :func:`sample_sequences` draws windows at random offsets of the text's first 2 MB, so a long run sees many
    tokens twice and never the rest of the text (337,920 tokens drawn from the Wikipedia calibration text's
    456k cover about half of them). Here every token of the first ``max_chars`` characters is in at most one
    window per pass; only when ``n`` is more than the text's windows do they repeat, each pass in a new order.
    """
    if n < 1 or seq_len < 2:
        raise TextSourceError(
            f"training_windows needs n >= 1 and seq_len >= 2, got n={n}, seq_len={seq_len}."
        )
    text = _joined(docs, source)[:max_chars]
    windows = eval_windows([text], tokenizer, seq_len, source=source)  # (W, seq_len)
    g = torch.Generator().manual_seed(seed)
    passes = -(-n // len(windows))
    order = torch.cat([torch.randperm(len(windows), generator=g) for _ in range(passes)])[:n]  # (n,)
    return windows[order]  # (n, seq_len)


def eval_windows(
    docs: list[str],
    tokenizer,
    seq_len: int,
    max_windows: int | None = None,
    *,
    source: TextSource | str | None = None,
) -> torch.LongTensor:
    """(W, seq_len) consecutive non-overlapping windows of ``"\\n\\n".join(docs)``, tail dropped.

    The standard WikiText-2 perplexity recipe. With ``max_windows`` only a growing prefix of the text is
    tokenized until it yields enough windows, so a capped evaluation of a large corpus stays fast.
    """
    if seq_len < 2 or (max_windows is not None and max_windows < 1):
        raise TextSourceError(
            f"eval_windows needs seq_len >= 2 and max_windows >= 1, got {seq_len}, {max_windows}."
        )
    text = _joined(docs, source)
    margin = 64  # tokens past the last window, so that cutting the text mid-word cannot change a window
    n_chars = len(text) if max_windows is None else min(len(text), 6 * (seq_len * max_windows + margin))
    while True:
        ids = _token_ids(text[:n_chars], tokenizer)  # (T,)
        n_win = len(ids) // seq_len if max_windows is None else min(len(ids) // seq_len, max_windows)
        if n_chars >= len(text) or (n_win == max_windows and len(ids) >= n_win * seq_len + margin):
            break
        n_chars = min(len(text), 2 * n_chars)
    if n_win == 0:
        raise TextSourceError(
            f"{_label(source)} has {len(ids)} tokens, fewer than one window of seq_len={seq_len}. "
            "Use more text, or lower seq_len."
        )
    return ids[: n_win * seq_len].view(n_win, seq_len)  # (W, seq_len)


def text_preview(docs: list[str], tokenizer, n_chars: int = 600) -> dict:
    """Counts and the first ``n_chars`` of the joined text; tokens are extrapolated beyond 200k characters."""
    text = "\n\n".join(d for d in docs if d)
    head = text[:PREVIEW_TOKENIZE_CHARS]
    n_head = len(_token_ids(head, tokenizer)) if head else 0
    estimated = len(text) > len(head)
    return {
        "n_docs": len(docs),
        "n_chars": len(text),
        "n_tokens": round(n_head * len(text) / len(head)) if estimated else n_head,
        "tokens_estimated": estimated,
        "preview": text[:n_chars],
    }
