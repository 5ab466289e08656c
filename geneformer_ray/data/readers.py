"""Read raw-count files (.h5ad, .loom) a range of cells at a time, straight from HDF5.

    from geneformer_ray.data.readers import open_counts
    with open_counts("pbmc3k.h5ad") as f:
        counts = f.read_counts(0, 1000)          # scipy CSR, cells x genes

Memory is bounded by the range asked for, not the file: CSR ``.h5ad`` matrices are sliced through
``indptr``, dense ones and ``.loom`` (genes x cells) in column blocks. Only the obs columns asked
for are read, and only for that range.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

SUPPORTED_SUFFIXES = (".h5ad", ".loom")
_DENSE_BLOCK_BYTES = 64 << 20  # dense reads are cut into blocks of about this size


def open_counts(path: str | Path, *, layer: str | None = None) -> "CountFile":
    path = Path(path)
    if not path.exists():
        raise ValueError(f"input file {path} does not exist; check the path (globs and folders are expanded by the tokenize command)")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"input file {path} is not .h5ad or .loom; convert it (e.g. with anndata or loompy) first")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"input file {path} cannot be opened as HDF5 ({exc}); is it complete and a real {suffix} file?") from None
    cls = H5adCounts if suffix == ".h5ad" else LoomCounts
    return cls(path, handle, layer)


class CountFile:
    """Common surface of the readers: shape, var identifiers, obs columns, count ranges."""

    path: Path
    n_cells: int
    n_genes: int

    def __init__(self, path: Path, handle: h5py.File, layer: str | None):
        self.path, self.h5, self.layer = path, handle, layer

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.h5.close()

    def obs_columns(self) -> list[str]:
        raise NotImplementedError

    def var_columns(self) -> list[str]:
        raise NotImplementedError

    def read_var(self, column: str | None) -> np.ndarray:
        """Gene identifiers: a var column, or the var index when ``column`` is None."""
        raise NotImplementedError

    def read_obs(self, column: str | None, start: int, stop: int) -> np.ndarray:
        """Values of one obs column for cells [start, stop); the obs names when ``column`` is None."""
        raise NotImplementedError

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        raise NotImplementedError

    def require(self, column: str, available: list[str], where: str) -> None:
        if column not in available:
            raise ValueError(
                f"{self.path}: {where} has no column {column!r}; available: {', '.join(available) or 'none'}"
            )


class H5adCounts(CountFile):
    def __init__(self, path, handle, layer):
        super().__init__(path, handle, layer)
        if "obs" not in handle or "var" not in handle:
            raise ValueError(f"{path}: no obs/var groups; is this an AnnData .h5ad file?")
        if layer in (None, "X"):
            self.matrix_key, self.var_group = "X", "var"
        elif layer == "raw":
            self.matrix_key, self.var_group = "raw/X", "raw/var"
        else:
            self.matrix_key, self.var_group = f"layers/{layer}", "var"
        if self.matrix_key not in handle:
            layers = list(handle["layers"].keys()) if "layers" in handle else []
            raise ValueError(f"{path}: no count matrix at {self.matrix_key!r}; layers here: {layers or 'none'} (X is the default)")
        node = handle[self.matrix_key]
        if isinstance(node, h5py.Dataset):
            self.encoding = "dense"
            if node.ndim != 2:
                raise ValueError(f"{path}: {self.matrix_key} is {node.ndim}-dimensional, expected cells x genes")
            self.n_cells, self.n_genes = node.shape
        else:
            self.encoding = _attr(node, "encoding-type") or _attr(node, "h5sparse_format", "") + "_matrix"
            if self.encoding not in ("csr_matrix", "csc_matrix"):
                raise ValueError(f"{path}: {self.matrix_key} has encoding {self.encoding!r}; expected csr/csc/dense")
            self.n_cells, self.n_genes = (int(x) for x in node.attrs["shape"])
            if self.encoding == "csr_matrix":
                self._indptr = node["indptr"][:].astype(np.int64)

    def obs_columns(self):
        return _dataframe_columns(self.h5["obs"])

    def var_columns(self):
        return _dataframe_columns(self.h5[self.var_group])

    def read_var(self, column):
        group = self.h5[self.var_group]
        if column is not None:
            self.require(column, self.var_columns(), "var")
        key = column if column is not None else _attr(group, "_index", "_index")
        return _read_column(group, key, 0, None)

    def read_obs(self, column, start, stop):
        group = self.h5["obs"]
        if column is not None:
            self.require(column, self.obs_columns(), "obs")
        key = column if column is not None else _attr(group, "_index", "_index")
        return _read_column(group, key, start, stop)

    def read_counts(self, start, stop):
        node = self.h5[self.matrix_key]
        if self.encoding == "csr_matrix":
            lo, hi = self._indptr[start], self._indptr[stop]
            indptr = self._indptr[start : stop + 1] - lo
            return sp.csr_matrix((node["data"][lo:hi], node["indices"][lo:hi], indptr), shape=(stop - start, self.n_genes))
        if self.encoding == "dense":
            return _dense_rows(lambda a, b: node[a:b, :], start, stop, self.n_genes)
        # CSC on disk: a row range touches every column; read column blocks and keep the rows.
        indptr = node["indptr"][:]
        blocks = []
        step = max(1, _DENSE_BLOCK_BYTES // max(1, 12 * (int(indptr[-1]) // max(1, self.n_genes) + 1)))
        for c0 in range(0, self.n_genes, step):
            c1 = min(self.n_genes, c0 + step)
            lo, hi = int(indptr[c0]), int(indptr[c1])
            block = sp.csc_matrix(
                (node["data"][lo:hi], node["indices"][lo:hi], indptr[c0 : c1 + 1] - lo), shape=(self.n_cells, c1 - c0)
            )
            blocks.append(block[start:stop])
        return sp.hstack(blocks, format="csr")


class LoomCounts(CountFile):
    """Loom: ``matrix`` is genes x cells (dense), gene attributes in row_attrs, cell attributes in col_attrs."""

    def __init__(self, path, handle, layer):
        super().__init__(path, handle, layer)
        key = "matrix" if layer in (None, "X", "") else f"layers/{layer}"
        if key not in handle:
            raise ValueError(f"{path}: no {key!r} in this loom file; is it a loom file (loompy) with that layer?")
        self.matrix = handle[key]
        self.n_genes, self.n_cells = self.matrix.shape

    def obs_columns(self):
        attrs = self.h5["col_attrs"] if "col_attrs" in self.h5 else {}
        return [k for k in attrs if attrs[k].ndim == 1 and attrs[k].shape[0] == self.n_cells]  # not embeddings

    def var_columns(self):
        return list(self.h5["row_attrs"].keys()) if "row_attrs" in self.h5 else []

    def read_var(self, column):
        if column is None:
            column = next((c for c in ("ensembl_id", "Accession", "Gene") if c in self.var_columns()), None)
            if column is None:
                raise ValueError(f"{self.path}: loom row_attrs have no 'ensembl_id', 'Accession' or 'Gene'; pass gene_id_column=...")
        self.require(column, self.var_columns(), "row_attrs")
        return _decode(self.h5["row_attrs"][column][:])

    def read_obs(self, column, start, stop):
        if column is None:
            column = next((c for c in ("CellID", "cell_id", "obs_names") if c in self.obs_columns()), None)
            if column is None:
                return np.array([f"{self.path.stem}:{i}" for i in range(start, stop)], dtype=object)
        self.require(column, self.obs_columns(), "col_attrs")
        return _decode(self.h5["col_attrs"][column][start:stop])

    def read_counts(self, start, stop):
        return _dense_rows(lambda a, b: self.matrix[:, a:b].T, start, stop, self.n_genes)


def _dense_rows(read_block, start: int, stop: int, n_genes: int) -> sp.csr_matrix:
    """Read rows [start, stop) of a dense matrix in blocks that fit the memory budget, as CSR."""
    step = max(1, _DENSE_BLOCK_BYTES // (8 * max(1, n_genes)))
    blocks = [sp.csr_matrix(np.asarray(read_block(a, min(stop, a + step)))) for a in range(start, stop, step)]
    if not blocks:
        return sp.csr_matrix((0, n_genes))
    return sp.vstack(blocks, format="csr")


def _attr(node, name: str, default=None):
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def _dataframe_columns(group: h5py.Group) -> list[str]:
    order = group.attrs.get("column-order", [])
    columns = [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]
    index = _attr(group, "_index", "_index")
    extra = [k for k in group.keys() if k not in columns and k != index and k != "__categories"]
    return columns + extra


def _read_column(group: h5py.Group, key: str, start: int, stop: int | None) -> np.ndarray:
    """One AnnData dataframe column (encodings: array, string-array, categorical, nullable-*)."""
    node = group[key]
    sl = slice(start, stop)
    if isinstance(node, h5py.Dataset):
        values = _decode(node[sl])
        legacy = group.get("__categories")  # anndata < 0.8 stored categories beside the codes
        if legacy is not None and key in legacy:
            categories = _decode(legacy[key][:])
            return _categorical(values, categories)
        return values
    encoding = _attr(node, "encoding-type")
    if encoding == "categorical":
        return _categorical(node["codes"][sl], _decode(node["categories"][:]))
    if encoding in ("nullable-integer", "nullable-boolean", "nullable-string-array"):
        values = _decode(node["values"][sl]).astype(object)
        values[node["mask"][sl].astype(bool)] = None
        return values
    raise ValueError(f"{group.name}/{key}: unsupported column encoding {encoding!r}")


def _categorical(codes: np.ndarray, categories: np.ndarray) -> np.ndarray:
    return pd.Categorical.from_codes(codes.astype(np.int64), categories=pd.Index(categories)).to_numpy(dtype=object)


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    return values
