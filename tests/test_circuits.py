"""Node-level circuit methods against their oracles: TransformerLens 4.3's own patching and attribution, hand patches.

Every test runs real tiny TransformerBridge models (tests/conftest.py); no mocks.
"""

from __future__ import annotations

import pytest
import torch

from circuits.attribution import RelPRules, attribute, gradient_pass, relp_hooks
from circuits.graph import Node
from circuits.patching import activation_patch
from data.tasks import make_task
from workbench.errors import WorkbenchError
from workbench.model import load_model


def hook_count(model) -> int:
    """Hooks left on the model's hook points (the bridge's own internal module hooks are not ours to count)."""
    from transformer_lens.hook_points import HookPoint

    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules() if isinstance(m, HookPoint))


@pytest.fixture(scope="module")
def ioi(tiny_model):
    return make_task("ioi", tiny_model.tokenizer, n=6, template=0, seed=3)


@pytest.fixture(scope="module")
def llama(model_dirs):
    return load_model(model_dirs["llama"], device="cpu")


def by_node(graph) -> dict[Node, float]:
    return dict(zip(graph.nodes, graph.scores.tolist()))


def test_attribution_matches_transformer_lens(tiny_model, ioi):
    """Our batched 2-forward/1-backward pass equals TL 4.3's per-example `attribution_patch`, averaged."""
    from transformer_lens.tools.analysis import attribution_patch

    ours = by_node(attribute(tiny_model, ioi, "attribution", families=("embed", "head", "mlp")))
    per_pair = [attribution_patch(tiny_model, ioi.clean[[i]], ioi.corrupt[[i]], lambda lg, i=i: ioi[[i]].metric(lg).sum())
                for i in range(len(ioi))]
    kinds = {"embed": "embed", "attn_head_out": "head", "mlp_out": "mlp"}
    for tl_node in per_pair[0].node_scores:
        node = Node(kinds[tl_node.kind], -1 if tl_node.layer is None else tl_node.layer, tl_node.position,
                    -1 if tl_node.head is None else tl_node.head)
        expected = sum(r.node_scores[tl_node] for r in per_pair) / len(per_pair)
        assert ours[node] == pytest.approx(expected, abs=1e-6, rel=1e-4)
    assert hook_count(tiny_model) == 0


def test_activation_patching_matches_transformer_lens(tiny_model, ioi):
    """Exact patching (packed replicas) equals TL's one-forward-per-index sweeps, minus the corrupt metric."""
    from transformer_lens import patching

    graph = activation_patch(tiny_model, ioi, families=("head", "mlp", "resid", "attn"))
    ours = by_node(graph)
    _, clean_cache = tiny_model.run_with_cache(ioi.clean)
    metric = lambda logits: ioi.metric(logits).mean()  # noqa: E731
    with torch.no_grad():
        corrupt = float(metric(tiny_model(ioi.corrupt)))
    heads = patching.get_act_patch_attn_head_out_by_pos(tiny_model, ioi.corrupt, clean_cache, metric)  # [layer, pos, head]
    mlps = patching.get_act_patch_mlp_out(tiny_model, ioi.corrupt, clean_cache, metric)  # [layer, pos]
    resid = patching.get_act_patch_resid_pre(tiny_model, ioi.corrupt, clean_cache, metric)
    for layer in range(tiny_model.cfg.n_layers):
        for pos in range(ioi.clean.shape[1]):
            assert ours[Node("mlp", layer, pos)] == pytest.approx(float(mlps[layer, pos]) - corrupt, abs=1e-5)
            assert ours[Node("resid", layer, pos)] == pytest.approx(float(resid[layer, pos]) - corrupt, abs=1e-5)
            for head in range(tiny_model.cfg.n_heads):
                assert ours[Node("head", layer, pos, head)] == pytest.approx(float(heads[layer, pos, head]) - corrupt, abs=1e-5)
    assert hook_count(tiny_model) == 0


def test_whole_component_patching_is_one_patch_at_every_position(tiny_model, ioi):
    """pos = -1 patches a component at all positions at once; checked against a hand-written hook."""
    graph = activation_patch(tiny_model, ioi, families=("head",), per_position=False)
    site = "blocks.1.attn.hook_z"
    _, cache = tiny_model.run_with_cache(ioi.clean, names_filter=lambda n: n == site)

    def patch(z, hook):
        z = z.clone()
        z[:, :, 2] = cache[site][:, :, 2]
        return z

    with torch.no_grad():
        patched = ioi.metric(tiny_model.run_with_hooks(ioi.corrupt, fwd_hooks=[(site, patch)])).mean()
        corrupt = ioi.metric(tiny_model(ioi.corrupt)).mean()
    assert by_node(graph)[Node("head", 1, -1, 2)] == pytest.approx(float(patched - corrupt), abs=1e-5)


def test_integrated_gradients_one_step_is_attribution_patching(tiny_model, ioi):
    a = attribute(tiny_model, ioi, "attribution")
    ig = attribute(tiny_model, ioi, "ig", steps=1)
    assert torch.equal(a.scores, ig.scores)


def test_integrated_gradients_complete_at_the_input(tiny_model, ioi):
    """IG's completeness axiom: the embedding scores sum to metric(clean) - metric(corrupt) as steps grow."""
    graph = attribute(tiny_model, ioi, "ig", families=("embed",), steps=64)
    gap = graph.info.clean_metric - graph.info.corrupt_metric
    assert float(graph.scores.sum()) == pytest.approx(gap, rel=0.03, abs=1e-3)
    one_step = attribute(tiny_model, ioi, "attribution", families=("embed",))
    assert abs(float(graph.scores.sum()) - gap) < abs(float(one_step.scores.sum()) - gap)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_relp_rules_keep_the_forward_and_change_the_gradient(arch, model_dirs, tokenizer):
    """Each rule's hook really changes gradients (TL < 4.3 silently ignored hook_scale/hook_pattern edits) and never values."""
    model = load_model(model_dirs[arch], device="cpu")
    prompts = make_task("ioi", tokenizer, n=4, template=0)
    site = "blocks.0.hook_resid_mid"
    plain = gradient_pass(model, prompts, [site], "attribution").grads[site]
    for rules, hook_filter in ((RelPRules(mlp_identity=False), "hook_scale"),
                               (RelPRules(mlp_identity=False, detach_pattern=True), None),
                               (RelPRules(), None)):
        grads = gradient_pass(model, prompts, [site], "relp", rules=rules).grads[site]
        assert (grads - plain).abs().max() > 1e-4 * plain.abs().max()
    only_pattern = [(n, h) for n, h in relp_hooks(model, RelPRules(detach_pattern=True, mlp_identity=False)) if "pattern" in n]
    assert only_pattern, "no attention-pattern hooks found"
    with torch.enable_grad():
        leaf = {}

        def grab(x, hook):
            leaf["d"] = torch.zeros_like(x, requires_grad=True)
            return x + leaf["d"]

        def grad_with(extra):
            with model.hooks(fwd_hooks=[(site, grab)] + extra):
                out = prompts.metric(model(prompts.corrupt)).sum()
            return torch.autograd.grad(out, leaf["d"])[0]

        assert (grad_with(only_pattern) - grad_with([])).abs().max() > 0
    with torch.no_grad():
        base = model(prompts.corrupt)
        with model.hooks(fwd_hooks=relp_hooks(model, RelPRules(detach_pattern=True))):
            hooked = model(prompts.corrupt)
    torch.testing.assert_close(hooked, base, atol=1e-5, rtol=0)
    assert hook_count(model) == 0


def test_relp_identity_rule_gradient_is_activation_over_input(tiny_model, tokenizer):
    """On one MLP the identity rule's gradient w.r.t. the pre-activation is exactly phi(x)/x."""
    prompts = make_task("ioi", tokenizer, n=2, template=0)
    pre, post = "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post"
    hooks = relp_hooks(tiny_model, RelPRules())
    seen = {}

    def grab_pre(x, hook):
        x.retain_grad()
        seen["pre"] = x

    def grab_post(y, hook):
        seen["post"] = y
        y.retain_grad()

    with torch.enable_grad(), tiny_model.hooks(fwd_hooks=[(pre, grab_pre)] + hooks + [(post, grab_post)]):
        tiny_model(prompts.corrupt)[:, -1, 5].sum().backward()
    x, y = seen["pre"], seen["post"]
    xs = x.detach() + 1e-6 * torch.sign(x.detach())
    torch.testing.assert_close(x.grad, y.grad * y.detach() / xs, atol=1e-6, rtol=1e-4)
    for p in tiny_model.parameters():
        p.grad = None


def test_relp_half_rule_splits_the_gate_product(llama, tokenizer):
    """Gated MLP (y = silu(gate) * up): d/d up = silu(gate)/2 and d/d gate = up/2 * silu(gate)/gate_s, exactly."""
    prompts = make_task("ioi", tokenizer, n=2, template=0)
    prefix = "blocks.1.mlp"
    seen = {}

    def grab(key):
        def hook(x, hook):
            x.retain_grad()
            seen[key] = x
        return hook

    hooks = [(f"{prefix}.hook_pre", grab("gate")), (f"{prefix}.hook_pre_linear", grab("up"))] + relp_hooks(llama, RelPRules())
    hooks.append((f"{prefix}.hook_post", grab("post")))
    with torch.enable_grad(), llama.hooks(fwd_hooks=hooks):
        llama(prompts.corrupt)[:, -1, 7].sum().backward()
    gate, up, post = seen["gate"].detach(), seen["up"].detach(), seen["post"].grad
    act = torch.nn.functional.silu(gate)
    gs = gate + 1e-6 * torch.sign(gate)
    torch.testing.assert_close(seen["up"].grad, post * act / 2, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(seen["gate"].grad, post * up / 2 * act / gs, atol=1e-6, rtol=1e-4)
    for p in llama.parameters():
        p.grad = None


def test_agreement_table_rows(tiny_model, ioi):
    from circuits.evaluate import agreement_table

    rows, exact = agreement_table(tiny_model, ioi, methods=("attribution", "relp_detach"), families=("attn", "mlp"))
    assert [(r.method, r.family) for r in rows] == [("activation", "attn"), ("activation", "mlp"), ("attribution", "attn"),
                                                    ("attribution", "mlp"), ("relp_detach", "attn"), ("relp_detach", "mlp")]
    assert all(-1 <= r.pearson <= 1 and r.runtime_s > 0 and r.n_nodes == 2 * ioi.clean.shape[1] for r in rows)
    assert exact.info.method == "activation"


def test_relp_beats_attribution_where_mlps_are_nonlinear(llama, tokenizer):
    """On a gated-MLP model RelP tracks exact patching at least as well as plain attribution (MLP outputs)."""
    prompts = make_task("ioi", tokenizer, n=8, template=0)
    exact = activation_patch(llama, prompts, families=("mlp",))
    corr = {}
    for method in ("attribution", "relp"):
        graph = attribute(llama, prompts, method, families=("mlp",))
        corr[method] = float(torch.corrcoef(torch.stack([graph.scores, exact.scores]))[0, 1])
    assert corr["relp"] >= corr["attribution"] - 0.02 and corr["relp"] > 0.8


def test_per_position_scores_need_one_length(tiny_model, tokenizer):
    mixed = make_task("ioi", tokenizer, n=8, seed=0)
    assert not mixed.same_length
    with pytest.raises(WorkbenchError, match="one length"):
        attribute(tiny_model, mixed, "attribution")
    graph = attribute(tiny_model, mixed, "attribution", per_position=False)
    assert all(n.pos == -1 for n in graph.nodes)


def test_unknown_method_and_family_are_one_line(tiny_model, ioi):
    with pytest.raises(WorkbenchError, match="unknown gradient method"):
        attribute(tiny_model, ioi, "saliency")
    with pytest.raises(WorkbenchError, match="unknown node family"):
        attribute(tiny_model, ioi, "attribution", families=("neurons",))
