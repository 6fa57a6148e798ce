"""Ovis2's image placeholder layout on top of the Ovis visual tokenizer (adapters.ovis_vte).

transformers' Ovis2Processor writes one image (one tile, grid 1x1) as
  <IMG_START> <IMG_ATOM> * T <IMG_GRID> <IMG_END>
and Ovis2Model puts the T visual embeddings on the IMG_ATOM (= image_token_id) positions and
the VTE rows of the indicator ids V-5..V-1 on the five indicator tokens (START, GRID, COL,
ROW, END = visual_indicator_token_ids[0..4]). This adapter returns that whole span,
[START, T visual rows, GRID, END] = T + 3 rows per image, so OmniModel's placeholder scatter
reproduces it when the span's positions are marked as image (`image_modality` does that from
transformers-style input_ids). Multi-tile grids (thumbnail + crops, COL / ROW separators) need
per-image tile counts and are not expressed here; `placeholder_ids` writes any grid's ids.
Params are those of OvisVisualTokenizer (head_linear, head_norm, vte).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.adapters.mlp_projector import ACT
from omni_jax.adapters.ovis_vte import OvisVisualTokenizer, OvisVTEConfig
from omni_jax.layers.common import constrain

INDICATORS = ("start", "grid", "col", "row", "end")  # order of visual_indicator_token_ids
START, GRID, COL, ROW, END = range(5)


@dataclasses.dataclass(frozen=True)
class Ovis2VTEConfig(OvisVTEConfig):
    """OvisVTEConfig with Ovis2's five indicators and the LLM token ids of the layout."""

    num_visual_indicator_tokens: int = 5
    image_token_id: int = 151665  # <IMG_ATOM>
    indicator_token_ids: tuple[int, ...] = (151666, 151667, 151668, 151669, 151670)

    @classmethod
    def _coerce(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.get("indicator_token_ids") is not None:
            d["indicator_token_ids"] = tuple(int(i) for i in d["indicator_token_ids"])
        return d

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_visual_indicator_tokens != len(INDICATORS):
            raise ValueError(f"Ovis2VTEConfig: num_visual_indicator_tokens must be "
                             f"{len(INDICATORS)} ({', '.join(INDICATORS)}), got "
                             f"{self.num_visual_indicator_tokens}")
        ids = (self.image_token_id, *self.indicator_token_ids)
        if len(self.indicator_token_ids) != len(INDICATORS) or len(set(ids)) != len(ids) \
                or min(ids) < 0:
            raise ValueError(f"Ovis2VTEConfig: indicator_token_ids must be {len(INDICATORS)} "
                             f"distinct non-negative ids, different from image_token_id="
                             f"{self.image_token_id}; got {self.indicator_token_ids}")


def placeholder_ids(num_atoms: int, grid: Sequence[int], image_token_id: int,
                    indicator_token_ids: Sequence[int]) -> list[int]:
    """Token ids of one image as Ovis2Processor writes it: START, T atoms (the whole image),
    GRID, then for a rows x cols > 1 grid each crop's T atoms with COL between columns and ROW
    between rows, then END."""
    rows, cols = (int(g) for g in grid)
    if num_atoms <= 0 or rows <= 0 or cols <= 0 or len(indicator_token_ids) != len(INDICATORS):
        raise ValueError(f"placeholder_ids: need num_atoms > 0, a positive (rows, cols) grid and "
                         f"{len(INDICATORS)} indicator ids; got {num_atoms}, {tuple(grid)}, "
                         f"{tuple(indicator_token_ids)}")
    ind, atoms = list(indicator_token_ids), [image_token_id] * num_atoms
    out = [ind[START], *atoms, ind[GRID]]
    if rows * cols > 1:
        for r in range(rows):
            for c in range(cols):
                out += atoms + ([ind[COL]] if c < cols - 1 else [])
            out += [ind[ROW]] if r < rows - 1 else []
    return out + [ind[END]]


def image_modality(input_ids: np.ndarray, config: Ovis2VTEConfig) -> np.ndarray:
    """[batch, seq] ids -> [batch, seq] int32: 1 (image) on the atom and indicator tokens of
    the Ovis2 layout, 0 elsewhere; the `modality` array OmniModel scatters this adapter into."""
    ids = np.asarray(input_ids)
    marked = np.isin(ids, (config.image_token_id, *config.indicator_token_ids))
    return marked.astype(np.int32)


class Ovis2VisualTokenizer(OvisVisualTokenizer):
    """Patch features [batch, gh*gw, C] -> [batch, 1 + T + 2, D]: START, T VTE rows, GRID, END."""

    config: Ovis2VTEConfig

    def num_tokens(self, grid_h: int, grid_w: int) -> int:
        return super().num_tokens(grid_h, grid_w) + 3

    def __call__(self, x: jax.Array, grid_hw: Sequence[int],
                 tau: float | jax.Array | None = None) -> jax.Array:
        emb = self.embed(self.probabilities(x, grid_hw, tau))  # [batch, T, D]
        ind = self.indicator_embeddings().astype(emb.dtype)  # [5, D]
        pick = lambda i: jnp.broadcast_to(ind[i], (emb.shape[0], 1, emb.shape[-1]))  # noqa: E731
        out = jnp.concatenate([pick(START), emb, pick(GRID), pick(END)], axis=1)
        return constrain(out, ACT)  # [batch, T + 3, D]
