"""Every variant on the reference model's cached activations: trains, evaluates spliced in, gets feature tables;
a transcoder on its MLP recovers at least 80% of the cross-entropy loss.

Tier: `reference` (needs data/models/ref-gpt2, built by `python -m workbench zoo build`) and `slow`.
The figures are printed (`pytest -s`) for the record.
"""

from __future__ import annotations

import pytest
import torch

from data import bundled_model_dir
from sae.dictionary import ARCHS, DictionaryConfig, load_dictionary

pytestmark = [pytest.mark.reference, pytest.mark.slow,
              pytest.mark.skipif(not (bundled_model_dir("ref-gpt2") / "config.json").is_file(), reason="ref-gpt2 is not built")]

LAYER = 1
RESID, MLP_IN, MLP_OUT, Z = (f"blocks.{LAYER}.hook_resid_post", f"blocks.{LAYER}.ln2.hook_normalized",
                             f"blocks.{LAYER}.hook_mlp_out", f"blocks.{LAYER}.attn.hook_z")
TOKENS = 50_000  # cached; the transcoder makes eight passes over them (400k activations: FVU 0.05 on ref-gpt2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from workbench.model import load_model
    from workbench.store import ActivationStore
    from workbench.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("reference") / "ws")
    model = load_model("ref-gpt2", device="cpu")
    ActivationStore(ws).cache(model, [RESID, MLP_IN, MLP_OUT, Z], TOKENS, context=128, progress=False)
    from sae.evaluate import eval_tokens

    return ws, model, eval_tokens(model, n_tokens=4096, context=128)


def _train(ws, configs, target=None, tokens=TOKENS):
    from sae.train import TrainConfig, iterator_source, train_dictionaries
    from workbench.store import ActivationStore

    store = ActivationStore(ws)
    site = configs[0].site

    def epochs():
        for epoch in range(100):
            if target:
                yield from store.pairs("ref-gpt2", site, target, 512, seed=epoch, drop_last=True)
            else:
                yield from store.batches("ref-gpt2", site, 512, seed=epoch, drop_last=True)

    return train_dictionaries(configs, iterator_source(epochs), TrainConfig(tokens=tokens, batch_size=512), ws, progress=False)


def test_every_variant_trains_evaluates_and_gets_feature_tables(reference):
    from sae.evaluate import evaluate_dictionary, write_eval
    from sae.features import FeatureTableConfig, StoreSource, feature_tables, write_feature_tables
    from workbench.store import ActivationStore

    ws, model, rows = reference
    d_model = model.cfg.d_model
    configs = [DictionaryConfig(name=f"ref-{arch}", arch=arch, d_in=d_model, d_sae=512, k=16 if arch != "codebook" else 8,
                                model="ref-gpt2", site=RESID) for arch in ARCHS]
    _train(ws, configs)  # one pass over the data trains all eight
    source = StoreSource(ActivationStore(ws), "ref-gpt2", RESID, max_rows=16_384)
    print("\narch            L0     FVU    CE rec (zero)  CE rec (mean)  dead")
    for cfg in configs:
        d = load_dictionary(ws, cfg.name)
        r = evaluate_dictionary(model, d, rows[:16], batch_size=8)
        write_eval(ws, "ref-gpt2", r)
        print(f"{cfg.arch:15s} {r.l0:5.1f}  {r.fvu:.3f}  {r.splice.ce_recovered_zero:12.3f}  {r.splice.ce_recovered_mean:13.3f}  {r.dead_fraction:.2f}")
        assert r.fvu < 0.6, (cfg.arch, r.fvu)
        assert r.splice.ce_spliced < r.splice.ce_zero, cfg.arch  # better than deleting the residual stream
        tables = feature_tables(d, source, FeatureTableConfig(n_top=3, n_quantiles=2, n_samples=1, chunk_rows=8192), model=model)
        write_feature_tables(ws, tables, model)
        assert len(tables.features) == 512 and tables.examples
    counts = ws.sql("SELECT dictionary, count(*) AS n FROM features GROUP BY 1")
    assert len(counts) == len(ARCHS) and set(counts["n"]) == {512}


def test_transcoder_on_the_reference_mlp_recovers_most_of_the_loss(reference):
    from sae.evaluate import evaluate_dictionary

    ws, model, rows = reference
    cfg = DictionaryConfig(name="ref-transcoder", arch="topk", d_in=model.cfg.d_model, d_sae=1024, d_out=model.cfg.d_model,
                           k=16, model="ref-gpt2", site=MLP_IN, target_site=MLP_OUT, skip=True)
    _train(ws, [cfg], target=MLP_OUT, tokens=8 * TOKENS)
    r = evaluate_dictionary(model, load_dictionary(ws, cfg.name), rows, batch_size=8)
    print(f"\ntranscoder {MLP_IN} -> {MLP_OUT}: FVU {r.fvu:.3f}, CE clean {r.splice.ce_clean:.3f}, spliced {r.splice.ce_spliced:.3f}, "
          f"zero-ablated {r.splice.ce_zero:.3f}, mean-ablated {r.splice.ce_mean:.3f}; recovered {r.splice.ce_recovered_zero:.3f} "
          f"(vs zero), {r.splice.ce_recovered_mean:.3f} (vs mean); KL {r.splice.kl_spliced:.4f}")
    assert r.splice.ce_recovered_zero >= 0.8
    assert r.splice.ce_recovered_mean >= 0.8


def test_attention_output_sae_and_per_head_codebooks(reference):
    from sae.evaluate import evaluate_dictionary

    ws, model, rows = reference
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    configs = [DictionaryConfig(name="ref-z", arch="topk", d_in=n_heads * d_head, d_sae=512, k=16, model="ref-gpt2", site=Z,
                                site_shape=(n_heads, d_head))]
    configs += [DictionaryConfig(name=f"ref-z-h{h}", arch="codebook", d_in=d_head, d_sae=64, k=2, model="ref-gpt2", site=Z,
                                 site_shape=(n_heads, d_head), head=h) for h in range(n_heads)]
    _train(ws, configs, tokens=60_000)
    z = load_dictionary(ws, "ref-z")
    torch.testing.assert_close(z.head_attribution().sum(-1), torch.ones(512))
    for cfg in configs:
        r = evaluate_dictionary(model, load_dictionary(ws, cfg.name), rows[:8], batch_size=8)
        print(f"\n{cfg.name}: L0 {r.l0:.1f} FVU {r.fvu:.3f} CE recovered (zero) {r.splice.ce_recovered_zero:.3f}")
        assert r.fvu < 0.8 and r.splice.ce_spliced <= r.splice.ce_zero + 1e-3
