"""ProLearn's one-time PSA initialisation: from the paired subset to a prototype bank.

1. Token relevance: a language-guided U-Net of the same architecture (ProLearn with no bank),
   trained on the paired subset only, reads each report; the cross-attention weights of its three
   guide stages, averaged over pixels, heads and stages, score the report's tokens (word pieces
   summed into words). Words whose share is at least ``relevance_threshold`` x the uniform share
   (1 / number of words) form the shortened, segmentation-relevant sentence.
2. The shortened sentences are encoded (pooled, L2-normalised) and clustered by HDBSCAN
   (``hdbscan`` package) into surrogate labels; HDBSCAN's noise points form one more group so every
   paired sample has a label.
3. Each surrogate group is split by k-means (scikit-learn) into M sub-clusters of the samples'
   image features; the *sample* nearest each centroid (not the centroid) gives the linked pair:
   query prototype = its pooled image feature, response prototype = its report's token features.

Everything is seeded: the same paired subset and settings give the same bank.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from TextGuidedSegLib.text import TextEncoder


def choose_paired(case_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The training cases that keep their report: ``round(fraction * n)`` (at least 1), seeded."""
    if not 0 < fraction <= 1:
        raise ValueError(f"text_fraction must be in (0, 1], got {fraction}")
    ids = sorted(case_ids)
    n = max(1, int(round(fraction * len(ids))))
    chosen = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return sorted(ids[i] for i in chosen)


@torch.no_grad()
def token_relevance(model: torch.nn.Module, encoder: TextEncoder, images: torch.Tensor, texts: Sequence[str],
                    batch_size: int = 32) -> list[list[tuple[str, float]]]:
    """Each report's words with their share of the guide stages' attention (shares sum to 1)."""
    model.eval()
    tokenizer = encoder.tokenizer
    special = set(tokenizer.all_special_ids)
    device = next(model.parameters()).device
    out: list[list[tuple[str, float]]] = []
    for start in range(0, len(texts), batch_size):
        batch_texts = list(texts[start:start + batch_size])
        feats = encoder.encode(batch_texts).to(device)
        result = model(images[start:start + batch_size].float().to(device), feats, need_weights=True)
        attention = torch.stack([w.float().mean(1) for w in result["attention"]]).mean(0)   # [B, L]
        ids = tokenizer(batch_texts, padding="max_length", truncation=True, max_length=encoder.config.max_length,
                        return_tensors="pt")["input_ids"]
        for row, token_ids in zip(attention.cpu(), ids):
            keep = [j for j, t in enumerate(token_ids.tolist()) if t not in special]
            shares = row[keep] / row[keep].sum().clamp_min(1e-12) if keep else row[:0]
            pieces = tokenizer.convert_ids_to_tokens([token_ids[j] for j in keep])
            out.append(merge_word_pieces(pieces, shares.tolist()))
    return out


def merge_word_pieces(pieces: Sequence[str], shares: Sequence[float]) -> list[tuple[str, float]]:
    """WordPiece tokens -> whole words, each with the sum of its pieces' shares ("un", "##ila" -> "unila")."""
    words: list[list] = []
    for piece, share in zip(pieces, shares):
        if piece.startswith("##") and words:
            words[-1][0] += piece[2:]
            words[-1][1] += share
        else:
            words.append([piece, share])
    return [(w, s) for w, s in words]


def shorten(words: Sequence[tuple[str, float]], threshold: float) -> str:
    """Keep the words whose share is >= ``threshold`` / (number of words), in order; the top one at least."""
    if not words:
        return ""
    floor = threshold / len(words)
    kept = [w for w, s in words if s >= floor] or [max(words, key=lambda ws: ws[1])[0]]
    return " ".join(kept)


def surrogate_labels(vectors: np.ndarray, min_cluster_size: int, min_samples: int | None = None) -> np.ndarray:
    """HDBSCAN labels 0..G-1 of L2-normalised ``vectors``; noise (-1) becomes one extra group."""
    import hdbscan

    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    if len(x) < 2:
        return np.zeros(len(x), dtype=np.int64)
    clusterer = hdbscan.HDBSCAN(min_cluster_size=max(2, min(min_cluster_size, len(x))), min_samples=min_samples,
                                metric="euclidean", allow_single_cluster=True)
    labels = clusterer.fit_predict(x.astype(np.float64))
    if (labels < 0).any():
        labels = np.where(labels < 0, labels.max() + 1, labels)
    # renumber 0..G-1 in order of first appearance (stable across runs)
    order = {lab: i for i, lab in enumerate(dict.fromkeys(labels.tolist()))}
    return np.array([order[v] for v in labels.tolist()], dtype=np.int64)


def representatives(features: np.ndarray, labels: np.ndarray, per_cluster: int, seed: int) -> list[int]:
    """Per surrogate group, k-means (M = ``per_cluster``) on the image features; the sample nearest
    each centroid. Returns sample indices grouped by label (no sample twice)."""
    from sklearn.cluster import KMeans

    x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    chosen: list[int] = []
    for group in range(int(labels.max()) + 1 if len(labels) else 0):
        members = np.flatnonzero(labels == group)
        distinct = len(np.unique(x[members].round(6), axis=0))
        m = max(1, min(per_cluster, distinct))
        km = KMeans(n_clusters=m, n_init=10, random_state=seed).fit(x[members])
        for centre in km.cluster_centers_:
            order = np.argsort(((x[members] - centre) ** 2).sum(1), kind="stable")
            pick = next(int(members[j]) for j in order if int(members[j]) not in chosen)
            chosen.append(pick)
    return chosen


@dataclass
class PrototypeBank:
    """The initial bank and how it was made (recorded in the model card and ``psa.json``)."""

    query: torch.Tensor                 # [N, C]
    response: torch.Tensor              # [N, L, D]
    response_mask: torch.Tensor         # [N, L]
    cluster: torch.Tensor               # [N] surrogate label of each prototype
    info: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"query_prototypes": self.query, "response_prototypes": self.response,
                "response_mask": self.response_mask, "prototype_cluster": self.cluster}


@torch.no_grad()
def build_bank(relevance_model: torch.nn.Module, encoder: TextEncoder, images: torch.Tensor, case_ids: Sequence[str],
               texts: Sequence[str], *, per_cluster: int, relevance_threshold: float = 1.0,
               min_cluster_size: int = 5, min_samples: int | None = None, seed: int = 0,
               sentence_encoder: TextEncoder | None = None, batch_size: int = 32) -> PrototypeBank:
    """Steps 1-3 above over the paired cases (``images`` preprocessed as the model reads them)."""
    scored = token_relevance(relevance_model, encoder, images, texts, batch_size)
    short = [shorten(t, relevance_threshold) for t in scored]
    sentence_encoder = sentence_encoder or encoder
    distinct = list(dict.fromkeys(short))
    pooled = torch.cat([sentence_encoder.encode(distinct[i:i + 256]).pooled.float().cpu()
                        for i in range(0, len(distinct), 256)])
    row = {s: i for i, s in enumerate(distinct)}
    vectors = pooled[[row[s] for s in short]].numpy()
    labels = surrogate_labels(vectors, min_cluster_size, min_samples)

    device = next(relevance_model.parameters()).device
    features = torch.cat([relevance_model.image_query(images[i:i + batch_size].float().to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])
    picks = representatives(features.numpy(), labels, per_cluster, seed)
    report = encoder.encode([texts[i] for i in picks])
    groups = int(labels.max()) + 1 if len(labels) else 0
    info = {
        "paired_cases": len(case_ids), "relevance_threshold": relevance_threshold,
        "min_cluster_size": min_cluster_size, "min_samples": min_samples, "prototypes_per_cluster": per_cluster,
        "seed": seed, "surrogate_groups": groups,
        "group_sizes": [int((labels == g).sum()) for g in range(groups)],
        "group_sentences": [[s for s, _ in Counter(short[i] for i in np.flatnonzero(labels == g)).most_common(3)]
                            for g in range(groups)],
        "prototypes": [{"case_id": case_ids[i], "group": int(labels[i]), "shortened": short[i], "report": texts[i]}
                       for i in picks],
        "assignments": {cid: {"group": int(lab), "shortened": s} for cid, lab, s in zip(case_ids, labels, short)},
    }
    return PrototypeBank(query=features[picks].contiguous(), response=report.tokens.float().cpu().contiguous(),
                         response_mask=report.mask.float().cpu().contiguous(),
                         cluster=torch.as_tensor(labels[picks], dtype=torch.long), info=info)
