"""Interventions as hooks: each edit against a by-hand oracle forward pass, positions, no leaks, bad input.

Every oracle here is a fresh forward pass with the edit written by hand as a plain hook
(or the model before the call); the interventions under test are the workbench's own.
"""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.interventions import (ALL, GENERATED, PROMPT, AblateDirection, AblateHead, AddDirection, ClampFeature,
                                     Feature, Patch, Positions, ablate_direction_everywhere, ablate_feature, at,
                                     intervene, residual_write_sites)

SITE = "blocks.0.hook_resid_post"
PROMPT_A = "When Mary and John went to the store, John gave a drink to"
PROMPT_B = "When Alice and Bob went to the store, Bob gave a drink to"


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tiny_model.to_tokens(PROMPT_A)


def run(model, tokens, hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=list(hooks))


def steered(model, tokens, interventions, **kw):
    with torch.no_grad(), intervene(model, interventions, **kw):
        return model(tokens)


def assert_untouched(model, tokens, before):
    """No hook left on any hook point, and a fresh forward gives exactly the logits from before."""
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
    torch.testing.assert_close(run(model, tokens), before, rtol=0, atol=0)


def unit(v):
    return v / v.norm()


# ---------------------------------------------------------------------------- add
def test_add_direction_matches_hand_hook_and_leaves_no_trace(tiny_model, tokens):
    before = run(tiny_model, tokens)
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def by_hand(x, hook):
        return x + 3.0 * v

    got = steered(tiny_model, tokens, [AddDirection(SITE, v, 3.0)])
    torch.testing.assert_close(got, run(tiny_model, tokens, [(SITE, by_hand)]), rtol=0, atol=0)
    assert (got - before).abs().max() > 1e-3
    assert_untouched(tiny_model, tokens, before)


def test_positions_on_a_right_padded_batch(tiny_model):
    """prompt / generated / explicit indices per row of a batch whose prompts have different lengths."""
    from workbench.directions import PromptBatch

    batch = PromptBatch.of(tiny_model, [PROMPT_A, "When Mary went"])
    lengths = batch.lengths
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    expected_masks = {
        PROMPT: torch.arange(batch.tokens.shape[1])[None] < lengths[:, None],
        GENERATED: torch.arange(batch.tokens.shape[1])[None] == lengths[:, None] - 1,
        at(1, -1): (torch.arange(batch.tokens.shape[1])[None] == 1) | (torch.arange(batch.tokens.shape[1])[None] == lengths[:, None] - 1),
    }
    for positions, mask in expected_masks.items():
        def by_hand(x, hook, mask=mask):
            return x + 2.0 * v * mask[..., None]

        got = steered(tiny_model, batch.tokens, [AddDirection(SITE, v, 2.0, positions)], prompt_len=lengths)
        expected = run(tiny_model, batch.tokens, [(SITE, by_hand)])
        real = torch.arange(batch.tokens.shape[1])[None] < lengths[:, None]  # padding positions are never read
        torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-6)


def test_per_position_vectors(tiny_model, tokens):
    """An AddDirection with one vector per explicit index (what an input perturbation is)."""
    deltas = torch.randn(2, tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(2))

    def by_hand(x, hook):
        x = x.clone()
        x[:, 3] += deltas[0]
        x[:, 5] += deltas[1]
        return x

    got = steered(tiny_model, tokens, [AddDirection("hook_embed", deltas, 1.0, at(3, 5))])
    torch.testing.assert_close(got, run(tiny_model, tokens, [("hook_embed", by_hand)]), rtol=0, atol=1e-6)


def test_positions_parse():
    assert Positions.parse("all") == ALL and Positions.parse("generated") == GENERATED
    assert Positions.parse("0, 3,-1") == at(0, 3, -1)
    with pytest.raises(WorkbenchError, match="bad positions"):
        Positions.parse("first")
    with pytest.raises(WorkbenchError, match="outside the sequence"):
        at(12).check(prompt_len=5, total_len=10)


# ---------------------------------------------------------------------------- clamp
def _split_dictionary(model, direction, name="split"):
    """A real ReLU SAE that reconstructs everything but `direction` exactly, plus a dead feature whose decoder row is it.

    Features 0..2(d-1)-1 are +/- an orthonormal basis of the complement of the direction,
    so decode(encode(x)) = P x and the error term is (x.u) u; the last feature never fires
    (its encoder bias is very negative), so the direction lives only in the error term.
    """
    from sae.dictionary import Dictionary, DictionaryConfig

    d = model.cfg.d_model
    u = unit(direction)
    q, _ = torch.linalg.qr(torch.cat([u[:, None], torch.randn(d, d - 1, generator=torch.Generator().manual_seed(3))], 1))
    basis = q[:, 1:].T  # [d-1, d], orthonormal, orthogonal to u
    W_dec = torch.cat([basis, -basis, u[None]])  # [2(d-1)+1, d]
    dictionary = Dictionary(DictionaryConfig(name=name, arch="relu", d_in=d, d_sae=W_dec.shape[0], site=SITE), seed=0)
    with torch.no_grad():
        dictionary.W_dec.copy_(W_dec)
        dictionary.W_enc.copy_(W_dec.T)
        dictionary.b_enc.zero_()
        dictionary.b_enc[-1] = -1e4
        dictionary.b_dec.zero_()
    return dictionary, u


def test_delta_clamp_changes_the_output_where_naive_reencoding_does_not(tiny_model, tokens):
    """The regression test: a feature the error term carries.

    Clamp the dead feature to the amount of its direction the activation already holds.
    The naive form (x <- decode(encode(x) with f := v)) rebuilds exactly x: nothing happens.
    The delta form adds v * W_dec[f] on top: the feature goes from 0 to v as asked.
    """
    pos = 6
    base = run(tiny_model, tokens)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n == SITE)
    x = cache[SITE][0, pos]
    direction = x + 0.3 * x.norm() * unit(torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(4)))
    dictionary, u = _split_dictionary(tiny_model, direction)
    f = dictionary.cfg.d_sae - 1
    value = float(x @ u)
    with torch.no_grad():
        assert abs(value) > 0.5 * float(x.norm()) and float(dictionary.encode(x)[f]) == 0.0

    def naive(x, hook):
        x = x.clone()
        feats = dictionary.encode(x[:, pos])
        feats[..., f] = value
        x[:, pos] = dictionary.decode(feats)
        return x

    def delta_by_hand(x, hook):
        x = x.clone()
        x[:, pos] += value * u
        return x

    naive_logits = run(tiny_model, tokens, [(SITE, naive)])
    torch.testing.assert_close(naive_logits, base, rtol=0, atol=1e-4)  # the naive clamp silently did nothing
    got = steered(tiny_model, tokens, [ClampFeature(Feature.from_dictionary(dictionary, f), value, at(pos))])
    assert (got - base).abs().max() > 1e-2
    torch.testing.assert_close(got, run(tiny_model, tokens, [(SITE, delta_by_hand)]), rtol=0, atol=1e-5)
    assert_untouched(tiny_model, tokens, base)


def test_clamp_to_current_value_is_exactly_a_no_op_and_ablation_removes_the_feature(tiny_model, tokens):
    """Delta clamp of a topk dictionary feature: to its own value = identity; to 0 = x - f(x) W_dec[f]."""
    from sae.dictionary import Dictionary, DictionaryConfig

    d = tiny_model.cfg.d_model
    dictionary = Dictionary(DictionaryConfig(name="topk", arch="topk", d_in=d, d_sae=64, k=4, site=SITE), seed=5)
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n == SITE)
    feats = dictionary.encode(cache[SITE][0]).detach()
    f = int(feats.sum(0).argmax())
    feature = Feature.from_dictionary(dictionary, f)
    base = run(tiny_model, tokens)

    def ablated_by_hand(x, hook):
        return x - dictionary.encode(x)[..., f:f + 1] * dictionary.W_dec[f]

    got = steered(tiny_model, tokens, [ablate_feature(feature)])
    torch.testing.assert_close(got, run(tiny_model, tokens, [(SITE, ablated_by_hand)]), rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-3
    # Clamping every position to the value it already has: one position at a time, nothing moves.
    for pos in range(tokens.shape[1]):
        same = steered(tiny_model, tokens, [ClampFeature(feature, float(feats[pos, f]), at(pos))])
        torch.testing.assert_close(same, base, rtol=0, atol=1e-5)


def test_transcoder_clamp_reads_the_input_site_and_writes_the_output_site(tiny_model, tokens):
    """For a transcoder f is computed from its input site and the delta lands at its output site."""
    from sae.dictionary import Dictionary, DictionaryConfig

    d = tiny_model.cfg.d_model
    read, write = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc = Dictionary(DictionaryConfig(name="tc", arch="relu", d_in=d, d_sae=48, site=read, target_site=write), seed=6)
    feature = Feature.from_dictionary(tc, 7)
    assert feature.site == read and feature.write_site == write
    captured = {}

    def grab(x, hook):
        captured["f"] = tc.encode(x)[..., 7].detach()
        return x

    def write_by_hand(x, hook):
        return x + (2.5 - captured["f"])[..., None] * tc.W_dec[7].detach()

    expected = run(tiny_model, tokens, [(read, grab), (write, write_by_hand)])
    got = steered(tiny_model, tokens, [ClampFeature(feature, 2.5)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - run(tiny_model, tokens)).abs().max() > 1e-3


def test_feature_from_rows_matches_the_dictionary(tiny_model, tokens):
    """The plain-tensor form (encoder row, bias, threshold, decoder row) is the same edit as the dictionary's."""
    from sae.dictionary import Dictionary, DictionaryConfig

    d = tiny_model.cfg.d_model
    sae = Dictionary(DictionaryConfig(name="jr", arch="jumprelu", d_in=d, d_sae=32, site=SITE), seed=7)
    with torch.no_grad():
        sae.threshold.fill_(0.05)
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(8))
    rows = Feature.from_rows(SITE, sae.W_enc[:, 3], sae.b_enc[3], sae.W_dec[3], threshold=0.05, b_pre=sae.b_dec)
    a = steered(tiny_model, tokens, [ClampFeature(rows, 4.0)])
    b = steered(tiny_model, tokens, [ClampFeature(Feature.from_dictionary(sae, 3), 4.0)])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- ablate and patch
def test_ablate_head_matches_zeroing_its_z(tiny_model, tokens):
    def by_hand(z, hook):
        z = z.clone()
        z[:, :, 2] = 0.0
        return z

    site = "blocks.1.attn.hook_z"
    torch.testing.assert_close(steered(tiny_model, tokens, [AblateHead(1, 2)]), run(tiny_model, tokens, [(site, by_hand)]), rtol=0, atol=0)
    mean = torch.randn(tiny_model.cfg.d_head, generator=torch.Generator().manual_seed(9))

    def mean_by_hand(z, hook):
        z = z.clone()
        z[:, :4, 2] = mean
        return z

    got = steered(tiny_model, tokens, [AblateHead(1, 2, mean=mean, positions=at(0, 1, 2, 3))])
    torch.testing.assert_close(got, run(tiny_model, tokens, [(site, mean_by_hand)]), rtol=0, atol=0)


def test_ablate_direction_agrees_with_transformerlens_subspace_interchange(tiny_model, tokens):
    """Setting the projection on u to mu is TransformerLens's interchange with a source whose projection is mu."""
    from transformer_lens.tools.analysis.interchange import SubspaceInterchange

    d = tiny_model.cfg.d_model
    u = unit(torch.randn(d, generator=torch.Generator().manual_seed(10)))
    mu = 0.7
    interchange = SubspaceInterchange(u[:, None])

    def by_tl(x, hook):
        return interchange(x, (mu * u).expand_as(x))

    got = steered(tiny_model, tokens, [AblateDirection(SITE, 5 * u, value=mu)])
    torch.testing.assert_close(got, run(tiny_model, tokens, [(SITE, by_tl)]), rtol=0, atol=1e-5)


def test_ablating_every_residual_write_leaves_no_trace_of_the_direction(tiny_model, tokens):
    """Projecting the direction out of every write means no residual site at any layer holds it."""
    d = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(11))
    ivs = ablate_direction_everywhere(tiny_model, d)
    assert [iv.site for iv in ivs] == residual_write_sites(tiny_model)
    u = ivs[0].direction
    sites = [f"blocks.{layer}.hook_resid_{w}" for layer in range(tiny_model.cfg.n_layers) for w in ("pre", "mid", "post")]
    with torch.no_grad():
        with intervene(tiny_model, ivs):
            _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in sites)
        _, clean = tiny_model.run_with_cache(tokens, names_filter=lambda n: n in sites)
    for site in sites:
        assert float((cache[site] @ u).abs().max()) < 1e-5, site
        assert float((clean[site] @ u).abs().max()) > 1e-2, site  # it is there without the ablation


def test_subspace_ablation_projects_out_the_span(tiny_model, tokens):
    """A [k, width] stack is projected out as a subspace (not direction by direction, which differs when not orthogonal)."""
    g = torch.Generator().manual_seed(14)
    a = torch.randn(tiny_model.cfg.d_model, generator=g)
    b = a + 0.5 * torch.randn(tiny_model.cfg.d_model, generator=g)  # far from orthogonal to a
    q, _ = torch.linalg.qr(torch.stack([a, b]).T)

    def by_hand(x, hook):
        return x - (x @ q) @ q.T

    got = steered(tiny_model, tokens, [AblateDirection(SITE, torch.stack([a, b]))])
    torch.testing.assert_close(got, run(tiny_model, tokens, [(SITE, by_hand)]), rtol=0, atol=1e-5)
    one_by_one = steered(tiny_model, tokens, [AblateDirection(SITE, a), AblateDirection(SITE, b)])
    assert (one_by_one - got).abs().max() > 1e-4
    with pytest.raises(WorkbenchError, match="value must be 0"):
        with intervene(tiny_model, [AblateDirection(SITE, torch.stack([a, b]), value=1.0)]):
            pass


def test_patch_from_another_prompt(tiny_model, tokens):
    """Patching every position of a residual site reproduces the source's logits; one index matches a hand patch."""
    source_tokens = tiny_model.to_tokens(PROMPT_B)
    assert source_tokens.shape == tokens.shape
    patch = Patch.from_prompt(tiny_model, PROMPT_B, "blocks.1.hook_resid_pre")
    torch.testing.assert_close(steered(tiny_model, tokens, [patch]), run(tiny_model, source_tokens), rtol=0, atol=1e-5)
    z_patch = Patch.from_prompt(tiny_model, source_tokens, "blocks.0.attn.hook_z", at(-1))
    _, cache = tiny_model.run_with_cache(source_tokens, names_filter=lambda n: n == "blocks.0.attn.hook_z")

    def by_hand(z, hook):
        z = z.clone()
        z[:, -1] = cache["blocks.0.attn.hook_z"][:, -1]
        return z

    expected = run(tiny_model, tokens, [("blocks.0.attn.hook_z", by_hand)])
    torch.testing.assert_close(steered(tiny_model, tokens, [z_patch]), expected, rtol=0, atol=1e-6)


def test_patch_source_too_short_is_refused_and_cleaned_up(tiny_model, tokens):
    before = run(tiny_model, tokens)
    short = Patch.from_prompt(tiny_model, "When Mary", SITE)
    with pytest.raises(WorkbenchError, match="positions"):
        steered(tiny_model, tokens, [short])
    assert_untouched(tiny_model, tokens, before)


# ---------------------------------------------------------------------------- composition, leaks and bad input
def test_interventions_compose_in_list_order(tiny_model, tokens):
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(12))
    u = unit(v)

    def by_hand(x, hook):
        x = x + 2.0 * v
        return x - (x @ u)[..., None] * u

    got = steered(tiny_model, tokens, [AddDirection(SITE, v, 2.0), AblateDirection(SITE, v), AblateHead(0, 1)])
    expected = run(tiny_model, tokens, [(SITE, by_hand), ("blocks.0.attn.hook_z", lambda z, hook: z.index_fill(2, torch.tensor([1]), 0.0))])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_no_leak_when_the_block_raises(tiny_model, tokens):
    before = run(tiny_model, tokens)
    with pytest.raises(KeyError):
        with intervene(tiny_model, [AddDirection(SITE, torch.ones(tiny_model.cfg.d_model), 5.0), AblateHead(1, 0)]):
            tiny_model(tokens)
            raise KeyError("boom")
    assert_untouched(tiny_model, tokens, before)


@pytest.mark.parametrize("make, message", [
    (lambda m: AddDirection("blocks.7.hook_resid_post", torch.ones(m.cfg.d_model)), "unknown site"),
    (lambda m: AddDirection(SITE, torch.ones(m.cfg.d_model + 1)), "width 33 does not fit"),
    (lambda m: AddDirection(SITE, torch.full((m.cfg.d_model,), float("nan"))), "NaN"),
    (lambda m: AddDirection(SITE, torch.ones(m.cfg.d_model), float("inf")), "finite"),
    (lambda m: AblateHead(0, 99), "head 99 is out of range"),
    (lambda m: AblateDirection(SITE, torch.zeros(m.cfg.d_model)), "zero direction"),
    (lambda m: Patch(SITE, torch.zeros(3, m.cfg.d_model + 2)), "does not fit"),
    (lambda m: ClampFeature(Feature.from_rows("blocks.0.hook_mlp_out", torch.ones(5), 0.0, torch.ones(m.cfg.d_model)), 1.0), "reads width 5"),
])
def test_bad_input_is_one_line_and_changes_nothing(tiny_model, tokens, make, message):
    before = run(tiny_model, tokens)
    good = AddDirection(SITE, torch.ones(tiny_model.cfg.d_model), 1.0)
    with pytest.raises(WorkbenchError, match=message) as e:
        with intervene(tiny_model, [good, make(tiny_model)]):
            pytest.fail("the block must not run")
    assert "\n" not in str(e.value)
    assert_untouched(tiny_model, tokens, before)


def test_feature_index_out_of_range(tiny_model):
    from sae.dictionary import Dictionary, DictionaryConfig

    d = Dictionary(DictionaryConfig(name="small", arch="relu", d_in=tiny_model.cfg.d_model, d_sae=16, site=SITE))
    for bad in (16, -1):
        with pytest.raises(WorkbenchError, match=f"feature index {bad} is out of range .* 16 features"):
            Feature.from_dictionary(d, bad)


def test_head_restricted_dictionary_reads_and_writes_its_head_slice(tiny_model, tokens):
    """A per-head dictionary on hook_z (cfg.head) clamps inside that head's slice only."""
    from sae.dictionary import Dictionary, DictionaryConfig

    cfg = tiny_model.cfg
    site = "blocks.1.attn.hook_z"
    per_head = Dictionary(DictionaryConfig(name="h2", arch="relu", d_in=cfg.d_head, d_sae=12, site=site,
                                           site_shape=(cfg.n_heads, cfg.d_head), head=2), seed=13)
    feature = Feature.from_dictionary(per_head, 5)

    def by_hand(z, hook):
        z = z.clone()
        f = per_head.encode(z[:, :, 2])[..., 5]
        z[:, :, 2] += (3.0 - f)[..., None] * per_head.W_dec[5]
        return z

    got = steered(tiny_model, tokens, [ClampFeature(feature, 3.0)])
    torch.testing.assert_close(got, run(tiny_model, tokens, [(site, by_hand)]), rtol=0, atol=1e-5)
