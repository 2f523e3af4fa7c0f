"""Sparse dictionaries: SAEs, transcoders, codebooks and attention-output SAEs, one type for all.

- `sae.dictionary`: `Dictionary`, `DictionaryConfig`, `load_dictionary(workspace, name)`;
- `sae.kernels`: the sparse training kernels (one dense matmul per step);
- `sae.train`: `TrainConfig`, `Trainer` (a short `step()` and a loop), `train_dictionaries`;
- `sae.losses`: every variant's training loss, aux-k and aux_zipf, the JumpReLU straight-through estimator;
- `sae.checkpoint`: checkpoints in safetensors + JSON for bit-exact resume;
- `sae.evaluate`: reconstruction and splice-in metrics, the superposition check, MLP sparsity;
- `sae.features`: per-feature tables, streamed with bounded memory;
- `sae.interop`: the SAELens and sparsify file layouts;
- `sae.toy`: the superposition toy (activations made from known sparse features);
- `sae.commands`: the `train`, `eval` and `features` CLI commands.
"""

from sae.dictionary import ARCHS, Dictionary, DictionaryConfig, DictionaryOutput, load_dictionary

__all__ = ["ARCHS", "Dictionary", "DictionaryConfig", "DictionaryOutput", "load_dictionary"]
