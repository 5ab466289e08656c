"""Geneformer vocabularies: presets, safe loading of Geneformer's dictionaries, gene ID mapping.

    geneformer-ray vocab gc104M                       # describe a preset
    geneformer-ray vocab DIR_WITH_PKL --out my_vocab  # convert Geneformer pickles to the safe format

A vocabulary is four dictionaries (tokens, non-zero medians, symbol -> Ensembl ID, any ID ->
current Ensembl ID) plus the model input size and special tokens. It is identified by the sha256 of
its token table, which every corpus manifest and saved model carries.

On disk (the format shipped for the presets under ``geneformer_ray/resources/vocab/``)::

    vocab.json            name, model_input_size, special tokens, sha256
    tokens.tsv.gz         token <TAB> id            (pad, mask, [cls, eos], then genes)
    medians.tsv.gz        ensembl_id <TAB> median   (float64 written with repr, round-trips exactly)
    gene_names.tsv.gz     symbol <TAB> ensembl_id
    id_mapping.tsv.gz     ID or symbol (upper case) <TAB> ensembl_id
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

PRESETS = {"gc30M": "gc30M", "gc104M": "gc104M", "V1": "gc30M", "V2": "gc104M"}
PRESET_DIR = Path(__file__).parent.parent / "resources" / "vocab"
FORMAT_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Token table and the dictionaries rank value encoding needs."""

    name: str
    token_ids: dict[str, int]
    gene_medians: dict[str, float]
    gene_names: dict[str, str] = field(default_factory=dict)
    id_mapping: dict[str, str] = field(default_factory=dict)
    model_input_size: int | None = None

    def __post_init__(self):
        ids = sorted(self.token_ids.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"vocabulary {self.name!r}: token ids must be 0..{len(ids) - 1} without gaps")
        for special, expected in (("<pad>", 0), ("<mask>", 1)):
            if self.token_ids.get(special) != expected:
                raise ValueError(f"vocabulary {self.name!r}: {special} must have id {expected}")
        missing = [g for g in self.gene_tokens if g not in self.gene_medians]
        if missing:
            raise ValueError(
                f"vocabulary {self.name!r}: {len(missing):,} genes of the token dictionary have no median "
                f"in the gene median dictionary (e.g. {missing[:3]}); pass the matching median dictionary"
            )
        if self.model_input_size is None:
            object.__setattr__(self, "model_input_size", 4096 if self.adds_cls_eos else 2048)

    # -- identity -----------------------------------------------------------------------------
    @cached_property
    def sha256(self) -> str:
        """Content hash of the token table: equal hashes mean interchangeable token ids."""
        by_id = sorted(self.token_ids.items(), key=lambda kv: kv[1])
        text = "".join(f"{token}\t{idx}\n" for token, idx in by_id)
        return hashlib.sha256(text.encode()).hexdigest()

    @cached_property
    def medians_sha256(self) -> str:
        text = "".join(f"{g}\t{self.gene_medians[g]!r}\n" for g in sorted(self.gene_medians))
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "medians_sha256": self.medians_sha256,
            "num_tokens": len(self.token_ids),
            "num_genes": len(self.gene_tokens),
            "model_input_size": self.model_input_size,
            "special_tokens": self.special_token_ids,
        }

    # -- tokens -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @cached_property
    def special_token_ids(self) -> dict[str, int]:
        return {t: self.token_ids[t] for t in SPECIAL_TOKENS if t in self.token_ids}

    @cached_property
    def gene_tokens(self) -> list[str]:
        return [t for t in self.token_ids if t not in SPECIAL_TOKENS]

    @property
    def adds_cls_eos(self) -> bool:
        """V2 vocabularies wrap each cell in <cls> ... <eos>."""
        return "<cls>" in self.token_ids and "<eos>" in self.token_ids

    @property
    def pad_id(self) -> int:
        return self.token_ids["<pad>"]

    @property
    def mask_id(self) -> int:
        return self.token_ids["<mask>"]

    @property
    def cls_id(self) -> int | None:
        return self.token_ids.get("<cls>")

    @property
    def eos_id(self) -> int | None:
        return self.token_ids.get("<eos>")

    @property
    def max_genes_per_cell(self) -> int:
        return self.model_input_size - (2 if self.adds_cls_eos else 0)

    # -- gene ID mapping ----------------------------------------------------------------------
    @cached_property
    def gene_symbols(self) -> dict[str, str]:
        """Ensembl ID -> a symbol (the first in sorted order, where several name one gene): for people to read."""
        symbols: dict[str, str] = {}
        for symbol, gene in sorted(self.gene_names.items()):
            symbols.setdefault(gene, symbol)
        return symbols

    @cached_property
    def _upper_names(self) -> dict[str, str]:
        upper: dict[str, str] = {}
        for symbol, gene in self.gene_names.items():
            upper.setdefault(symbol.upper(), gene)
        return upper

    def to_ensembl(self, identifier: str) -> str | None:
        """Current Ensembl ID for a gene symbol, an old or versioned Ensembl ID, or None.

        Order: the ID mapping dictionary (Geneformer's own route: upper-cased key), the identifier
        itself if it is a vocabulary gene, the version-stripped ID, then the symbol table (exact, then
        case-insensitive). A returned ID may still be outside the vocabulary.
        """
        if not isinstance(identifier, str) or not identifier:
            return None
        key = identifier.strip()
        upper = key.upper()
        stripped = _ENSEMBL_VERSION.sub(r"\1", upper)
        for candidate in (upper, stripped):
            if candidate in self.id_mapping:
                return self.id_mapping[candidate]
        for candidate in (key, upper, stripped):
            if candidate in self.token_ids and candidate not in SPECIAL_TOKENS:
                return candidate
        if stripped.startswith("ENS"):
            return stripped
        return self.gene_names.get(key) or self._upper_names.get(upper)

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        by_id = sorted(self.token_ids.items(), key=lambda kv: kv[1])
        _write_tsv(directory / "tokens.tsv.gz", ((t, str(i)) for t, i in by_id))
        _write_tsv(directory / "medians.tsv.gz", ((g, repr(float(m))) for g, m in sorted(self.gene_medians.items())))
        _write_tsv(directory / "gene_names.tsv.gz", sorted(self.gene_names.items()))
        _write_tsv(directory / "id_mapping.tsv.gz", sorted(self.id_mapping.items()))
        meta = {"format_version": FORMAT_VERSION, **self.describe()}
        (directory / "vocab.json").write_text(json.dumps(meta, indent=2) + "\n")
        return directory


def load_vocab(spec: str | Path | Vocabulary, *, model_input_size: int | None = None) -> Vocabulary:
    """A preset name (gc30M / gc104M, alias V1 / V2), a saved vocabulary folder, or a folder of
    Geneformer's ``*.pkl`` dictionaries (read with a restricted unpickler)."""
    if isinstance(spec, Vocabulary):
        return spec
    if str(spec) in PRESETS:
        return _load_preset(PRESETS[str(spec)], model_input_size)
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"vocabulary {str(spec)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path; "
            "pass a preset name or a folder with Geneformer's token_dictionary*.pkl and gene_median_dictionary*.pkl"
        )
    if (path / "vocab.json").exists():
        return _load_saved(path, model_input_size)
    if path.is_dir():
        return load_geneformer_dictionaries(path, model_input_size=model_input_size)
    raise ValueError(f"vocabulary path {path} is a file; pass the folder that holds the dictionaries")


@lru_cache(maxsize=8)
def _load_preset(name: str, model_input_size: int | None) -> Vocabulary:
    return _load_saved(PRESET_DIR / name, model_input_size)  # immutable, so one copy per process


def _load_saved(directory: Path, model_input_size: int | None) -> Vocabulary:
    meta = json.loads((directory / "vocab.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / 'vocab.json'}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    vocab = Vocabulary(
        name=meta["name"],
        token_ids={t: int(i) for t, i in _read_tsv(directory / "tokens.tsv.gz")},
        gene_medians={g: float(m) for g, m in _read_tsv(directory / "medians.tsv.gz")},
        gene_names=dict(_read_tsv(directory / "gene_names.tsv.gz")),
        id_mapping=dict(_read_tsv(directory / "id_mapping.tsv.gz")),
        model_input_size=model_input_size or meta["model_input_size"],
    )
    if vocab.sha256 != meta["sha256"]:
        raise ValueError(f"{directory}: token table hash {vocab.sha256[:12]} does not match vocab.json ({meta['sha256'][:12]}); the folder is corrupt")
    return vocab


def load_geneformer_dictionaries(
    directory: str | Path, *, name: str | None = None, model_input_size: int | None = None
) -> Vocabulary:
    """Build a vocabulary from Geneformer's pickled dictionaries in ``directory``.

    Needs ``token_dictionary*.pkl`` and ``gene_median_dictionary*.pkl``; ``gene_name_id_dict*.pkl``
    and ``ensembl_mapping_dict*.pkl`` are optional. Like Geneformer, the mapping keeps only entries
    whose target is a vocabulary gene.
    """
    directory = Path(directory)

    def find(prefix: str, required: bool) -> dict | None:
        hits = sorted(directory.glob(f"{prefix}*.pkl"))
        if len(hits) > 1:
            raise ValueError(f"{directory}: several {prefix}*.pkl files ({[h.name for h in hits]}); keep one per folder")
        if not hits:
            if required:
                raise ValueError(f"{directory}: no {prefix}*.pkl; a Geneformer vocabulary folder needs it")
            return None
        return safe_load_pickle(hits[0])

    tokens = find("token_dictionary", True)
    medians = find("gene_median_dictionary", True)
    names = find("gene_name_id_dict", False) or {}
    mapping = find("ensembl_mapping_dict", False) or {}
    token_ids = {str(k): int(v) for k, v in tokens.items()}
    mapping = {str(k).upper(): str(v) for k, v in mapping.items() if str(v) in token_ids}
    if name is None:
        stem = sorted(directory.glob("token_dictionary*.pkl"))[0].stem
        name = stem.removeprefix("token_dictionary").strip("_") or directory.name
    return Vocabulary(
        name=name,
        token_ids=token_ids,
        gene_medians={str(k): float(v) for k, v in medians.items()},
        gene_names={str(k): str(v) for k, v in names.items()},
        id_mapping=mapping,
        model_input_size=model_input_size,
    )


# -- restricted unpickling ------------------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # protocol-2 pickles spell numpy scalar bytes through it
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def safe_load_pickle(path: str | Path) -> dict:
    """Load a Geneformer dictionary pickle: a dict of str -> str / int / float / numpy scalar.

    Pickles can run code when loaded; this loader resolves only numpy scalar constructors and
    refuses everything else, then checks the content type.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = _RestrictedUnpickler(fh).load()
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused to unpickle ({exc}); only dictionaries of strings and numbers are accepted. "
            "If you trust the file, convert it to plain str/int/float first"
        ) from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, expected a dict of gene -> value")
    scalar = (str, int, float, np.integer, np.floating)
    for key, value in obj.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, scalar):
            raise ValueError(
                f"{path}: entry {key!r} -> {type(value).__name__} is not str -> str/int/float; "
                "this is not a Geneformer dictionary"
            )
    return obj


# -- TSV helpers ----------------------------------------------------------------------------------
def _write_tsv(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        with io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write("\t".join(row) + "\n")
    tmp.replace(path)


def _read_tsv(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [tuple(line.rstrip("\n").split("\t")) for line in fh if line.strip()]
