"""The model area: the HVT network (`hvt.py`), its cost (`summary.py`) and pooling maps (`visualize.py`).

`from hvt_jax import model` gives the network's public names, so user code does not depend on
which file inside this folder defines them.
"""
from hvt_jax.model.hvt import (HVT, RUN_SETTINGS, VARIANTS, ConfigError, abstract_params, create,
                               field_defaults, init_params, max_pool_tokens, model_fields,
                               param_count, pools_at, resolve_settings, stack_blocks,
                               stacked_dims, stacked_runs, stage_features, tokens_per_block,
                               unstack_blocks, variant)

__all__ = ['HVT', 'RUN_SETTINGS', 'VARIANTS', 'ConfigError', 'abstract_params', 'create',
           'field_defaults', 'init_params',
           'max_pool_tokens', 'model_fields', 'param_count', 'pools_at', 'resolve_settings',
           'stack_blocks',
           'stacked_dims', 'stacked_runs', 'stage_features', 'tokens_per_block', 'unstack_blocks',
           'variant']
