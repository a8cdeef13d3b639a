"""The model area. The network: `network.py` (HVT and the functions on a model), `layers.py`,
`attention.py` and `gelu.py` (the layers, and the two with their own gradients), `settings.py`
(the device-dependent 'auto' settings), `stacking.py` (the train state's layout of scanned blocks),
`variants.py` (the published models and token counts). Beside it: `resample.py` (weights at
another image size) and `visualize.py` (pooling maps).

`from hvt_jax import model` gives the network's public names, so user code does not depend on
which file inside this folder defines them.
"""
from hvt_jax.model.layers import max_pool_tokens
from hvt_jax.model.network import (HVT, abstract_params, create, field_defaults, init_params,
                                   model_fields, param_count, resolve_settings, stage_features,
                                   variant)
from hvt_jax.model.stacking import stack_blocks, stacked_dims, stacked_runs, unstack_blocks
from hvt_jax.model.variants import RUN_SETTINGS, VARIANTS, ConfigError, pools_at, tokens_per_block

__all__ = ['HVT', 'RUN_SETTINGS', 'VARIANTS', 'ConfigError', 'abstract_params', 'create',
           'field_defaults', 'init_params',
           'max_pool_tokens', 'model_fields', 'param_count', 'pools_at', 'resolve_settings',
           'stack_blocks',
           'stacked_dims', 'stacked_runs', 'stage_features', 'tokens_per_block', 'unstack_blocks',
           'variant']
