"""jit_unlearn as the backend of other tools' call sites.

- `jit_unlearn.integrations.published`: the published SSD and JiT research code's classes
  (`ParameterPerturber`, `Lipschitz`) with their signatures, computed by jit_unlearn.
- `jit_unlearn.integrations.supreme`: SUPREME's method functions (`jit`, `ssd`, `lfssd`, `assd`,
  `ssd_det`, `lfssd_det`) with its signatures and semantics, plus registration with its plugin
  registry.  Neither SUPREME, Lightning nor wandb is needed to import or call them.

The submodules are imported on demand; see the README section "Use as a backend".
"""

__all__ = ["published", "supreme"]
