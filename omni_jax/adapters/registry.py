"""Visual adapters by name: `build_adapter("ola_lgap", {"out_dim": 3584})`.

Every adapter maps patch features [batch, gh*gw, C] with a static grid (gh, gw) to
[batch, adapter.num_tokens(gh, gw), width]; the template expands placeholders to that count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from omni_jax.adapters.highway import HighwayConfig, VisualHighway
from omni_jax.adapters.lgap import OlaProjector, OlaProjectorConfig
from omni_jax.adapters.mlp_projector import MLPProjector, MLPProjectorConfig
from omni_jax.adapters.ovis2_vte import Ovis2VisualTokenizer, Ovis2VTEConfig
from omni_jax.adapters.ovis_vte import OvisVisualTokenizer, OvisVTEConfig

# name -> (config class, module class, fixed settings the name implies)
ADAPTERS: dict[str, tuple[type, type[nn.Module], dict[str, Any]]] = {
    "mlp": (MLPProjectorConfig, MLPProjector, {}),  # LLaVA / OpenOmni Linear-GELU-Linear
    "mlp_2x2": (MLPProjectorConfig, MLPProjector, {"reduce_factor": 2}),  # Capybara
    "ola_lgap": (OlaProjectorConfig, OlaProjector, {}),  # Ola's ola_mlp with LGAP + layout
    "ovis_vte": (OvisVTEConfig, OvisVisualTokenizer, {}),  # Ovis head + VTE
    "ovis2_vte": (Ovis2VTEConfig, Ovis2VisualTokenizer, {}),  # + START/GRID/END rows (Ovis2)
    "highway": (HighwayConfig, VisualHighway, {}),  # X-VILA visual embedding highway
}


def known_adapters() -> tuple[str, ...]:
    return tuple(sorted(ADAPTERS))


def build_adapter(name: str, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Adapter module `name` built from a config dict (unknown keys are an error)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {', '.join(known_adapters())}")
    cfg_cls, module_cls, fixed = ADAPTERS[name]
    cfg = dict(config or {})
    for key, value in fixed.items():
        if cfg.setdefault(key, value) != value:
            raise ValueError(f"adapter {name!r} implies {key}={value!r}, but the config sets "
                             f"{key}={cfg[key]!r}; use another adapter name or drop the key")
    return module_cls(cfg_cls.from_dict(cfg))
