"""What a perturbation does to one cell's rank encoding, and which perturbations each cell gets: pure
functions, no model, no Ray (the model actor in ``perturb.py`` runs what these plan).

    new_ids, source = perturb_encoding(ids, (token,), "delete", cls_id=None, eos_id=None, max_genes=2048)
    edits = cell_edits(genes_of_cell, kind="delete", targets=None, group=False, anchor=None, null_genes=5, rng=rng)

Kinds (Geneformer's ``perturb_type`` and the two it lists as to be announced):
  delete       the gene's token removed
  overexpress  the token moved to the front of the genes (inserted there when the cell lacks it; the
               encoding cut back to the model's input size)
  inhibit      the token moved down the ranking by ``quartiles`` quarters of the cell's genes
  activate     the token moved up by as much (clipped at the first / last rank)
``source[j]`` is the position in the original encoding of the perturbed encoding's position j (-1 for
an inserted token): how each remaining gene's state after the perturbation is paired with its state
before (Geneformer's ``make_comparison_batch``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

KINDS = ("delete", "overexpress", "inhibit", "activate")
EMB_MODES = ("cell", "cls", "cell_and_gene", "cls_and_gene")  # what a shift is measured on
CLS_MODES = ("cls", "cls_and_gene")  # the cell is its <cls> state (V2)
GENE_TABLE_MODES = ("cell_and_gene", "cls_and_gene")  # every other gene's own shift written too
MEASURES = ("geneformer", "cell-shift")  # the shift the statistics test without states
STATS_MODES = ("vs_random", "goal_state_shift", "vs_null", "mixture_model", "aggregate_data", "aggregate_gene_shifts")
MIN_CELLS = 3  # genes perturbed in fewer cells get no test
ORIGINAL = -1  # the gene_token of a cell's unperturbed row
GROUP = -2  # the gene_token of the row perturbing the gene set together (or a null set)
ROLES = ("original", "gene", "null", "group", "anchor", "combo")


@dataclass(frozen=True)
class Edit:
    """One perturbation of one cell: what the row is (``role``), the gene it is recorded under and the
    tokens perturbed together (in the order an over-expression puts them first)."""

    role: str
    gene_token: int
    tokens: tuple[int, ...]


def perturb_encoding(ids: np.ndarray, tokens, kind: str, *, cls_id: int | None, eos_id: int | None, max_genes: int,
                     quartiles: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The perturbed encoding and, per position, its position in ``ids`` (-1: inserted). A V2 cell keeps
    <cls> first and <eos> last."""
    ids = np.asarray(ids, np.int64)
    tokens = np.asarray(tokens, np.int64)
    start = 1 if cls_id is not None and ids.size and ids[0] == cls_id else 0
    end = ids.size - 1 if eos_id is not None and ids.size > start and ids[-1] == eos_id else ids.size
    genes, where = ids[start:end], np.arange(start, end)
    hit = np.isin(genes, tokens)
    if kind == "delete":
        new, source = genes[~hit], where[~hit]
    elif kind == "overexpress":
        found = dict(zip(genes[hit].tolist(), where[hit].tolist()))
        front = np.array([found.get(int(t), -1) for t in tokens], np.int64)
        new = np.concatenate([tokens, genes[~hit]])[:max_genes]
        source = np.concatenate([front, where[~hit]])[:max_genes]
    elif kind in ("inhibit", "activate"):
        order = _moved_order(genes.size, np.flatnonzero(hit), kind, quartiles)
        new, source = genes[order], where[order]
    else:
        raise ValueError(f"perturbation {kind!r}: use one of {', '.join(KINDS)}")
    head, tail = np.arange(start), np.arange(end, ids.size)
    return (np.concatenate([ids[head], new, ids[tail]]),
            np.concatenate([head, source, tail]).astype(np.int64))


def _moved_order(n: int, moved: np.ndarray, kind: str, quartiles: int) -> np.ndarray:
    """The rank order after moving the genes at ranks ``moved`` down (inhibit) or up (activate) by
    ``quartiles`` quarters of the ``n`` ranks, clipped; the other genes keep their order."""
    step = max(1, int(round(quartiles * n / 4)))
    key = np.arange(n, dtype=np.float64)
    target = np.clip(moved + (step if kind == "inhibit" else -step), 0, n - 1)
    # just after the gene now at the target rank (inhibit) or just before it (activate)
    key[moved] = target + (0.5 if kind == "inhibit" else -0.5)
    return np.argsort(key, kind="stable")


def cell_edits(genes: np.ndarray, *, kind: str, targets: np.ndarray | None, group: bool, anchor: int | None,
               null_genes: int, rng: np.random.Generator) -> list[Edit]:
    """The perturbations of one cell whose gene tokens (rank order, no specials) are ``genes``.

    targets None: every gene of the cell alone (over-expression and activation skip the top-ranked
    gene, which cannot move up: Geneformer does the same); else each target alone (genes the cell lacks
    are skipped, except for over-expression, which inserts them), or all of them together with ``group``.
    With an anchor (in the cell; a cell without it gets nothing): the anchor alone, each other gene alone
    and each together with the anchor (Geneformer's ``combos=1``). Null: ``null_genes`` random genes of
    the cell that are not targets, perturbed alone (or random sets of the group's size)."""
    present = set(genes.tolist())
    if anchor is not None and anchor not in present:
        return []
    if targets is None:
        candidates = genes[1:] if kind in ("overexpress", "activate") else genes
        if anchor is not None:
            candidates = candidates[candidates != anchor]
        pool = candidates
    else:
        candidates = targets if kind == "overexpress" else targets[np.isin(targets, genes)]
        pool = genes[~np.isin(genes, targets)]
        if anchor is not None:
            candidates, pool = candidates[candidates != anchor], pool[pool != anchor]
    if kind == "delete" and genes.size - (candidates.size if group else 1) < 1:
        return []  # nothing would be left to embed
    rank = {g: i for i, g in enumerate(genes.tolist())}
    edits: list[Edit] = []
    if group:
        if candidates.size:
            edits.append(Edit("group", GROUP, tuple(int(t) for t in candidates)))
    elif anchor is not None:
        edits.append(Edit("anchor", anchor, (anchor,)))
        for t in candidates.tolist():
            pair = tuple(sorted((anchor, t), key=lambda g: rank.get(g, -1)))
            edits += [Edit("gene", t, (t,)), Edit("combo", t, pair)]
    else:
        edits += [Edit("gene", t, (t,)) for t in candidates.tolist()]
    size = candidates.size if group else 1
    if null_genes and size and pool.size >= size:
        if size == 1:
            edits += [Edit("null", int(g), (int(g),)) for g in rng.choice(pool, min(null_genes, pool.size), replace=False)]
        else:
            edits += [Edit("null", GROUP, tuple(int(g) for g in rng.choice(pool, size, replace=False)))
                      for _ in range(null_genes)]
    return edits


def comparison_mask(new_ids: np.ndarray, source: np.ndarray, tokens, special: np.ndarray) -> np.ndarray:
    """Positions of the perturbed encoding compared with the original: genes the cell had, other than
    the perturbed ones (Geneformer removes those from both before taking cosines)."""
    return (source >= 0) & ~np.isin(new_ids, np.asarray(tokens, np.int64)) & ~np.isin(new_ids, special)


def resolve_genes(genes: list[str], vocab, *, flag: str = "--genes") -> list[str]:
    """Ensembl IDs (in the vocabulary) for the given IDs or symbols; any other is an error naming the
    nearest symbols the vocabulary knows."""
    found, missing = [], []
    for gene in genes:
        ensembl = vocab.to_ensembl(gene)
        (found if ensembl in vocab.token_ids else missing).append(ensembl if ensembl in vocab.token_ids else gene)
    if missing:
        names = sorted({n.upper() for n, g in vocab.gene_names.items() if g in vocab.token_ids})
        hints = []
        for gene in missing:
            ensembl = vocab.to_ensembl(gene)
            if ensembl is not None:  # a known gene the model has no token for (Geneformer left it out)
                hints.append(f"{gene!r}{'' if ensembl == gene else f' ({ensembl})'} has no token")
                continue
            near = difflib.get_close_matches(str(gene).upper(), names, n=3, cutoff=0.6)
            hints.append(f"{gene!r} is unknown (nearest: {', '.join(near)})" if near else f"{gene!r} is unknown")
        raise ValueError(f"{flag}: {'; '.join(hints)} in the {vocab.name} vocabulary; pass Ensembl IDs or symbols "
                         "it has tokens for (`geneformer-ray vocab` lists them; the vocabularies are human)")
    return list(dict.fromkeys(found))
